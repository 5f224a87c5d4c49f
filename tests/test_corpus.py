"""The data build on the real packages: parsers on real records, holdout integrity, determinism, manifest."""

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from corpus import build as build_mod
from corpus import dataset
from corpus.dataset import BENCHMARKS, ICD10CM_LONGDOC, DataBuild
from corpus.fetch import debian_licence, sha256_file
from corpus.records import Pair
from corpus.sources import gcide, hunspell, icd10cm
from corpus.split import split_of
from corpus.text import join_sentences, normalize
from tests.data_fixtures import cache_dir, fetched, parsed

# --- helpers and split ---------------------------------------------------------------------------------------------


def test_normalize_and_join():
    assert normalize("  Typhoid\n  FEVER ") == "typhoid fever"
    assert join_sentences("Fever", "", "Raised body temperature.") == "Fever. Raised body temperature."
    assert join_sentences("Run:", "to go") == "Run: to go"


def test_split_is_sha256_based_and_proportioned():
    assert split_of("icd10cm:A00") == split_of("icd10cm:A00")
    shares = [split_of(f"g{i}") for i in range(20_000)]
    assert 0.18 < shares.count("test") / len(shares) < 0.22
    assert 0.04 < shares.count("validation") / len(shares) < 0.06


# --- parsers on the real package files ----------------------------------------------------------------------------


def test_icd10cm_parser():
    icd = parsed("icd10cm")
    assert len(icd.codes) == 46_881 and len(icd.chapters) == 22
    assert sum(len(c.inclusion) for c in icd.codes.values()) == 12_569
    node = icd.codes["A01.0"]
    assert node.title == "Typhoid fever" and node.inclusion == ["Infection due to Salmonella typhi"]
    assert node.category == "A01" and node.parent == "A01"
    assert "Typhoid endocarditis" in icd.codes["A01.02"].inclusion
    # a block whose id equals its only category (B10) must not be taken for the category's parent code
    assert icd.parent_code("B10") is None and icd.blocks["B10"].categories == ["B10"]
    # Excludes notes "old myocardial infarction (I25.2)", "... (I22.-)" point at existing codes
    assert {"I25.2", "I24.1", "I22"} <= set(icd10cm.excluded_targets(icd, "I21"))
    # notes of the category apply to its subcodes
    assert "J69.8" in icd10cm.excluded_targets(icd, "J45.20")
    assert icd10cm.is_cardiology("I21.01") and not icd10cm.is_cardiology("J45")
    lines = icd10cm.render_category(icd, "A01")
    assert lines[0] == ("A01", "A01 Typhoid and paratyphoid fevers")
    assert ("A01.02", "A01.02 Typhoid fever with heart involvement: Typhoid endocarditis; Typhoid myocarditis") in lines


def test_icd10cm_pairs_and_negatives():
    data = icd10cm.extract(parsed("icd10cm"))
    by_anchor = {(p.kind, p.anchor): p for p in data.pairs}
    p = by_anchor[("icd_inclusion_title", "Classical cholera")]
    assert p.positive == "Cholera due to Vibrio cholerae 01, biovar cholerae" and p.group == "icd10cm:A00"
    assert ("Cholera, unspecified", "icd10cm:A00") in p.negatives  # a sibling
    mi = [p for p in data.pairs if p.kind == "icd_title_parent" and p.anchor == "Acute myocardial infarction"]
    assert mi and mi[0].cardiology and mi[0].positive == "Ischemic heart diseases"


def test_icd10cm_title_category_pairs_are_long_context_pairs():
    icd = parsed("icd10cm")
    pairs = icd10cm.title_category_pairs(icd)
    assert len(pairs) > 5000
    for p in pairs:
        category = p.group.removeprefix("icd10cm:")
        assert p.positive == icd10cm.category_document(icd, category)  # the benchmark's document format
        assert f" {p.anchor}" in p.positive  # the title of one of the category's codes
        assert len(p.positive.split()) <= icd10cm.CATEGORY_DOC_MAX_WORDS
        assert all(p.anchor.lower() not in negative.lower() for negative, _ in p.negatives)  # no false negatives
        assert all(group != p.group for _, group in p.negatives)


