"""The late-interaction (ColBERT) MedEIR at toy scale on CPU: training lowers the loss and saves a folder that
reloads offline, token vectors do not depend on padding, the scoring mask, resuming, leaving a source out."""

import dataclasses
import json
import shutil
import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sentence_transformers.multi_vector_encoder import MultiVectorEncoder
from transformers import TrainerCallback

from corpus.dataset import DataBuild
from corpus.text import normalize
from train import colbert, export, finetune
from train.colbert import ColbertRecipe
from train.recipe import load_recipe

from .conftest import REPO

TEXTS = [
    "Cholera due to Vibrio cholerae 01, biovar cholerae",
    "fever",
    "Abnormality of the cardiovascular system (heart, vessels).",
    "always thirsty and peeing a lot",
]


def tiny_recipe(init: Path, data: Path, output_dir: Path, *overrides: str) -> ColbertRecipe:
    """A run of a dozen steps of 16 rows on short pairs and teacher scores of the init, checkpointed every 6."""
    settings = [
        f"init={init}",
        f"data={data}",
        f"output_dir={output_dir}",
        "projection_dim=32",
        "max_steps=12",
        "batch_size=16",
        "mini_batch_size=16",
        "lr=2e-3",
        "warmup_ratio=0.0",
        "pair_kinds=[icd_inclusion_title, hpo_synonym_term]",
        "pair_rows=640",
        "distill_kl_rows=160",
        "eval_steps=12",
        "eval_queries=20",
        "save_steps=6",
        "logging_steps=2",
    ]
    return load_recipe(ColbertRecipe, None, [*settings, *overrides])


class Interrupted(Exception):
    pass


class StopAfter(TrainerCallback):
    """Raise after optimizer step `step` (after the checkpoints of earlier steps, before this step's): a crash."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted(f"stopped after step {self.step}")


class StepsSeen(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def run(recipe: ColbertRecipe, *callbacks: TrainerCallback) -> tuple[Path, MultiVectorEncoder]:
    """train.colbert.train in this process, with `callbacks` on its trainer; the final folder and the trained
    model."""
    trainers = []

    def trainer_with_callbacks(*args):
        trainer = trainer_for(*args)
        for callback in callbacks:
            trainer.add_callback(callback)
        trainers.append(trainer)
        return trainer

    trainer_for = colbert.trainer_for
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(colbert, "trainer_for", trainer_with_callbacks)
        final = colbert.train(recipe)
    return final, trainers[0].model


@dataclasses.dataclass
class Trained:
    recipe: ColbertRecipe
    final: Path
    model: MultiVectorEncoder


@pytest.fixture(scope="module")
def trained(tiny_medeir_init, icd_hpo_data, tmp_path_factory) -> Trained:
    recipe = tiny_recipe(tiny_medeir_init, icd_hpo_data, tmp_path_factory.mktemp("colbert"))
    return Trained(recipe, *run(recipe))


def in_batch_loss(model: MultiVectorEncoder, anchors: list[str], positives: list[str]) -> float:
    """The MaxSim multiple-negatives ranking loss of anchors against their positives and each other's."""
    with torch.no_grad():
        scores = model.similarity(model.encode_query(anchors), model.encode_document(positives))
    return F.cross_entropy(scores, torch.arange(len(anchors))).item()


def test_training_lowers_the_maxsim_ranking_loss(trained):
    sizes = json.loads((Path(trained.recipe.output_dir) / "datasets.json").read_text())
    assert {"pairs_hard", "distill_kl"} <= set(sizes), sizes
    pairs = colbert.pair_datasets(trained.recipe)["pairs_hard"].select(range(64))
    start = colbert.load_model(trained.recipe)  # the same seeded projection the run started from
    before = in_batch_loss(start, pairs["anchor"], pairs["positive"])
    after = in_batch_loss(trained.model, pairs["anchor"], pairs["positive"])
    assert after < 0.9 * before, (before, after)  # 3.54 -> 2.92 when written
    log = [json.loads(line) for line in (Path(trained.recipe.output_dir) / "train_log.jsonl").read_text().splitlines()]
    assert any("eval_validation_maxsim_ndcg@10" in entry for entry in log), "validation must run during training"


