"""Training at toy scale on CPU: initialisation, MLM pretraining (loss, resume, 2 processes), fine-tuning with
distillation, LoRA, recipes and accelerate configs."""

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from configuration_medeir import MedEIRConfig
from corpus.dataset import DataBuild
from corpus.text import normalize
from modeling_medeir import alibi_slopes
from train.colbert import ColbertRecipe
from train.distill import aligned_words, check_shared_ids, covering_words, length_buckets
from train.finetune import AlibiSlopeSchedule, FinetuneRecipe, LearnedAlibiSlopes
from train.initialize import convert_minilm, from_scratch, save, scaled_slopes, source_pieces, transfer_embeddings
from train.initialize import main as initialize_main
from train.lora import LoraRecipe
from train.pretrain import PretrainRecipe
from train.recipe import load_recipe

from .conftest import REPO

RECIPES = REPO / "train" / "recipes"


def run_module(module: str, *overrides: str, env: dict | None = None, launcher: list[str] | None = None):
    command = (launcher or [sys.executable, "-m"]) + [module] + [a for o in overrides for a in ("--set", o)]
    return subprocess.run(
        command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=900
    )


def killed_after(step: int) -> list[str]:
    """A launcher that runs the training module and SIGKILLs it after optimizer step `step` (tests/kill_after_step.py)."""
    return [sys.executable, "-m", "tests.kill_after_step", str(step)]


def log_entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- initialisation ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def medeir_tokenizer():
    return AutoTokenizer.from_pretrained(REPO / "tokenizer")


def test_minilm_conversion_keeps_embeddings_of_shared_tokens_exactly(medeir_tokenizer, minilm_path):
    model, stats = convert_minilm(medeir_tokenizer)
    minilm = AutoModel.from_pretrained(minilm_path)
    source_vocab = AutoTokenizer.from_pretrained(minilm_path).get_vocab()
    ours = model.model.embeddings.word_embeddings.weight
    shared = [(i, source_vocab[t]) for t, i in medeir_tokenizer.get_vocab().items() if t in source_vocab]
    assert len(shared) == stats["shared"] > 15000  # 16,302 of bert-base-uncased's tokens are also MedEIR tokens
    assert stats["shared"] + stats["new"] == 52543
    ids, source_ids = map(torch.tensor, zip(*shared, strict=True))
    assert torch.equal(ours[ids], minilm.embeddings.word_embeddings.weight[source_ids])


def test_new_tokens_start_as_the_mean_of_their_minilm_pieces(medeir_tokenizer, minilm_path):
    source = AutoTokenizer.from_pretrained(minilm_path)
    vocab = source.get_vocab()
    new = [t for t in ("cardiomyopathy", "##itis") if t in medeir_tokenizer.get_vocab() and t not in vocab]
    assert "cardiomyopathy" in new
    embeddings = torch.randn(len(vocab), 4)
    out, _ = transfer_embeddings(embeddings, source, medeir_tokenizer)
    pieces = source_pieces("cardiomyopathy", source, vocab)
    assert source.convert_ids_to_tokens(pieces) == source.tokenize("cardiomyopathy")
    index = medeir_tokenizer.convert_tokens_to_ids("cardiomyopathy")
    torch.testing.assert_close(out[index], embeddings[pieces].mean(0))
    assert source.convert_ids_to_tokens(source_pieces("##opathy", source, vocab))[0].startswith("##")