def test_hpo_parser_reads_version_licence_and_synonyms():
    hpo = parsed("hpo")
    assert hpo.version == "2025-01-16"
    assert "hpo.jax.org" in hpo.licence
    assert len(hpo.terms) == 19_034 and hpo.obsolete == 450
    term = hpo.terms["HP:0001626"]
    assert term.name == "Abnormality of the cardiovascular system"
    assert any(s.text == "Cardiovascular abnormality" and s.type == "layperson" for s in term.synonyms)
    assert term.parents == ["HP:0000118"]
    layperson = [s for t in hpo.terms.values() for s in t.synonyms if s.scope == "EXACT" and s.type == "layperson"]
    assert len(layperson) == 7_164
    assert hpo.terms["HP:0000002"].definition.startswith("Deviation from the norm of height")
    assert "HP:0001627" in hpo.descendants("HP:0001626")  # Abnormal heart morphology


def test_go_parser():
    go = parsed("go")
    assert len(go.terms) == 43_558
    term = go.terms["GO:0000001"]
    assert term.name == "mitochondrion inheritance" and term.ontology == "BP"
    assert "mitochondrial inheritance" in term.synonyms
    assert not any(s.startswith("GO:") for t in go.terms.values() for s in t.synonyms)  # obsolete-id rows dropped


def test_mesh_parser_keeps_bare_descriptors():
    mesh = parsed("mesh")
    assert len(mesh.descriptors) == 30_532
    assert mesh.descriptors["D000001"] == "Calcimycin"
    assert not any("/" in name for name in mesh.descriptors.values())


def test_wordnet_parser():
    wn = parsed("wordnet")
    assert len(wn.synsets) == 117_659
    entity = wn.synsets["n00001740"]
    assert entity.lemmas == ["entity"] and entity.definition.startswith("that which is perceived")
    breathe = wn.synsets["v00001740"]
    assert breathe.lemmas[:2] == ["breathe", "take a breath"]
    assert breathe.examples[0] == "I can breathe better when the air is clean"
    assert "n14070360" in wn.medical  # disease, sense 1
    assert "n00001740" not in wn.medical
    assert 3_000 < len(wn.medical) < 6_000


def test_gcide_parser_on_real_entries():
    g = parsed("gcide")
    senses = {(s.headword, s.text): s for s in g.senses}
    assert senses[("Hepatitis", "Inflammation of the liver.")].medical
    assert senses[("Appendicitis", "Inflammation of the vermiform appendix.")].medical
    assert len(g.senses) > 100_000
    # no pronunciation or etymology left at the start of a definition ("[AE]olian" ligature markup is text)
    assert not any(s.text.startswith("\\") or re.match(r"\[[^\]]{3,}\]", s.text) for s in g.senses)
    entry = "Spurt \\Spurt\\ (sp[^u]rt), n. [Cf. Icel. sprettr a spurt.]\n   A sudden and energetic effort.\n   [1913 Webster]\n"
    assert [s.text for s in gcide.parse_entry(entry)] == ["A sudden and energetic effort."]
    wordnet_only = "Djiboutian \\Djiboutian\\ n.\n   A native or inhabitant of Djibouti.\n   [WordNet 1.5]\n"
    assert gcide.parse_entry(wordnet_only) == []


def test_hunspell_word_list():
    words = parsed("hunspell").words
    assert len(words) == 90_142
    assert "abacavir" in words and not any("/" in w for w in words)
    assert hunspell.PACKAGE.registry == "debian"


def test_debian_licence_reads_the_upstream_stanza():
    text = "Files: *\nCopyright: x\nLicense: WordNet3.0\n\nFiles: debian/*\nLicense: GPL-2+\n"
    assert debian_licence(text) == "WordNet3.0"