def test_final_folder_reloads_with_the_trained_token_vectors(trained):
    expected = trained.model.encode_document(TEXTS)
    reloaded = MultiVectorEncoder(str(trained.final), trust_remote_code=True)
    for got, want in zip(reloaded.encode_document(TEXTS), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert reloaded.get_embedding_dimension() == 32
    assert (reloaded.max_seq_length, reloaded[0].document_length, reloaded[0].query_length) == (8192, 8192, 128)


def test_export_ships_a_late_interaction_folder_that_loads_offline_with_the_same_vectors(trained, tmp_path):
    """train.export on the trained folder: float16 encoder weights, its own projection, mask and lengths kept, no
    onnx/; `verify` (a fresh offline process without this checkout on its path: AutoModel, MultiVectorEncoder)
    must find the source's token vectors as queries and as documents."""
    shipped = tmp_path / "shipped"
    result = export.export(trained.final, shipped)
    assert result["max_embedding_diff"] <= export.HALF_ATOL and "none" in result["onnx"], result
    assert not (shipped / "onnx").exists() and not (shipped / "1_Pooling").exists()
    weights = load_file(shipped / "model.safetensors")
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}
    reloaded = MultiVectorEncoder(str(shipped), trust_remote_code=True)
    lengths = (reloaded[0].query_length, reloaded[0].document_length)
    assert reloaded.get_embedding_dimension() == 32 and lengths == (128, 8192)
    for got, want in zip(reloaded.encode_document(TEXTS), trained.model.encode_document(TEXTS), strict=True):
        torch.testing.assert_close(got, want, atol=export.HALF_ATOL, rtol=0)


def test_export_check_refuses_a_late_interaction_folder_whose_vectors_differ(trained, tmp_path):
    """A projection changed after the copy: the fresh process loads it, and the check must name the difference."""
    copy = tmp_path / "copy"
    shutil.copytree(trained.final, copy)
    dense_file = copy / "1_Dense" / "model.safetensors"
    weights = load_file(dense_file)
    save_file({k: v.flip(0).contiguous() for k, v in weights.items()}, dense_file)
    with pytest.raises(export.ExportError, match="differ"):
        export.verify(trained.final, copy)
    with pytest.raises(export.ExportError, match="not the same kind"):
        export.verify(trained.recipe.init, copy)


@pytest.fixture(scope="module")
def untrained(tiny_medeir_init, icd_hpo_data, tmp_path_factory) -> MultiVectorEncoder:
    return colbert.load_model(tiny_recipe(tiny_medeir_init, icd_hpo_data, tmp_path_factory.mktemp("untrained")))


@pytest.mark.parametrize("side", ["query", "document"])
def test_a_text_gets_the_same_vectors_alone_and_in_a_padded_batch(untrained, side):
    encode = untrained.encode_query if side == "query" else untrained.encode_document
    batch = encode(TEXTS, batch_size=len(TEXTS))
    for text, in_batch in zip(TEXTS, batch, strict=True):
        torch.testing.assert_close(encode(text), in_batch, atol=1e-5, rtol=0)


