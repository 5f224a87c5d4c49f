"""The committed MedEIR tokenizer: size, special tokens, AutoTokenizer round trip, reproducible training."""

import hashlib
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from corpus.dataset import DataBuild
from tokenizer import fragmentation, train

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "tokenizer"
VOCAB_SIZE = 52_543


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def test_size_and_max_length(tok):
    assert len(tok) == VOCAB_SIZE
    assert tok.model_max_length == 8192
    vocab = (TOKENIZER / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == VOCAB_SIZE == len(set(vocab))
    assert tok.get_vocab() == {t: i for i, t in enumerate(vocab)}


def test_special_tokens_sit_at_bert_ids(tok):
    assert tok.pad_token_id == 0  # the model config's pad_token_id
    assert (tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (100, 101, 102, 103)
    ids = tok("Acute myocardial infarction")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    pair = tok("fever", "pyrexia")
    assert pair["input_ids"].count(tok.sep_token_id) == 2 and set(pair["token_type_ids"]) == {0, 1}


def test_round_trip_through_autotokenizer(tok, tmp_path):
    text = "Chronic obstructive pulmonary disease with (acute) exacerbation; HbA1c ≥ 6.5%, 5 µg/kg."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    decoded = tok.decode(ids)
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again(text)["input_ids"] == tok(text)["input_ids"] and again.model_max_length == 8192


def test_lower_cases_and_keeps_medical_words_whole(tok):
    assert tok.tokenize("HYPERCHOLESTEROLEMIA") == tok.tokenize("hypercholesterolemia")
    for word in ("hypercholesterolemia", "cardiomyopathy", "tachycardia", "thrombocytopenia", "osteomyelitis"):
        assert len(tok.tokenize(word)) <= 2, (word, tok.tokenize(word))


def test_committed_files_match_their_build_record():
    record = json.loads((TOKENIZER / "build.json").read_text())
    vocab = (TOKENIZER / "vocab.txt").read_text(encoding="utf-8")
    assert hashlib.sha256(vocab.encode("utf-8")).hexdigest() == record["vocab_sha256"]
    assert record["vocab_size"] == VOCAB_SIZE and record["settings"]["vocab_size"] == VOCAB_SIZE
    assert record["recipe"] == train.load_recipe()[0]


def test_fewer_pieces_than_bert_on_medical_words():
    """On a real medical word list (hunspell-en-med, never training text) MedEIR must cut words less."""
    from tests.data_fixtures import parsed

    words = parsed("hunspell").words
    medeir = fragmentation.word_stats(fragmentation.load_medeir(TOKENIZER), words)
    bert = fragmentation.word_stats(fragmentation.load_bert(), words)
    assert medeir["tokens_per_word"] < 0.8 * bert["tokens_per_word"]
    assert medeir["share_3plus"] < bert["share_3plus"]


def test_fragmentation_reads_the_word_list_of_the_data_build(tmp_path):
    """The word list comes from the data build (corpus.build writes it), not from a second fetch of the package."""
    from corpus import build
    from tests.data_fixtures import cache_dir, fetched, parsed

    with pytest.raises(FileNotFoundError, match=r"corpus\.build"):
        fragmentation.word_list(DataBuild(tmp_path))
    fetched("hunspell")  # skips where the Debian package cannot be had
    build.build(tmp_path, cache_dir(), ["hunspell"], {})
    assert fragmentation.word_list(DataBuild(tmp_path)) == sorted(parsed("hunspell").words)


def _slice_rows() -> list[dict]:
    """A small real corpus slice (ICD-10-CM and HPO texts) that needs no prior build."""
    from corpus.sources import hpo, icd10cm
    from tests.data_fixtures import parsed

    texts = icd10cm.extract(parsed("icd10cm")).texts[:400] + hpo.extract(parsed("hpo")).texts[:1500]
    return [{"text": t.text, "source": t.group.split(":")[0], "domain": t.domain} for t in texts]


def test_training_is_reproducible_on_a_slice():
    rows = _slice_rows()
    _, recipe = train.load_recipe()
    recipe = {**recipe, "vocab_size": 2000}
    first, second = train.train_vocab(rows, recipe), train.train_vocab(rows, recipe)
    assert first == second and len(first) == 2000
    laid_out = train.bert_layout(first, 2000)
    assert len(laid_out) == 2000 and len(set(laid_out)) == 2000
    assert [laid_out[i] for i in (0, 100, 101, 102, 103)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert set(laid_out) == set(first)


def test_superset_layout_adds_learned_tokens_after_the_base():
    rows = _slice_rows()
    _, recipe = train.load_recipe()
    learned = train.train_vocab(rows, {**recipe, "vocab_size": 2000})
    base = train.bert_vocab()
    size = len(base) + 100
    laid_out = train.superset_layout(base, learned, size)
    assert laid_out[: len(base)] == base and len(laid_out) == size == len(set(laid_out))
    added = laid_out[len(base) :]
    assert added == [t for t in learned if t not in set(base)][:100]  # trained order, nothing BERT has
    with pytest.raises(ValueError, match="learned tokens are new"):
        train.superset_layout(base, learned, len(base) + 5000)


def test_weighting_repeats_by_domain_or_source():
    rows = [
        {"text": "a", "source": "hpo", "domain": "medical"},
        {"text": "b", "source": "wordnet", "domain": "general"},
    ]
    assert list(train.weighted_texts(rows, {"medical": 2, "wordnet": 3})) == ["a", "a", "b", "b", "b"]


@pytest.mark.slow
def test_full_retrain_reproduces_the_committed_tokenizer(tmp_path):
    """Rebuild from data/corpus/train.parquet (when the local build is the one the tokenizer was trained on)."""
    data = DataBuild(REPO / "data")
    corpus = data.corpus_path()
    record = json.loads((TOKENIZER / "build.json").read_text())
    if not corpus.exists():
        pytest.skip("data/ not built here: run `python -m corpus.build` to enable the full retrain check")
    if hashlib.sha256(corpus.read_bytes()).hexdigest() != record["corpus"]["sha256"]:
        pytest.skip("data/corpus/train.parquet differs from the one the committed tokenizer was trained on")
    rebuilt = train.build(data, tmp_path, record["recipe"])
    assert rebuilt["vocab_sha256"] == record["vocab_sha256"]
    assert (tmp_path / "tokenizer.json").read_bytes() == (TOKENIZER / "tokenizer.json").read_bytes()