def test_negatives_never_include_a_positive_of_the_anchor():
    from corpus.pairs import choose_negatives

    split = split_of("g")
    same = next(f"s{i}" for i in range(1000) if split_of(f"s{i}") == split)
    other = next(f"s{i}" for i in range(1000) if split_of(f"s{i}") != split)
    candidates = (("B ", same), ("c", same), ("d", other), ("e", same), ("f", same), ("h", same), ("i", same))
    pair = Pair("a", "b", "k", "g", "medical", False, candidates)
    # "B " is the positive, "c" another positive of the anchor, "d" from another split, "e" a test query
    assert choose_negatives(pair, split, {"b", "c"}, banned={"e"}) == ["f", "h", "i"]


# --- the build on a subset: determinism and holdout integrity -------------------------------------------------------


@pytest.fixture(scope="session")
def subset_builds(icd_hpo_data, tmp_path_factory) -> tuple[Path, Path, dict]:
    """`--only icd10cm,hpo` built twice into two folders: the session's shared build, and one more."""
    b = tmp_path_factory.mktemp("build_b")
    build_mod.build(b, cache_dir(), ["icd10cm", "hpo"], {})
    return icd_hpo_data, b, json.loads((icd_hpo_data / "manifest.json").read_text())


def test_build_is_byte_identical(subset_builds):
    a, b, _ = subset_builds
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and "cache" not in p.parts)
    assert len(files) >= 15
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_manifest_records_provenance_and_outputs(subset_builds):
    a, _, manifest = subset_builds
    assert json.loads((a / "manifest.json").read_text()) == manifest
    icd = manifest["sources"]["icd10cm"]
    assert icd["package"] == "simple-icd-10-cm" and icd["version"] == "1.5.0"
    assert icd["records"] == 46_881 and icd["words"] > 400_000
    assert icd["files"][0]["sha256"] == sha256_file(fetched("icd10cm").paths[0])
    assert "hpo.jax.org" in manifest["sources"]["hpo"]["licence"]["data"]
    for rel, entry in manifest["outputs"].items():
        assert sha256_file(a / rel) == entry["sha256"], rel
        assert pq.read_metadata(a / rel).num_rows == entry["rows"], rel
    assert manifest["holdout"]["check"]["status"] == "passed"
    longdoc = manifest["benchmarks"][ICD10CM_LONGDOC.name]["documents_tokens"]
    assert longdoc["min"] > 512 and longdoc["count"] >= 50


def _training_strings(out: Path) -> set[str]:
    values: set[str] = set()
    for rel in dataset.TRAINING_FILES:
        table = pq.read_table(out / rel)
        for col in ("text", "anchor", "positive"):
            if col in table.column_names:
                values |= {normalize(v) for v in table.column(col).to_pylist()}
        if "negatives" in table.column_names:
            values |= {normalize(v) for row in table.column("negatives").to_pylist() for v in row}
    return values


def test_no_benchmark_query_in_any_training_file(subset_builds):
    a, _, _ = subset_builds
    training = _training_strings(a)
    for name in dataset.benchmarks_of("hpo") + dataset.benchmarks_of("icd10cm"):
        queries = DataBuild(a).benchmark(name).queries.values()
        assert queries, name
        assert not {normalize(q) for q in queries} & training, name


def test_training_rows_come_from_their_own_split(subset_builds):
    a, _, _ = subset_builds
    for split in dataset.SPLITS:
        rows = DataBuild(a).pairs(split).to_pylist()
        assert rows and all(split_of(r["group"]) == split for r in rows)
        positives: dict[str, set[str]] = {}
        for r in rows:
            positives.setdefault(normalize(r["anchor"]), set()).add(normalize(r["positive"]))
        for r in rows:
            assert len(r["negatives"]) <= 3
            assert not {normalize(n) for n in r["negatives"]} & positives[normalize(r["anchor"])]
    kinds = set(DataBuild(a).pairs(columns=["kind"]).column("kind").to_pylist())
    assert kinds == {
        "icd_inclusion_title",
        "icd_title_parent",
        "icd_title_category",
        "hpo_synonym_term",
        "hpo_term_definition",
    }