def test_the_scoring_mask_drops_padding_and_punctuation_as_configured(
    untrained, tiny_medeir_init, icd_hpo_data, tmp_path
):
    tokenizer = untrained.tokenizer
    text = "fever, cough (dry)."
    pieces = tokenizer.tokenize(text)
    punctuation = [p for p in pieces if p in string.punctuation]
    assert len(punctuation) == 4, pieces
    long_text = "chronic obstructive pulmonary disease with acute lower respiratory infection"
    # padding: in a batch with a longer text, the short text keeps exactly its own tokens ([CLS], [SEP] included)
    documents = untrained.encode_document([text, long_text])
    queries = untrained.encode_query([text, long_text])
    assert len(documents[0]) == len(pieces) + 2 - len(punctuation)  # documents: punctuation not scored
    assert len(queries[0]) == len(pieces) + 2  # queries: every token scored
    # without the skiplist, documents keep their punctuation
    plain = colbert.load_model(tiny_recipe(tiny_medeir_init, icd_hpo_data, tmp_path, "skip_punctuation=false"))
    assert len(plain.encode_document([text, long_text])[0]) == len(pieces) + 2
    # with the query skiplist, queries drop their punctuation as documents do
    both = colbert.load_model(tiny_recipe(tiny_medeir_init, icd_hpo_data, tmp_path, "skip_query_punctuation=true"))
    assert len(both.encode_query([text, long_text])[0]) == len(pieces) + 2 - len(punctuation)
    assert len(both.encode_document([text, long_text])[0]) == len(pieces) + 2 - len(punctuation)
    queries_only = colbert.load_model(
        tiny_recipe(tiny_medeir_init, icd_hpo_data, tmp_path, "skip_query_punctuation=true", "skip_punctuation=false")
    )
    assert len(queries_only.encode_query([text])[0]) == len(pieces) + 2 - len(punctuation)
    assert len(queries_only.encode_document([text])[0]) == len(pieces) + 2
    # every punctuation mark that is a token of the vocabulary is on the list, nothing else
    vocabulary = tokenizer.get_vocab()
    mask = next(m for m in untrained if type(m).__name__ == "MultiVectorMask")
    assert set(mask.skiplist_words) == {p for p in string.punctuation if p in vocabulary}
    assert mask._skiplist_ids.numel() == len(mask.skiplist_words)


def test_documents_also_drop_the_tokens_most_training_texts_hold(tiny_medeir_init, icd_hpo_data, tmp_path):
    recipe = tiny_recipe(tiny_medeir_init, icd_hpo_data, tmp_path, "skip_frequent_tokens=5")
    model = colbert.load_model(recipe)
    tokenizer = model.tokenizer
    # the five tokens held by the most training texts, counted here independently (special tokens aside)
    held: dict[str, int] = {}
    for text in DataBuild(icd_hpo_data).corpus_dataset()["text"]:
        for token in set(tokenizer.tokenize(text)):
            held[token] = held.get(token, 0) + 1
    ranked = sorted(held, key=lambda t: (-held[t], tokenizer.convert_tokens_to_ids(t)))
    frequent = colbert.frequent_tokens(recipe, tokenizer, 5)
    assert frequent == ranked[:5]
    assert not set(frequent) & set(tokenizer.all_special_tokens)
    mask = next(m for m in model if type(m).__name__ == "MultiVectorMask")
    punctuation = [p for p in string.punctuation if p in tokenizer.get_vocab()]
    assert mask.skiplist_words == list(dict.fromkeys(punctuation + frequent))
    assert mask.skiplist_tasks == ["document"]
    # a document drops them (and its punctuation), a query keeps every token
    text = " ".join(frequent) + " fever, cough"
    pieces = tokenizer.tokenize(text)
    dropped = [p for p in pieces if p in mask.skiplist_words]
    assert {p for p in pieces if p in frequent} == set(frequent) and "," in dropped
    assert len(model.encode_document([text])[0]) == len(pieces) + 2 - len(dropped)
    assert len(model.encode_query([text])[0]) == len(pieces) + 2
    # a source left out is not counted
    without = colbert.frequent_tokens(dataclasses.replace(recipe, exclude_sources=["hpo"]), tokenizer, 5)
    held_icd: dict[str, int] = {}
    corpus = DataBuild(icd_hpo_data).corpus(columns=["text", "source"]).to_pydict()
    for text, source in zip(corpus["text"], corpus["source"], strict=True):
        if source != "hpo":
            for token in set(tokenizer.tokenize(text)):
                held_icd[token] = held_icd.get(token, 0) + 1
    assert without == sorted(held_icd, key=lambda t: (-held_icd[t], tokenizer.convert_tokens_to_ids(t)))[:5]
    # one skiplist serves every side it applies to: the query's punctuation cannot be skipped without these too
    with pytest.raises(ValueError, match="skip_query_punctuation"):
        colbert.load_model(dataclasses.replace(recipe, skip_query_punctuation=True))
    with pytest.raises(ValueError, match="skip_frequent_tokens must be 0"):
        colbert.load_model(dataclasses.replace(recipe, skip_frequent_tokens=-1))