def test_minilm_conversion_maps_every_layer(minilm_path):
    """With ALiBi switched off (slope scale 0) and MiniLM's positions zeroed, the converted model IS MiniLM: every
    weight sits where it should (query/key/value order in the fused projection included)."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model, _ = convert_minilm(tokenizer, alibi_slope_scale=0.0)
    model.eval()
    assert model.config.alibi_slopes == [0.0] * 12
    minilm = AutoModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    with torch.no_grad():
        minilm.embeddings.position_embeddings.weight.zero_()
    batch = tokenizer(["acute myocardial infarction", "fever"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.model(**batch).last_hidden_state
        theirs = minilm(**batch).last_hidden_state * batch["attention_mask"][..., None]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_cls_position_gives_cls_minilms_exact_first_input(minilm_path):
    """With `cls_position`, [CLS] enters the first LayerNorm as MiniLM's [CLS] at position 0; every other token gets
    the folded mean of the first 32 positions."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model, stats = convert_minilm(tokenizer, fold_positions=32, cls_position=True)
    model.eval()
    assert stats["cls_position"] is True
    minilm = AutoModel.from_pretrained(minilm_path).eval()
    batch = tokenizer(["fever"], return_tensors="pt")  # [CLS] fever [SEP]
    with torch.no_grad():
        ours = model.model.embeddings(batch["input_ids"], None, None)
        theirs = minilm.embeddings(input_ids=batch["input_ids"])
        folded = minilm.embeddings.position_embeddings.weight[:32].mean(0)
        positions = minilm.embeddings.position_embeddings.weight[:3]
        shifted = minilm.embeddings(
            inputs_embeds=minilm.embeddings.word_embeddings(batch["input_ids"]) + folded - positions
        )
    torch.testing.assert_close(ours[0, 0], theirs[0, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[0, 1:], shifted[0, 1:], atol=1e-5, rtol=1e-4)
    plain, _ = convert_minilm(tokenizer, fold_positions=32)
    plain.eval()
    assert not torch.allclose(plain.model.embeddings(batch["input_ids"], None, None)[0, 0], ours[0, 0])


def test_conversion_onto_minilms_own_vocabulary_with_scaled_slopes(minilm_path, tmp_path):
    """`train.initialize minilm --tokenizer minilm --alibi-slope-scale 0.05`: no vocabulary change (every one of the
    30,522 tokens keeps MiniLM's embedding, the folded positions in token type 0, [CLS] MiniLM's position 0), the
    config holds the scaled slopes, and the folder loads offline with AutoModel and SentenceTransformer."""
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "init"
    command = ["minilm", "--tokenizer", "minilm", "--alibi-slope-scale", "0.05", "--cls-position", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "train.initialize", *command], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    slopes = [0.05 * slope for slope in alibi_slopes(12)]
    assert json.loads((out / "config.json").read_text())["alibi_slopes"] == slopes
    stats = json.loads((out / "initialization.json").read_text())
    assert (stats["tokenizer"], stats["alibi_slope_scale"], stats["fold_positions"]) == ("minilm", 0.05, 32)
    assert stats["target_vocab"] == stats["shared"] == 30522 and stats["new"] == 0

    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == "MedEIRModel" and model.config.vocab_size == 30522
    assert model.config.alibi_slopes == slopes
    assert torch.equal(model._alibi_slopes(torch.device("cpu")), torch.tensor(slopes))
    tokenizer, source_tokenizer = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(minilm_path)
    assert len(tokenizer) == 30522 and tokenizer.get_vocab() == source_tokenizer.get_vocab()
    minilm = AutoModel.from_pretrained(minilm_path).eval()
    words, positions = minilm.embeddings.word_embeddings.weight, minilm.embeddings.position_embeddings.weight
    folded = positions[:32].mean(0)
    cls = tokenizer.cls_token_id
    others = torch.arange(30522) != cls
    assert torch.equal(model.embeddings.word_embeddings.weight[others], words[others])
    torch.testing.assert_close(model.embeddings.word_embeddings.weight[cls], words[cls] + positions[0] - folded)
    ids = tokenizer(["acute myocardial infarction"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = model.embeddings(ids, None, None)
        theirs = minilm.embeddings(input_ids=ids)
        shifted = minilm.embeddings(inputs_embeds=words[ids] + folded - positions[: ids.shape[1]])
    torch.testing.assert_close(ours[0, 0], theirs[0, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[0, 1:], shifted[0, 1:], atol=1e-5, rtol=1e-4)

    texts = ["heart attack", "Acute myocardial infarction of inferior wall", "productive cough and fever"]
    st = SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    embeddings = st.encode(texts, convert_to_tensor=True)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    torch.testing.assert_close(embeddings, F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1), atol=1e-5, rtol=0)
    # untrained, small slopes, no vocabulary change: still close to all-MiniLM-L6-v2 itself (0.94-0.97 measured)
    reference = SentenceTransformer(str(minilm_path), device="cpu").encode(texts, convert_to_tensor=True)
    assert (embeddings * reference).sum(-1).min() > 0.9


def test_the_slope_scale_is_zero_or_more(tmp_path, monkeypatch, capsys):
    assert scaled_slopes(12, 1.0) is None  # the standard slopes: the config keeps its default
    assert scaled_slopes(6, 0.0) == [0.0] * 6  # no ALiBi
    assert scaled_slopes(6, 0.5) == [0.5 * slope for slope in alibi_slopes(6)]
    for bad in (-0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="finite and 0 or more"):
            scaled_slopes(12, bad)
    monkeypatch.setattr(sys, "argv", ["initialize", "minilm", "--out", str(tmp_path), "--alibi-slope-scale", "-1"])
    with pytest.raises(SystemExit):
        initialize_main()
    assert "--alibi-slope-scale must be finite and 0 or more" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["small", "base"])
def test_from_scratch_builds_every_preset(preset, medeir_tokenizer):
    model = from_scratch(preset, medeir_tokenizer)
    config = MedEIRConfig.from_json_file(REPO / "presets" / f"{preset}.json")
    assert model.config.num_hidden_layers == config.num_hidden_layers
    assert model.model.embeddings.word_embeddings.num_embeddings == len(medeir_tokenizer)


# ---- MLM pretraining -----------------------------------------------------------------------------------------

TOY = [
    "max_steps=6",
    "save_every=2",
    "eval_every=3",
    "batch_size=8",
    "seq_len=64",
    "lr=1e-3",
    "warmup_steps=1",
    "max_train_texts=3000",
    "eval_tokens=1024",
    "eval_length_factors=[1, 4]",
    "logger=none",
]


def pretrain(init: Path, data: Path, out: Path, *extra: str, **kwargs):
    recipe = [f"init={init}", f"data={data}", f"output_dir={out}", *TOY, *extra]
    return run_module("train.pretrain", *recipe, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(tiny_medeir_init, icd_hpo_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    result = pretrain(tiny_medeir_init, icd_hpo_data, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_pretraining_lowers_the_loss_and_reports_long_lengths(uninterrupted):
    entries = log_entries(uninterrupted / "train_log.jsonl")
    losses = [e["train/loss"] for e in entries if "train/loss" in e]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])
    evals = [e for e in entries if "eval/loss@64" in e]
    assert evals[-1]["eval/loss@64"] < evals[0]["eval/loss@64"]
    assert {"eval/loss@256", "eval/accuracy@64", "eval/accuracy@256"} <= evals[-1].keys()
    final = uninterrupted / "final"
    assert (final / "model.safetensors").exists() and (final / "modules.json").exists()
    # saves at steps 2, 4 and 6 are accelerate's checkpoint_0..2; keep_checkpoints=2 leaves the last two
    assert [p.name for p in sorted((uninterrupted / "checkpoints").iterdir())] == ["checkpoint_1", "checkpoint_2"]


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(
    uninterrupted, tiny_medeir_init, icd_hpo_data, tmp_path
):
    crashed = pretrain(tiny_medeir_init, icd_hpo_data, tmp_path, launcher=killed_after(3))
    assert crashed.returncode == -signal.SIGKILL
    assert not (tmp_path / "final").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint_0"]  # the step-2 save
    resumed = pretrain(tiny_medeir_init, icd_hpo_data, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    # the resumed run numbers its saves on from the checkpoint it loaded, as the uninterrupted run numbered them
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["checkpoint_1", "checkpoint_2"]
    expected = load_file(uninterrupted / "final" / "model.safetensors")
    got = load_file(tmp_path / "final" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=0, rtol=0, msg=name)


def test_a_bad_objective_is_refused_before_anything_loads(tmp_path):
    from train.pretrain import train
    from train.recipe import RecipeError

    with pytest.raises(RecipeError, match="recipe key objective must be one of"):
        load_recipe(PretrainRecipe, None, ["init=x", "objective=mlmm"])
    # a recipe made in Python: refused by the objective, not by the missing model it would load first otherwise
    recipe = PretrainRecipe(init=str(tmp_path / "no-model"), output_dir=str(tmp_path / "out"), objective="mlmm")
    with pytest.raises(ValueError, match="objective must be 'mlm', 'distill' or 'word_distill', got 'mlmm'"):
        train(recipe)
    assert not (tmp_path / "out").exists()


def test_two_process_cpu_run_ends_with_identical_weights_on_both_ranks(tiny_medeir_init, icd_hpo_data, tmp_path):
    # the venv's own interpreter: `make test` does not put .venv/bin on PATH, so a bare `accelerate` is not found
    config = str(REPO / "train/accelerate/cpu-2proc.yaml")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "-m"]
    result = pretrain(
        tiny_medeir_init, icd_hpo_data, tmp_path, "max_steps=3", env={"ACCELERATE_USE_CPU": "true"}, launcher=launcher
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = [e for e in log_entries(tmp_path / "train_log.jsonl") if "weights_sha256" in e]
    assert final and final[0]["ranks"] == 2  # the script gathers every rank's weight hash and fails if they differ


def test_hidden_state_distillation_brings_the_converted_minilm_toward_its_teacher(minilm_path, icd_hpo_data, tmp_path):
    # the conversion onto MiniLM's own vocabulary keeps every id, as the BERT-superset tokenizer does
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model, stats = convert_minilm(tokenizer, fold_positions=32)
    save(model, tokenizer, tmp_path / "init", stats)
    out = tmp_path / "distill"
    settings = ["objective=distill", "distill_texts=400", "distill_pool=[corpus, pairs]", "exclude_sources=[hpo]"]
    settings += ["eval_texts=64", "eval_every=3", "lr=2e-4", "seq_len=48"]
    result = pretrain(tmp_path / "init", icd_hpo_data, out, *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = log_entries(out / "train_log.jsonl")
    steps = [e for e in entries if "train/loss" in e]
    hidden = [e["train/hidden"] for e in steps]
    assert len(hidden) == 6 and sum(hidden[-2:]) < sum(hidden[:2])
    assert all({"train/embedding_shared", "train/embedding_own", "train/texts_per_s"} <= e.keys() for e in steps)
    evals = [e for e in entries if "eval/cosine_to_teacher" in e]
    assert len(evals) == 2 and evals[-1]["eval/hidden_mse"] < evals[0]["eval/hidden_mse"]
    assert 0.5 < evals[-1]["eval/cosine_to_teacher"] <= 1.0
    # the result is a MedEIR folder that the fine-tuning stage loads
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(out / "final"), trust_remote_code=True).encode(["fever"]).shape == (1, 384)


def test_hidden_state_distillation_refuses_a_tokenizer_that_moves_the_teachers_ids(minilm_path):
    with pytest.raises(ValueError, match="bert_superset"):
        check_shared_ids(AutoTokenizer.from_pretrained(REPO / "tokenizer"), AutoTokenizer.from_pretrained(minilm_path))
    check_shared_ids(AutoTokenizer.from_pretrained(minilm_path), AutoTokenizer.from_pretrained(minilm_path))


def test_distillation_batches_hold_texts_of_similar_length(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    texts = [" ".join(["word"] * (1 + i % 40)) for i in range(400)]
    ordered = length_buckets(texts, tokenizer, batch_size=8, seed=0)
    assert sorted(ordered) == sorted(texts)
    spreads = [max(map(len, b)) - min(map(len, b)) for b in (ordered[i : i + 8] for i in range(0, 400, 8))]
    assert max(spreads) < 5 * 5  # within a bucket of 400 texts 8 neighbours differ by a few words at most
    assert ordered != sorted(texts, key=len)  # the batches themselves are shuffled


@pytest.fixture(scope="module")
def tiny_teacher(minilm_path, tmp_path_factory) -> Path:
    """A tiny BERT on MiniLM's tokenizer, as wide and deep as the tiny MedEIR student (tiny_medeir_init)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=96
    )
    path = tmp_path_factory.mktemp("tiny-teacher")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def word_distill(init: Path, teacher: Path, data: Path, out: Path, *extra: str, **kwargs):
    settings = ["objective=word_distill", f"teacher={teacher}", "distill_texts=256", "distill_pool=[corpus, pairs]"]
    # weight decay on purpose: it must not reach the frozen rows of the embedding table
    settings += ["exclude_sources=[hpo]", "eval_texts=32", "eval_every=3", "lr=2e-2", "seq_len=48", "weight_decay=0.1"]
    return pretrain(init, data, out, *settings, *extra, **kwargs)


@pytest.fixture(scope="module")
def word_distilled(tiny_medeir_init, tiny_teacher, icd_hpo_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("word-distill")
    result = word_distill(tiny_medeir_init, tiny_teacher, icd_hpo_data, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_word_aligned_distillation_trains_only_the_new_rows(word_distilled, tiny_medeir_init, tiny_teacher):
    entries = log_entries(word_distilled / "train_log.jsonl")
    steps = [e for e in entries if "train/loss" in e]
    assert len(steps) == 6 and all(e["train/skipped_texts"] == 0 for e in steps)
    evals = [e for e in entries if "eval/hidden_mse" in e]
    assert len(evals) == 2 and evals[-1]["eval/hidden_mse"] < evals[0]["eval/hidden_mse"]
    before = load_file(tiny_medeir_init / "model.safetensors")
    after = load_file(word_distilled / "final" / "model.safetensors")
    table = "model.embeddings.word_embeddings.weight"
    student, teacher = (AutoTokenizer.from_pretrained(p).get_vocab() for p in (tiny_medeir_init, tiny_teacher))
    new = torch.tensor(sorted(i for t, i in student.items() if t not in teacher))
    shared = torch.ones(len(student), dtype=torch.bool)
    shared[new] = False
    assert torch.equal(after[table][shared], before[table][shared])
    assert (after[table][new] != before[table][new]).any(dim=1).sum() > 10  # the new rows that 48 texts reach
    for name in before.keys() & after.keys() - {table}:
        assert torch.equal(after[name], before[name]), name


def test_word_alignment_skips_a_text_whose_words_disagree(minilm_path):
    from tokenizers import pre_tokenizers

    student = AutoTokenizer.from_pretrained(REPO / "tokenizer")
    teacher = AutoTokenizer.from_pretrained(minilm_path)
    texts = ["Hypercholesterolaemia, familial", "acute myocardial infarction of the anterolateral wall"]
    encode = lambda tok: tok(texts, return_offsets_mapping=True).encodings  # noqa: E731
    assert aligned_words(encode(student), encode(teacher), 512) == [3, 7]
    assert aligned_words(encode(student), encode(teacher), 6) == [0, 2]  # words cut by truncation give no target
    teacher.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "Hypercholesterolaemia," one word
    assert aligned_words(encode(student), encode(teacher), 512) == [None, 7]


def test_covering_words_are_the_words_that_use_new_rows_most_frequent_first(minilm_path):
    student = AutoTokenizer.from_pretrained(REPO / "tokenizer")
    teacher = AutoTokenizer.from_pretrained(minilm_path).get_vocab()
    new = {i for t, i in student.get_vocab().items() if t not in teacher}
    texts = ["Cardiomyopathy of the heart", "CARDIOMYOPATHY, dilated", "Hypercholesterolaemia in the heart"]
    words = covering_words(texts, student, new, limit=10)
    assert words[0] == "cardiomyopathy"  # twice, normalised as the tokenizer normalises, before words seen once
    assert {"the", "heart", "of", ","}.isdisjoint(words)  # MiniLM's own tokens: nothing new to learn
    for word in words:
        assert new.intersection(student(word, add_special_tokens=False)["input_ids"]), word
    assert covering_words(texts, student, new, limit=1) == ["cardiomyopathy"]
    assert covering_words(texts, student, set(), limit=10) == []


def test_word_distillation_reads_covering_words_alone(tiny_medeir_init, tiny_teacher, icd_hpo_data, tmp_path):
    """With no drawn text, the one-word texts alone train, and exactly the new rows that those words use."""
    from train.finetune import mse_texts
    from train.pretrain import PretrainRecipe

    result = word_distill(
        tiny_medeir_init, tiny_teacher, icd_hpo_data, tmp_path, "distill_texts=0", "distill_words=40", "max_steps=5"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before = load_file(tiny_medeir_init / "model.safetensors")["model.embeddings.word_embeddings.weight"]
    after = load_file(tmp_path / "final" / "model.safetensors")["model.embeddings.word_embeddings.weight"]
    changed = set((after != before).any(dim=1).nonzero().flatten().tolist())
    student = AutoTokenizer.from_pretrained(tiny_medeir_init)
    teacher = set(AutoTokenizer.from_pretrained(tiny_teacher).get_vocab())
    new = {i for t, i in student.get_vocab().items() if t not in teacher}
    pool = mse_texts(
        PretrainRecipe(
            init=str(tiny_medeir_init), data=str(icd_hpo_data), distill_texts=10**9, distill_pool=["corpus", "pairs"],
            exclude_sources=["hpo"],
        )
    )  # fmt: skip
    words = covering_words(pool, student, new, limit=40)
    assert len(words) == 40  # 5 steps x 8 words
    used = {i for ids in student(words, add_special_tokens=False)["input_ids"] for i in ids} & new
    assert changed == used


def test_a_killed_word_distillation_resumes_where_it_stopped(
    word_distilled, tiny_medeir_init, tiny_teacher, icd_hpo_data, tmp_path
):
    crashed = word_distill(tiny_medeir_init, tiny_teacher, icd_hpo_data, tmp_path, launcher=killed_after(3))
    assert crashed.returncode == -signal.SIGKILL
    resumed = word_distill(tiny_medeir_init, tiny_teacher, icd_hpo_data, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    expected = load_file(word_distilled / "final" / "model.safetensors")
    got = load_file(tmp_path / "final" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=0, rtol=0, msg=name)


# ---- fine-tuning, distillation, LoRA -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(tiny_medeir_init, icd_hpo_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finetune")
    result = run_module(
        "train.finetune",
        f"init={tiny_medeir_init}",
        f"data={icd_hpo_data}",
        f"output_dir={out}",
        "max_steps=12",
        "batch_size=16",
        "mini_batch_size=8",
        "lr=2e-3",
        "warmup_ratio=0.0",
        "pair_kinds=[icd_inclusion_title, hpo_synonym_term, icd_title_category]",
        "pair_rows=864",
        "long_pair_kinds=[icd_title_category]",
        "long_mini_batch_size=4",
        "distill_mse_texts=200",
        "distill_kl_rows=200",
        "eval_steps=12",
        "eval_queries=20",
        "eval_corpus=200",
        "save_steps=6",
        "logging_steps=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_finetuning_composes_pairs_and_distillation_and_lowers_the_loss(finetuned):
    sizes = json.loads((finetuned / "datasets.json").read_text())
    assert {"pairs_hard", "long_pairs_hard", "distill_mse", "distill_kl"} <= set(sizes)
    losses = [e["loss"] for e in log_entries(finetuned / "train_log.jsonl") if "loss" in e]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    evals = [e for e in log_entries(finetuned / "train_log.jsonl") if "eval_validation_cosine_ndcg@10" in e]
    assert evals, "evaluation on the validation pairs must run during training"


def test_slope_schedule_moves_each_head_geometrically_and_refuses_zero_slopes():
    """After step k of n every head's slope is start^(1 - k/n) * end^(k/n): the standard slopes at the start, the end
    scale times them after the last step, the geometric mean half-way; set at the start of a (resumed) run too."""
    from types import SimpleNamespace

    config = MedEIRConfig(num_attention_heads=4, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    standard = alibi_slopes(4)
    schedule = AlibiSlopeSchedule(config, 0.25)
    assert schedule.slopes(0) == pytest.approx(standard) and schedule.slopes(1) == pytest.approx(
        [s / 4 for s in standard]
    )
    assert schedule.slopes(0.5) == pytest.approx([s / 2 for s in standard])
    schedule.on_train_begin(None, SimpleNamespace(global_step=3, max_steps=12), None)  # a run resumed at step 3
    assert config.alibi_slopes == pytest.approx(schedule.slopes(0.25))
    schedule.on_step_end(None, SimpleNamespace(global_step=12, max_steps=12), None)
    assert config.alibi_slopes == pytest.approx([s / 4 for s in standard])
    with pytest.raises(ValueError, match="positive slopes"):
        AlibiSlopeSchedule(config, 0.0)
    with pytest.raises(ValueError, match="positive slopes"):
        AlibiSlopeSchedule(MedEIRConfig(num_attention_heads=2, alibi_slopes=[0.5, 0.0]), 1.0)


def six_step_finetune(init, data, out: Path, *overrides: str):
    """Six steps of pair training on a tiny model, a checkpoint every 3 steps, no teacher."""
    return run_module(
        "train.finetune",
        f"init={init}",
        f"data={data}",
        f"output_dir={out}",
        "max_steps=6",
        "batch_size=8",
        "lr=1e-3",
        "warmup_ratio=0.0",
        "pair_loss=mnrl",
        "pair_kinds=[icd_inclusion_title]",
        "pair_rows=64",
        "teacher=null",
        "eval_steps=100",
        "save_steps=3",
        *overrides,
    )


def test_finetuning_with_a_slope_schedule_saves_the_slopes_of_each_step(tiny_medeir_init, icd_hpo_data, tmp_path):
    """`alibi_slope_scale_end`: the checkpoint after step 3 of 6 holds the half-way slopes, the final folder the end
    ones."""
    out = tmp_path / "run"
    result = six_step_finetune(tiny_medeir_init, icd_hpo_data, out, "alibi_slope_scale_end=0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    start = json.loads((Path(tiny_medeir_init) / "config.json").read_text())
    start_slopes = start["alibi_slopes"] or alibi_slopes(start["num_attention_heads"])
    end = [s * 0.25 for s in alibi_slopes(start["num_attention_heads"])]
    middle = json.loads((out / "checkpoints" / "checkpoint-3" / "config.json").read_text())["alibi_slopes"]
    assert middle == pytest.approx([math.sqrt(a * b) for a, b in zip(start_slopes, end, strict=True)])
    assert json.loads((out / "final" / "config.json").read_text())["alibi_slopes"] == pytest.approx(end)


def test_learned_slopes_get_gradients_through_attention_and_refuse_zero_slopes():
    """While attached, the encoder attends with exp(log_slopes): the loss reaches every head's slope (eager and sdpa
    alike), and the config receives the learned values; a head without ALiBi cannot be learned in log space."""
    from modeling_medeir import MedEIRModel

    ids = torch.randint(5, 64, (2, 12))
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        config = MedEIRConfig(
            vocab_size=64, num_attention_heads=4, hidden_size=32, intermediate_size=64, num_hidden_layers=1
        )
        encoder = MedEIRModel(config).train(False)
        encoder.config._attn_implementation = implementation
        learned = LearnedAlibiSlopes(encoder)
        assert learned.slopes(torch.device("cpu")).tolist() == pytest.approx(alibi_slopes(4))
        encoder(input_ids=ids).last_hidden_state.square().sum().backward()
        assert learned.log_slopes.grad is not None and (learned.log_slopes.grad != 0).all(), implementation
        with torch.no_grad():
            learned.log_slopes += math.log(2.0)
        learned.write_config()
        assert encoder.config.alibi_slopes == pytest.approx([2 * s for s in alibi_slopes(4)])
        assert "log_slopes" not in " ".join(encoder.state_dict())
    with pytest.raises(ValueError, match="positive slope on every head"):
        LearnedAlibiSlopes(MedEIRModel(MedEIRConfig(num_attention_heads=2, alibi_slopes=[0.5, 0.0], hidden_size=32)))


def test_finetuning_with_learned_slopes_saves_them_in_the_config(tiny_medeir_init, icd_hpo_data, tmp_path):
    """`alibi_slopes_lr`: the slopes move during training, every checkpoint's config holds the ones of its step, the
    final folder loads as an ordinary MedEIR folder (no extra weight) with the learned slopes, and a resumed run takes
    them back from its checkpoint."""
    from types import SimpleNamespace

    from modeling_medeir import MedEIRModel

    out = tmp_path / "run"
    result = six_step_finetune(tiny_medeir_init, icd_hpo_data, out, "alibi_slopes_lr=0.05")
    assert result.returncode == 0, result.stderr[-3000:]
    start = json.loads((Path(tiny_medeir_init) / "config.json").read_text())
    start_slopes = start["alibi_slopes"] or alibi_slopes(start["num_attention_heads"])
    middle = json.loads((out / "checkpoints" / "checkpoint-3" / "config.json").read_text())["alibi_slopes"]
    final = json.loads((out / "final" / "config.json").read_text())["alibi_slopes"]
    for slopes in (middle, final):  # Adam moves each log-slope by about the rate a step
        moved = [abs(math.log(a / b)) for a, b in zip(slopes, start_slopes, strict=True)]
        assert all(s > 0 for s in slopes) and max(moved) > 0.05, moved
    assert middle != pytest.approx(final)
    assert not [k for k in load_file(out / "final" / "model.safetensors") if "slope" in k]
    reloaded = AutoModel.from_pretrained(out / "final", trust_remote_code=True)
    assert reloaded.config.alibi_slopes == pytest.approx(final)
    resumed = LearnedAlibiSlopes(MedEIRModel.from_pretrained(tiny_medeir_init))
    resumed.Callback(resumed).on_train_begin(
        SimpleNamespace(output_dir=str(out / "checkpoints")), SimpleNamespace(global_step=3), None
    )
    assert resumed.config.alibi_slopes == pytest.approx(middle)
    assert resumed.slopes(torch.device("cpu")).tolist() == pytest.approx(middle)


def test_pair_rows_sample_the_file_in_its_own_proportions(icd_hpo_data):
    """The mix is the build's: a recipe takes a seeded sample of the rows as written, and may only leave kinds out."""
    from collections import Counter

    from train import finetune

    written = Counter(DataBuild(icd_hpo_data).pairs_dataset()["kind"])
    recipe = load_recipe(FinetuneRecipe, None, [f"data={icd_hpo_data}", "init=x", "pair_rows=3000"])
    sampled = Counter(finetune.training_pairs(recipe)["kind"])
    assert sum(sampled.values()) == 3000
    total = sum(written.values())
    for kind, n in written.items():  # binomial spread at 3,000 rows: well under 3 points for every share
        assert abs(sampled[kind] / 3000 - n / total) < 0.03, kind
    assert finetune.training_pairs(recipe)["anchor"] == finetune.training_pairs(recipe)["anchor"]  # seeded
    assert sum(len(ds) for ds in finetune.pair_datasets(recipe, None).values()) == 3000
    kinds = load_recipe(FinetuneRecipe, None, [f"data={icd_hpo_data}", "init=x", "pair_kinds=[icd_title_parent]"])
    assert Counter(finetune.training_pairs(kinds)["kind"]) == {"icd_title_parent": written["icd_title_parent"]}
    with pytest.raises(ValueError, match="pair_rows must be a positive number"):
        finetune.training_pairs(load_recipe(FinetuneRecipe, None, [f"data={icd_hpo_data}", "init=x", "pair_rows=0"]))


def test_mined_negatives_are_never_a_positive_of_their_anchor(tiny_medeir_init, icd_hpo_data):
    from sentence_transformers import SentenceTransformer

    from train import finetune

    recipe = load_recipe(
        FinetuneRecipe,
        None,
        [
            f"init={tiny_medeir_init}",
            f"data={icd_hpo_data}",
            "pair_kinds=[icd_inclusion_title, icd_title_parent]",
            "pair_rows=600",
            "mined_negatives=2",
        ],
    )
    from corpus.reference import minilm_path

    model = SentenceTransformer(str(minilm_path()))  # a trained model, so the margin filter keeps most rows
    sets = finetune.pair_datasets(recipe, model)
    mined = sets["pairs_hard"]
    assert mined.column_names == ["anchor", "positive", "mined_1", "mined_2", "negative_1"]
    assert len(mined) > 0.5 * 300
    pairs = DataBuild(icd_hpo_data).pairs_dataset()
    positives: dict[str, set[str]] = {}
    for a, p in zip(pairs["anchor"], pairs["positive"], strict=True):
        positives.setdefault(a, set()).add(p)
    for row in mined:
        assert row["mined_1"] != row["mined_2"]
        assert not {row["mined_1"], row["mined_2"]} & positives[row["anchor"]], row


def test_teacher_targets_are_cached_for_a_resumed_run(finetuned, monkeypatch):
    from train import finetune

    recipe = load_recipe(FinetuneRecipe, finetuned / "recipe.json")
    assert list((finetuned / "teacher-cache").glob("*/shard-*.parquet")), "the run must leave its teacher cache"
    monkeypatch.setattr(finetune, "SentenceTransformer", lambda *a, **k: pytest.fail("teacher loaded"))
    cached = finetune.distill_datasets(recipe)
    assert {name: len(ds) for name, ds in cached.items()} == {"distill_mse": 200, "distill_kl": 200}
    assert len(cached["distill_kl"][0]["label"]) == 2 and len(cached["distill_mse"][0]["label"]) == 384
    # texts never encoded before need the teacher: the cache never invents an embedding
    recipe.distill_mse_texts = 400
    with pytest.raises(pytest.fail.Exception, match="teacher loaded"):
        finetune.distill_datasets(recipe)


def test_cached_teacher_embeddings_equal_fresh_ones(finetuned, tmp_path):
    from sentence_transformers import SentenceTransformer

    from corpus.reference import minilm_path
    from train import finetune

    recipe = load_recipe(FinetuneRecipe, finetuned / "recipe.json")
    texts = finetune.mse_texts(recipe)[:20]
    cached = finetune.TeacherCache(str(finetuned / "teacher-cache"), "minilm", None).encode(texts)
    teacher = SentenceTransformer(str(minilm_path()))  # at its own window, as the recipe leaves it
    np.testing.assert_allclose(cached, teacher.encode(texts), atol=1e-5)


def test_kl_scores_can_come_from_another_teacher_with_its_query_side(finetuned, tmp_path):
    """kl_teacher: e5-small scores (query, positive, negative) with "query: " on the query and "passage: " on the
    candidates, each side cached in its own folder, while the MSE teacher stays MiniLM."""
    from corpus.reference import E5Encoder
    from train import finetune

    recipe = load_recipe(FinetuneRecipe, finetuned / "recipe.json")
    recipe.teacher_cache, recipe.distill_mse_texts, recipe.distill_kl_rows = str(tmp_path), 0, 12
    recipe.kl_teacher = "e5-small"
    rows = finetune.distill_datasets(recipe)["distill_kl"]
    e5 = E5Encoder()
    q, p, n = (
        e5.encode_query(rows["query"]),
        e5.encode_document(rows["positive"]),
        e5.encode_document(rows["negative"]),
    )
    expected = np.stack([(q * p).sum(1), (q * n).sum(1)], axis=1)
    np.testing.assert_allclose(np.array(rows["label"]), expected, atol=1e-5)
    assert sorted(d.name for d in tmp_path.iterdir()) == [
        "multilingual-e5-small-q4-default",
        "multilingual-e5-small-q4-default-query",
    ]
    with pytest.raises(ValueError, match="window"):
        finetune.load_teacher("e5-small", 512)


def test_excluded_sources_reach_no_objective(tiny_medeir_init, icd_hpo_data):
    """Leave-one-source-out: no pair, corpus text or distillation text of an excluded source is trained on."""

    from train import finetune

    overrides = [f"init={tiny_medeir_init}", f"data={icd_hpo_data}", "exclude_sources=[hpo]"]
    recipe = load_recipe(
        FinetuneRecipe, None, [*overrides, "distill_mse_texts=100000", "distill_mse_pool=[corpus, pairs]"]
    )
    hpo_texts = set()
    for table in (DataBuild(icd_hpo_data).corpus_dataset(), DataBuild(icd_hpo_data).pairs_dataset()):
        table = table.filter(lambda source: source == "hpo", input_columns="source")
        for column in ("text", "anchor", "positive"):
            hpo_texts |= {normalize(t) for t in table[column]} if column in table.column_names else set()
    assert hpo_texts
    texts = finetune.mse_texts(recipe)
    assert texts and not hpo_texts & {normalize(t) for t in texts}
    sets = finetune.pair_datasets(load_recipe(FinetuneRecipe, None, overrides), model=None)
    for dataset in sets.values():
        for column in dataset.column_names:
            assert not hpo_texts & {normalize(t) for t in dataset[column]}, column
    # the same recipe runs without the excluded source's kinds (the other kinds unchanged)
    recipe = load_recipe(
        FinetuneRecipe, None, [*overrides, "pair_kinds=[hpo_synonym_term, icd_inclusion_title]", "pair_rows=10"]
    )
    assert sum(len(d) for d in finetune.pair_datasets(recipe, None).values()) == 10
    with pytest.raises(ValueError, match="exclude_sources names sources not in"):
        finetune.mse_texts(
            load_recipe(FinetuneRecipe, None, [*overrides[:2], "exclude_sources=[pubmed]", "distill_mse_texts=5"])
        )


def test_matryoshka_wraps_pair_and_kl_losses(tiny_medeir_init):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import losses as st_losses

    from train import finetune

    model = SentenceTransformer(str(tiny_medeir_init), trust_remote_code=True)
    recipe = load_recipe(FinetuneRecipe, None, [f"init={tiny_medeir_init}", "matryoshka_dims=[16, 48, 32]"])
    loss = finetune.matryoshka(st_losses.MultipleNegativesRankingLoss(model), recipe)
    assert isinstance(loss, st_losses.MatryoshkaLoss) and list(loss.matryoshka_dims) == [48, 32, 16]
    plain = load_recipe(FinetuneRecipe, None, [f"init={tiny_medeir_init}"])
    assert isinstance(
        finetune.matryoshka(st_losses.MultipleNegativesRankingLoss(model), plain),
        st_losses.MultipleNegativesRankingLoss,
    )


def test_finetuned_folder_loads_as_a_sentence_transformer(finetuned):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(finetuned / "final"), trust_remote_code=True)
    embeddings = model.encode(["fever", "pyrexia"], convert_to_tensor=True)
    assert embeddings.shape == (2, 48) and torch.isfinite(embeddings).all()


def test_lora_adapter_trains_saves_loads_and_merges(finetuned, icd_hpo_data, tmp_path):
    from sentence_transformers import SentenceTransformer

    from train.lora import load_adapted

    base = finetuned / "final"
    result = run_module(
        "train.lora",
        f"base={base}",
        f"data={icd_hpo_data}",
        f"output_dir={tmp_path}",
        "max_steps=4",
        "batch_size=16",
        "lr=5e-3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "separation.json").read_text())
    assert report["train_pairs"] > 0 and report["test_pairs"] > 0
    assert 0 < report["trainable_parameters"] < report["total_parameters"] / 5
    for key in ("separation", "related_mean", "unrelated_mean"):
        assert key in report["separation_before"] and key in report["separation_after"]
    assert report["separation_after"] != report["separation_before"]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    texts = ["atrial fibrillation", "heart failure with preserved ejection fraction"]
    adapted = load_adapted(str(base), tmp_path / "adapter").encode(texts, convert_to_tensor=True)
    merged = SentenceTransformer(str(tmp_path / "merged"), trust_remote_code=True).encode(texts, convert_to_tensor=True)
    plain = SentenceTransformer(str(base), trust_remote_code=True).encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(merged, plain, atol=1e-4)


def test_pair_metrics_pearson_and_separation_by_hand():
    from train.metrics import pair_scores

    # related 0.9, 0.7 (mean 0.8); unrelated 0.2, 0.4 (mean 0.3): separation 0.5.
    # Pearson: deviations x (.35, .15, -.35, -.15), y (.5, .5, -.5, -.5): 0.5 / sqrt(0.29 * 1) = 0.928477
    scores = pair_scores([0.9, 0.7, 0.2, 0.4], [1.0, 1.0, 0.0, 0.0])
    assert scores["separation"] == pytest.approx(0.5)
    assert scores["related_mean"] == pytest.approx(0.8) and scores["unrelated_mean"] == pytest.approx(0.3)
    assert scores["pearson"] == pytest.approx(0.5 / np.sqrt(0.29))
    assert scores["spearman"] == pytest.approx(4 / np.sqrt(20))  # ranks (4, 3, 1, 2) vs tied labels
    assert (scores["related"], scores["unrelated"]) == (2, 2)
    # a model that ranks unrelated pairs higher gets a negative separation and correlation
    flipped = pair_scores([0.2, 0.4, 0.9, 0.7], [1.0, 1.0, 0.0, 0.0])
    assert flipped["separation"] == pytest.approx(-0.5) and flipped["pearson"] < 0
    with pytest.raises(ValueError):
        pair_scores([0.1, 0.2], [1.0, 2.0])


def test_finetuning_and_lora_share_their_trainer_settings(tmp_path):
    from sentence_transformers.training_args import BatchSamplers

    from train.finetune import training_arguments

    finetune = load_recipe(FinetuneRecipe, None, ["init=x", f"output_dir={tmp_path / 'f'}", "batch_size=8", "lr=1e-4"])
    lora = load_recipe(LoraRecipe, None, ["base=x", f"output_dir={tmp_path / 'l'}", "max_steps=5", "seed=3"])
    f = training_arguments(finetune, save_strategy="steps", save_steps=7)
    a = training_arguments(lora, save_strategy="no", report_to=[])
    assert (f.per_device_train_batch_size, f.learning_rate, f.save_steps) == (8, 1e-4, 7)
    assert (a.max_steps, a.seed, a.save_strategy, a.report_to) == (5, 3, "no", [])
    for args, recipe in ((f, finetune), (a, lora)):
        assert args.output_dir == str(Path(recipe.output_dir) / "checkpoints")
        assert args.batch_sampler == BatchSamplers.NO_DUPLICATES and args.dataloader_drop_last
        assert args.optim == "adamw_torch_fused" and args.bf16 == torch.cuda.is_available()


def test_bf16_recipe_runs_on_a_cpu_without_a_gpu(tmp_path):
    """`bf16: true` on a machine without CUDA: bf16 autocast on the CPU (transformers refuses bf16 without a GPU
    unless it is told to use the CPU)."""
    from train.finetune import training_arguments

    recipe = load_recipe(FinetuneRecipe, None, ["init=x", f"output_dir={tmp_path}", "bf16=true"])
    args = training_arguments(recipe, bf16=recipe.bf16)
    assert args.bf16 and args.use_cpu == (not torch.cuda.is_available())


# ---- recipes and launch configs ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(path):
    kind = {
        "pretrain": PretrainRecipe,
        "finetune": FinetuneRecipe,
        "distill": FinetuneRecipe,
        "lora": LoraRecipe,
        "colbert": ColbertRecipe,
    }
    cls = kind[path.name.split("-")[0]]
    recipe = load_recipe(cls, path)
    assert {f.name for f in fields(cls)} >= {"output_dir"} and recipe.output_dir.startswith("runs/")
    json.dumps(recipe.__dict__, default=str)  # what each run writes to its recipe.json


def test_unknown_recipe_keys_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe keys"):
        load_recipe(PretrainRecipe, None, ["init=x", "max_stepz=3"])


@pytest.mark.parametrize("path", sorted((REPO / "train" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    """`accelerate launch --config_file` reads every setting of the file: accelerate's config keeps each key as
    written, and the launcher's arguments hold its process count, precision, distributed mode and every FSDP /
    DeepSpeed setting."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    written = yaml.safe_load(path.read_text())
    parsed = load_config_from_file(str(path)).to_dict()
    assert {key: parsed.get(key) for key in written} == written
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "train.pretrain"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == written["num_processes"] >= 1
    assert args.mixed_precision == written["mixed_precision"]
    mode = written["distributed_type"]
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (
        mode == "MULTI_GPU",
        mode == "FSDP",
        mode == "DEEPSPEED",
    )
    for key, value in {**written.get("fsdp_config", {}), **written.get("deepspeed_config", {})}.items():
        assert getattr(args, key) == value, key


def test_export_halves_the_weights_and_still_loads_in_float32(finetuned, tmp_path):
    from train.export import export

    report = export(finetuned / "final", tmp_path / "exported")
    weights = load_file(tmp_path / "exported" / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in weights.values() if t.is_floating_point())
    assert report["max_embedding_diff"] < 5e-3
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["dtype"] == "float32"
    assert (tmp_path / "exported" / "modeling_medeir.py").read_text() == (REPO / "modeling_medeir.py").read_text()
    # trained at 512 tokens, shipped with its whole context and legacy module types any sentence-transformers loads
    modules = json.loads((tmp_path / "exported" / "modules.json").read_text())
    assert modules[0]["type"] == "sentence_transformers.models.Transformer"
    tokenizer_config = json.loads((tmp_path / "exported" / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 8192 and "local_files_only" not in tokenizer_config
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(tmp_path / "exported"), trust_remote_code=True).max_seq_length == 8192