def test_benchmarks_are_test_groups_only_and_consistent(subset_builds):
    a, _, _ = subset_builds
    for name in dataset.benchmarks_of("hpo") + dataset.benchmarks_of("icd10cm"):
        bench = DataBuild(a).benchmark(name)
        assert bench.qrels and set(bench.qrels) == set(bench.queries), name
        relevant = {d for docs in bench.qrels.values() for d in docs}
        assert relevant <= set(bench.corpus), name
        assert relevant <= set(bench.test_documents()), name  # by the source's own group of each document


def test_longdoc_answers_lie_beyond_512_tokens(subset_builds):
    a, _, _ = subset_builds
    starts = build_mod.bert_token_starts()
    bench = DataBuild(a).benchmark(ICD10CM_LONGDOC.name)
    docs, queries = bench.corpus, bench.queries
    for query_id, relevant in bench.qrels.items():
        for doc_id in relevant:
            doc, query = docs[doc_id], queries[query_id]
            offsets = starts(doc)
            assert 512 < len(offsets) <= 8192
            first = doc.lower().find(query.lower())
            assert first >= 0 and sum(s < first for s in offsets) >= 512
    distractors = set(docs) - {d for relevant in bench.qrels.values() for d in relevant}
    assert distractors, "non-test categories too long to be training positives join as distractors"
    assert not distractors & set(bench.test_documents())
    for category in distractors:
        assert len(docs[category].split()) > icd10cm.CATEGORY_DOC_MAX_WORDS


def test_pairs_test_is_balanced_and_marks_cardiology(subset_builds):
    a, _, _ = subset_builds
    rows = DataBuild(a).pairs_test().to_pylist()
    related = [r for r in rows if r["label"] == 1.0]
    unrelated = [r for r in rows if r["label"] == 0.0]
    assert len(related) + len(unrelated) == len(rows) > 1000
    assert abs(len(related) - len(unrelated)) <= 0.05 * len(rows)
    assert sum(r["cardiology"] for r in rows) >= 100
    assert all(r["text1"] != r["text2"] for r in rows)


def test_holdout_check_fails_on_a_leak(subset_builds):
    a, _, _ = subset_builds
    leaked = DataBuild(a).pairs(columns=["anchor"]).column("anchor")[0].as_py()
    with pytest.raises(SystemExit, match="holdout check failed"):
        build_mod.check_holdout(a, {normalize(leaked)})


# --- the data contract (corpus.dataset) --------------------------------------------------------------------------


def test_benchmark_registry_marks_source_query_form_and_document_groups():
    assert dataset.BENCHMARK_SOURCES == ("hpo", "hpoa", "icd10cm", "wordnet")
    for name, info in BENCHMARKS.items():
        assert info.name == name and info.source in dataset.BENCHMARK_SOURCES and info.queries in ("prose", "terms")
    assert dataset.benchmarks_of("hpo") == ["hpo_layperson", "hpo_definition"]
    assert dataset.benchmarks_of("hpoa") == ["hpoa_symptoms"]
    assert dataset.benchmarks_of("icd10cm") == ["icd10cm_inclusion", "icd10cm_longdoc"]
    assert [b for b, i in BENCHMARKS.items() if i.queries == "prose"] == ["hpo_definition"]
    assert [b for b, i in BENCHMARKS.items() if i.control] == ["wordnet_gloss"]
    assert [b for b, i in BENCHMARKS.items() if i.long_documents] == ["icd10cm_longdoc"]
    # a document's group is the one its source gave the entity (the ICD-10-CM category of a code)
    assert BENCHMARKS["icd10cm_inclusion"].document_group("A01.02") == "icd10cm:A01"
    assert ICD10CM_LONGDOC.document_group("A01") == "icd10cm:A01"
    assert BENCHMARKS["hpo_layperson"].document_group("HP:0001626") == "hpo:HP:0001626"
    assert BENCHMARKS["wordnet_gloss"].document_group("n00001740") == "wordnet:n00001740"
    assert BENCHMARKS["hpoa_symptoms"].document_group("OMIM:154700") == "hpoa:OMIM:154700"