def test_a_projection_of_another_width_replaces_the_default(untrained, tiny_medeir_init, icd_hpo_data, tmp_path):
    wide = colbert.load_model(tiny_recipe(tiny_medeir_init, icd_hpo_data, tmp_path, "projection_dim=96"))
    assert wide.get_embedding_dimension() == 96 and untrained.get_embedding_dimension() == 32
    assert wide.encode_document("fever").shape[1] == 96


def test_a_multi_vector_start_keeps_its_projection(trained, tmp_path):
    again = colbert.load_model(dataclasses.replace(trained.recipe, init=str(trained.final)))
    for got, want in zip(again.encode_document(TEXTS), trained.model.encode_document(TEXTS), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="projects to 32"):
        colbert.load_model(dataclasses.replace(trained.recipe, init=str(trained.final), projection_dim=128))


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one(trained, tmp_path):
    interrupted = dataclasses.replace(trained.recipe, output_dir=str(tmp_path))
    with pytest.raises(Interrupted):
        run(interrupted, StopAfter(8))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")) == ["checkpoint-6"]
    scores = list((tmp_path / "teacher-scores").glob("*.parquet"))
    assert len(scores) == 1
    seen = StepsSeen()
    _, resumed = run(interrupted, seen)
    assert seen.steps == list(range(7, 13)), seen.steps  # steps 1-6 come from checkpoint-6, not retrained
    assert list((tmp_path / "teacher-scores").glob("*.parquet")) == scores  # the teacher scores read back
    for got, want in zip(resumed.encode_document(TEXTS), trained.model.encode_document(TEXTS), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_excluded_sources_reach_no_training_set(tiny_medeir_init, icd_hpo_data, tmp_path):
    held = finetune.source_texts(str(icd_hpo_data), ("hpo",))

    def texts(recipe):
        sets = colbert.training_sets(recipe)
        columns = ("anchor", "query", "positive", "negative_1")
        return sets, {t for ds in sets.values() for c in columns if c in ds.column_names for t in ds[c]}

    every = tiny_recipe(tiny_medeir_init, icd_hpo_data, tmp_path / "all", "distill_kl_rows=100", "pair_rows=300")
    _, with_hpo = texts(every)
    assert any(normalize(t) in held for t in with_hpo), "the test needs HPO text in the full selection"
    without = dataclasses.replace(every, output_dir=str(tmp_path / "without"), exclude_sources=["hpo"])
    sets, without_hpo = texts(without)
    assert {"pairs_hard", "distill_kl"} <= set(sets) and without_hpo
    assert not any(normalize(t) in held for t in without_hpo)


def test_the_colbert_and_dense_trainers_share_their_settings(tmp_path):
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoderTrainingArguments

    recipe = load_recipe(ColbertRecipe, None, [f"output_dir={tmp_path}", "batch_size=8", "lr=3e-5", "max_steps=9"])
    args = colbert.training_arguments(recipe, save_strategy="steps", save_steps=3)
    dense = finetune.training_arguments(recipe, save_strategy="steps", save_steps=3)
    assert isinstance(args, MultiVectorEncoderTrainingArguments)
    for name in ("output_dir", "per_device_train_batch_size", "learning_rate", "max_steps", "seed", "save_steps"):
        assert getattr(args, name) == getattr(dense, name), name
    assert args.batch_sampler == dense.batch_sampler and args.optim == dense.optim
    assert args.max_length == {"query": recipe.train_query_length, "document": recipe.train_document_length}


def test_the_colbert_recipe_loads():
    recipe = load_recipe(ColbertRecipe, REPO / "train" / "recipes" / "colbert-small.yaml")
    assert recipe.output_dir.startswith("runs/") and recipe.projection_dim == 128
    assert recipe.document_length == 8192 and recipe.init == "models/medeir-small"
    assert recipe.freeze_encoder  # the shipped model keeps MedEIR-small's encoder


def test_the_projection_trains_at_its_own_rate(tiny_medeir_init, icd_hpo_data, tmp_path):
    recipe = tiny_recipe(tiny_medeir_init, icd_hpo_data, tmp_path, "lr=1e-5", "projection_lr=1e-3", "distill_kl_rows=0")
    model = colbert.load_model(recipe)
    trainer = colbert.trainer_for(recipe, model, colbert.training_sets(recipe))
    trainer.create_optimizer()
    rates = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    projection = next(m for m in model if isinstance(m, colbert.Dense))
    assert {rates[id(p)] for p in projection.parameters()} == {1e-3}
    encoder = [p for name, p in model.named_parameters() if name.startswith("0.")]
    assert encoder and {rates[id(p)] for p in encoder} == {1e-5}
    assert len(rates) == len(list(model.parameters()))  # every parameter trains, each in one group
    for wrong in ("projection_lr=0", "projection_lr=-1e-3"):
        bad = dataclasses.replace(recipe, projection_lr=float(wrong.split("=")[1]))
        with pytest.raises(ValueError, match="projection_lr must be positive"):
            colbert.projection_rate(bad, model)


def test_reversed_rows_train_a_kind_the_other_way_round(tiny_medeir_init, icd_hpo_data, tmp_path):
    recipe = tiny_recipe(
        tiny_medeir_init,
        icd_hpo_data,
        tmp_path,
        "distill_kl_rows=0",
        "reversed_kinds=[hpo_term_definition]",
        "reversed_rows=50",
    )
    sets = colbert.training_sets(recipe)
    turned = sets["reversed"]
    assert turned.column_names == ["anchor", "positive"] and len(turned) == 50
    pairs = DataBuild(str(icd_hpo_data)).pairs_dataset()
    kinds = {(p, a): k for a, p, k in zip(pairs["anchor"], pairs["positive"], pairs["kind"], strict=True)}
    assert {kinds[row] for row in zip(turned["anchor"], turned["positive"], strict=True)} == {"hpo_term_definition"}
    assert "hpo_term_definition" not in recipe.pair_kinds  # the kind is trained only reversed here
    without = dataclasses.replace(recipe, output_dir=str(tmp_path / "without"), exclude_sources=["hpo"])
    assert "reversed" not in colbert.training_sets(without)  # a left-out source is not trained reversed either
    with pytest.raises(ValueError, match="reversed_rows needs reversed_kinds"):
        colbert.reversed_pairs(dataclasses.replace(recipe, reversed_kinds=None))


def test_a_frozen_encoder_keeps_the_init_weights_while_the_projection_trains(tiny_medeir_init, icd_hpo_data, tmp_path):
    recipe = tiny_recipe(tiny_medeir_init, icd_hpo_data, tmp_path, "freeze_encoder=true", "distill_kl_rows=0")
    model = colbert.load_model(recipe)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    sets = colbert.training_sets(recipe)
    trainer = colbert.trainer_for(recipe, model, sets)
    finetune.run_to_final(recipe, trainer, model, sets)
    projection = next(m for m in model if isinstance(m, colbert.Dense))
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in projection.parameters()}  # the encoder is not even in the optimizer
    encoder = [name for name in start if name.startswith("0.")]
    assert encoder and all(torch.equal(dict(model.named_parameters())[n], start[n]) for n in encoder)
    moved = [n for n in start if n not in encoder and not torch.equal(dict(model.named_parameters())[n], start[n])]
    assert moved, "the projection did not train"