def test_build_writes_every_file_at_its_contract_path(subset_builds):
    a, _, manifest = subset_builds
    built = [*dataset.benchmarks_of("icd10cm"), *dataset.benchmarks_of("hpo")]
    parts = [dataset.benchmark_file(name, part) for name in built for part in dataset.BENCHMARK_PARTS]
    assert set(manifest["outputs"]) == {*dataset.TRAINING_FILES, dataset.PAIRS_TEST, *parts}  # no word list source
    assert set(manifest["benchmarks"]) == set(built)
    data = DataBuild(a)
    assert data.manifest() == manifest and data.version() == manifest["dataset_version"]
    assert all(data.has_benchmark(name) for name in built) and not data.has_benchmark("wordnet_gloss")
    for split in dataset.SPLITS:
        assert data.corpus(split).schema.equals(dataset.CORPUS_SCHEMA)
        assert data.pairs(split).schema.equals(dataset.PAIRS_SCHEMA)
        assert data.pairs_dataset(split).num_rows == manifest["outputs"][dataset.pairs_file(split)]["rows"]
        assert data.corpus_dataset(split)["text"] == data.corpus(split).column("text").to_pylist()
    assert data.pairs_test().schema.equals(dataset.PAIRS_TEST_SCHEMA)
    bench = data.benchmark("hpo_layperson")
    queries = pq.read_table(a / dataset.benchmark_file("hpo_layperson", "queries")).to_pylist()
    assert list(bench.queries.items()) == [(r["id"], r["text"]) for r in queries]  # file order
    assert sum(len(docs) for docs in bench.qrels.values()) == manifest["benchmarks"]["hpo_layperson"]["qrels"]


def test_a_folder_without_a_build(tmp_path):
    data = DataBuild(tmp_path)
    assert data.manifest() == {} and data.version() == "local"
    with pytest.raises(FileNotFoundError, match=r"corpus\.build"):
        data.benchmark("hpo_layperson")


def test_word_list_is_written_by_the_build_and_never_training_text(tmp_path):
    fetched("hunspell")  # skips where the Debian package cannot be had
    manifest = build_mod.build(tmp_path, cache_dir(), ["hunspell"], {})
    entry = manifest["outputs"][dataset.WORD_LIST]
    assert entry["rows"] == 90_142 == manifest["sources"]["hunspell"]["words"]
    assert entry["sha256"] == sha256_file(tmp_path / dataset.WORD_LIST)
    data = DataBuild(tmp_path)
    assert data.words() == sorted(parsed("hunspell").words)
    assert all(manifest["outputs"][rel]["rows"] == 0 for rel in dataset.TRAINING_FILES)


# --- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_rejects_unknown_sources():
    with pytest.raises(SystemExit):
        build_mod.main(["--only", "pubmed"])


def test_missing_override_is_reported_and_skipped(tmp_path, capsys):
    _, _, manifest = build_mod.load_sources(["go"], tmp_path, {"go": tmp_path / "nowhere"})
    assert "does not exist" in manifest["go"]["skipped"]
    assert "skip go:" in capsys.readouterr().err


def test_override_points_at_extracted_files(tmp_path):
    src = fetched("hunspell")
    root = Path(str(src.paths[0]).split("/usr/share/hunspell/")[0])
    parsed_, _, manifest = build_mod.load_sources(["hunspell"], tmp_path, {"hunspell": root})
    assert manifest["hunspell"]["origin"] == f"override:{root}"
    assert len(parsed_["hunspell"].words) == 90_142
    # a single file works too
    _, _, manifest = build_mod.load_sources(["hunspell"], tmp_path, {"hunspell": src.paths[0]})
    assert manifest["hunspell"]["records"] == 90_142
