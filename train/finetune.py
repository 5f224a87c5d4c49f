"""Contrastive fine-tuning and distillation with the sentence-transformers trainer.

    python -m train.finetune --recipe train/recipes/finetune-small.yaml
    python -m train.finetune --recipe train/recipes/distill-small.yaml      # distillation only
    accelerate launch --config_file train/accelerate/multi-gpu.yaml -m train.finetune --recipe ...

A recipe composes objectives; each is a dataset with its own loss, sampled together by the trainer:

    pairs        (anchor, positive[, negative_1..k]) from the data build; in-batch negatives plus the build's hard
                 negatives (siblings, Excludes notes, co-hyponyms), optionally more mined with the starting model
                 (never a true positive); CachedMultipleNegativesRankingLoss or MultipleNegativesRankingLoss
    distill_mse  corpus texts (general and medical) -> the teacher's embedding; MSELoss keeps general quality
    distill_kl   (query, positive, negatives) -> the teacher's similarity scores; DistillKLDivLoss, as
                 BiomedBERT-small distilled its teachers' scores

Evaluation during training: retrieval on the validation pairs, and (monitoring only, never for model choice) a
seeded sample of queries of each public benchmark. Checkpoints every `save_steps`; a restarted run resumes from
the newest one. The result is a SentenceTransformer folder (MedEIR remote code included) in `<output_dir>/final`.
"""

import argparse
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers import losses as st_losses
from sentence_transformers.evaluation import InformationRetrievalEvaluator, SequentialEvaluator
from sentence_transformers.training_args import BatchSamplers, MultiDatasetBatchSamplers
from sentence_transformers.util import mine_hard_negatives
from transformers.trainer_utils import get_last_checkpoint

from train.initialize import minilm_path
from train.recipe import add_recipe_arguments, load_recipe, save_recipe

BENCHMARKS = ("hpo_layperson", "icd10cm_inclusion", "wordnet_gloss")


@dataclass
class FinetuneRecipe:
    init: str  # a MedEIR folder that SentenceTransformer loads (train.initialize / train.pretrain output)
    data: str = "data"
    output_dir: str = "runs/finetune"
    # pairs
    pair_loss: str = "cached_mnrl"  # cached_mnrl | mnrl | none
    pair_kinds: dict[str, int | None] | None = None  # kind -> most rows to use (null: all); None: every kind, all
    long_pair_kinds: list[str] | None = None  # kinds with long texts: own dataset, CachedMNRL in mini-batches
    long_mini_batch_size: int = 8
    hard_negatives: int = 1  # hard negatives per row taken from the build (rows with fewer train in-batch only)
    mined_negatives: int = 0  # extra negatives mined with the starting model
    mine_pool: int = 200_000  # positives searched when mining
    # distillation from a teacher
    teacher: str | None = "minilm"
    distill_mse_texts: int = 0  # corpus texts for embedding MSE, 0 = off
    distill_kl_rows: int = 0  # pair rows with hard negatives for score KL, 0 = off
    kl_temperature: float = 0.05
    # optimisation
    batch_size: int = 64
    mini_batch_size: int = 32
    lr: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    epochs: float = 1.0
    max_steps: int = -1
    max_seq_length: int = 128
    prompts: dict[str, str] | None = None  # {"query": "...", "document": "..."}
    # evaluation and checkpoints
    eval_steps: int = 200
    eval_queries: int = 300
    eval_corpus: int = 5000  # monitoring: the sampled queries' documents plus this many others
    save_steps: int = 200
    save_total_limit: int = 2
    logging_steps: int = 10
    attn_implementation: str = "sdpa"
    seed: int = 0


def teacher_path(name: str) -> str:
    return str(minilm_path()) if name == "minilm" else name


def load_model(path: str, recipe: FinetuneRecipe) -> SentenceTransformer:
    model = SentenceTransformer(
        path, trust_remote_code=True, model_kwargs={"attn_implementation": recipe.attn_implementation}
    )
    model.max_seq_length = recipe.max_seq_length
    if recipe.prompts:
        model.prompts = dict(recipe.prompts)
    return model


def pair_datasets(recipe: FinetuneRecipe, model: SentenceTransformer) -> dict[str, datasets.Dataset]:
    """Rows with enough hard negatives as (anchor, positive, negative_1..k); the rest as (anchor, positive)."""
    pairs = datasets.load_dataset("parquet", data_files=f"{recipe.data}/pairs/train.parquet", split="train")
    pairs = pairs.shuffle(seed=recipe.seed)
    if recipe.pair_kinds is not None:
        kinds = pairs["kind"]
        taken: dict[str, int] = {}
        keep = []
        for i, kind in enumerate(kinds):  # the first `cap` rows of each kind, in shuffled order
            if kind in recipe.pair_kinds and taken.get(kind, 0) < (recipe.pair_kinds[kind] or len(kinds)):
                taken[kind] = taken.get(kind, 0) + 1
                keep.append(i)
        missing = sorted(set(recipe.pair_kinds) - set(taken))
        if missing:
            raise ValueError(f"pair kinds not in {recipe.data}/pairs/train.parquet: {missing}")
        pairs = pairs.select(keep)
    k = recipe.hard_negatives
    long_kinds = set(recipe.long_pair_kinds or [])

    def expand(row):
        return {f"negative_{i + 1}": row["negatives"][i] for i in range(k)}

    out = {}
    for prefix, keep_long in (("pairs", False), ("long_pairs", True)):
        part = pairs.filter(lambda kind, keep_long=keep_long: (kind in long_kinds) == keep_long, input_columns="kind")
        with_negatives = part.filter(lambda negatives: len(negatives) >= k > 0, input_columns="negatives")
        plain = part.filter(lambda negatives: not len(negatives) >= k > 0, input_columns="negatives")
        if len(with_negatives):
            columns = ["anchor", "positive"] + [f"negative_{i + 1}" for i in range(k)]
            out[f"{prefix}_hard"] = with_negatives.map(expand).select_columns(columns)
        if len(plain):
            out[prefix] = plain.select_columns(["anchor", "positive"])
    if recipe.mined_negatives:  # only short texts: mining encodes every positive
        out = {name: mine(ds, model, recipe) if name.startswith("pairs") else ds for name, ds in out.items()}
    return out


def mine(dataset: datasets.Dataset, model: SentenceTransformer, recipe: FinetuneRecipe) -> datasets.Dataset:
    """Add negatives mined with the starting model: ranks 10-50, and never within 95% of the positive's score."""
    columns = dataset.column_names
    corpus = list(dict.fromkeys(dataset["positive"]))[: recipe.mine_pool]
    mined = mine_hard_negatives(
        dataset.select_columns(["anchor", "positive"]),
        model,
        corpus=corpus,
        range_min=10,
        range_max=50,
        relative_margin=0.05,
        num_negatives=recipe.mined_negatives,
        sampling_strategy="top",
        output_format="n-tuple",
        batch_size=256,
    )
    mined = mined.rename_columns({f"negative_{i + 1}": f"mined_{i + 1}" for i in range(recipe.mined_negatives)})
    # mine_hard_negatives drops rows it finds no negative for; keep the build's negatives of the rows it kept
    by_pair = {(a, p): i for i, (a, p) in enumerate(zip(dataset["anchor"], dataset["positive"], strict=True))}
    extra = [c for c in columns if c.startswith("negative_")]
    index = [by_pair[(a, p)] for a, p in zip(mined["anchor"], mined["positive"], strict=True)]
    for column in extra:
        mined = mined.add_column(column, [dataset[column][i] for i in index])
    return mined


def distill_datasets(recipe: FinetuneRecipe) -> dict[str, datasets.Dataset]:
    """Teacher targets, computed once per run and cached in the output folder, so a resumed run skips them."""
    if not recipe.teacher or not (recipe.distill_mse_texts or recipe.distill_kl_rows):
        return {}
    manifest = Path(recipe.data) / "manifest.json"
    key = {
        "teacher": recipe.teacher,
        "data": json.loads(manifest.read_text())["dataset_version"] if manifest.exists() else str(recipe.data),
        "mse_texts": recipe.distill_mse_texts,
        "kl_rows": recipe.distill_kl_rows,
        "seed": recipe.seed,
    }
    cache = Path(recipe.output_dir) / "teacher-targets"
    if (cache / "key.json").exists() and json.loads((cache / "key.json").read_text()) == key:
        print(f"teacher targets from {cache}")
        return {name.name: datasets.load_from_disk(str(name)) for name in sorted(cache.iterdir()) if name.is_dir()}
    out = compute_teacher_targets(recipe)
    shutil.rmtree(cache, ignore_errors=True)
    for name, dataset in out.items():
        dataset.save_to_disk(str(cache / name))
    (cache / "key.json").write_text(json.dumps(key, indent=2) + "\n")  # written last: marks the cache complete
    return out


def compute_teacher_targets(recipe: FinetuneRecipe) -> dict[str, datasets.Dataset]:
    """Embeddings of corpus texts (for MSE) and similarity scores over hard-negative rows (for KL)."""
    teacher = SentenceTransformer(teacher_path(recipe.teacher), device="cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    if recipe.distill_mse_texts:
        corpus = datasets.load_dataset("parquet", data_files=f"{recipe.data}/corpus/train.parquet", split="train")
        corpus = corpus.shuffle(seed=recipe.seed).select(range(min(recipe.distill_mse_texts, len(corpus))))
        texts = corpus["text"]
        labels = teacher.encode(texts, batch_size=256, show_progress_bar=True, convert_to_numpy=True)
        out["distill_mse"] = datasets.Dataset.from_dict({"text": texts, "label": labels.tolist()})
    if recipe.distill_kl_rows:
        pairs = datasets.load_dataset("parquet", data_files=f"{recipe.data}/pairs/train.parquet", split="train")
        pairs = pairs.filter(lambda negatives: len(negatives) >= 1, input_columns="negatives")
        pairs = pairs.shuffle(seed=recipe.seed + 1).select(range(min(recipe.distill_kl_rows, len(pairs))))
        queries, candidates = (
            pairs["anchor"],
            [[p, n[0]] for p, n in zip(pairs["positive"], pairs["negatives"], strict=True)],
        )
        q = teacher.encode(queries, batch_size=256, convert_to_tensor=True, show_progress_bar=True)
        d = teacher.encode([c for row in candidates for c in row], batch_size=256, convert_to_tensor=True).view(
            len(queries), 2, -1
        )
        scores = torch.einsum("qd,qkd->qk", q, d).cpu().tolist()
        out["distill_kl"] = datasets.Dataset.from_dict(
            {
                "query": queries,
                "positive": [c[0] for c in candidates],
                "negative": [c[1] for c in candidates],
                "label": scores,
            }
        )
    return out


def benchmark_evaluator(recipe: FinetuneRecipe, name: str) -> InformationRetrievalEvaluator | None:
    """A seeded sample of a benchmark's queries over their documents plus `eval_corpus` others (monitoring only)."""
    root = Path(recipe.data) / "benchmarks" / name
    if not (root / "queries.parquet").exists():
        return None
    read = lambda f: datasets.load_dataset("parquet", data_files=str(root / f), split="train")  # noqa: E731
    queries, corpus, qrels = read("queries.parquet"), read("corpus.parquet"), read("qrels.parquet")
    relevant: dict[str, set[str]] = {}
    for q, d in zip(qrels["query_id"], qrels["doc_id"], strict=True):
        relevant.setdefault(q, set()).add(d)
    rng = random.Random(recipe.seed)
    ids = rng.sample(sorted(relevant), min(recipe.eval_queries, len(relevant)))
    text = dict(zip(queries["id"], queries["text"], strict=True))
    documents = dict(zip(corpus["id"], corpus["text"], strict=True))
    chosen = {d for q in ids for d in relevant[q]}
    others = sorted(set(documents) - chosen)
    chosen |= set(rng.sample(others, min(recipe.eval_corpus, len(others))))
    return InformationRetrievalEvaluator(
        queries={q: text[q] for q in ids},
        corpus={d: documents[d] for d in sorted(chosen)},
        relevant_docs={q: relevant[q] for q in ids},
        name=name,
        ndcg_at_k=[10],
        mrr_at_k=[10],
        accuracy_at_k=[1, 10],
        precision_recall_at_k=[10],
        map_at_k=[10],
        batch_size=256,
        query_prompt_name="query" if recipe.prompts else None,
        corpus_prompt_name="document" if recipe.prompts else None,
        show_progress_bar=False,
    )


def validation_evaluator(recipe: FinetuneRecipe) -> InformationRetrievalEvaluator | None:
    """Validation pairs as retrieval: each anchor must find its positive among all validation positives."""
    path = Path(recipe.data) / "pairs" / "validation.parquet"
    if not path.exists():
        return None
    pairs = datasets.load_dataset("parquet", data_files=str(path), split="train").shuffle(seed=recipe.seed)
    pairs = pairs.select(range(min(2 * recipe.eval_queries, len(pairs))))
    corpus = {f"d{i}": text for i, text in enumerate(dict.fromkeys(pairs["positive"]))}
    doc_id = {text: i for i, text in corpus.items()}
    queries, relevant = {}, {}
    for i, (anchor, positive) in enumerate(zip(pairs["anchor"], pairs["positive"], strict=True)):
        queries[f"q{i}"] = anchor
        relevant[f"q{i}"] = {doc_id[positive]}
    return InformationRetrievalEvaluator(
        queries,
        corpus,
        relevant,
        name="validation",
        ndcg_at_k=[10],
        mrr_at_k=[10],
        accuracy_at_k=[1],
        batch_size=256,
        precision_recall_at_k=[10],
        map_at_k=[10],
        show_progress_bar=False,
        query_prompt_name="query" if recipe.prompts else None,
        corpus_prompt_name="document" if recipe.prompts else None,
    )


def pair_loss(recipe: FinetuneRecipe, model: SentenceTransformer):
    if recipe.pair_loss == "cached_mnrl":
        return st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=recipe.mini_batch_size)
    if recipe.pair_loss == "mnrl":
        return st_losses.MultipleNegativesRankingLoss(model)
    raise ValueError(f"unknown pair_loss {recipe.pair_loss!r}: cached_mnrl, mnrl or none")


def train(recipe: FinetuneRecipe) -> Path:
    output_dir = Path(recipe.output_dir)
    model = load_model(recipe.init, recipe)
    train_sets = pair_datasets(recipe, model) if recipe.pair_loss != "none" else {}
    train_sets |= distill_datasets(recipe)
    if not train_sets:
        raise ValueError("the recipe trains nothing: enable pairs or a distillation objective")
    shared_pair_loss = pair_loss(recipe, model) if recipe.pair_loss != "none" else None
    long_loss = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=recipe.long_mini_batch_size)
    losses = {}
    for name in train_sets:
        if name.startswith("pairs"):
            losses[name] = shared_pair_loss
        elif name.startswith("long_pairs"):
            losses[name] = long_loss
        elif name == "distill_mse":
            teacher_dim = len(train_sets[name][0]["label"])
            student_dim = model.get_sentence_embedding_dimension()
            # a student of another width (e.g. `base`) regresses through a learned projection
            losses[name] = st_losses.MSELoss(model, projection_dim=teacher_dim if teacher_dim != student_dim else None)
        elif name == "distill_kl":
            losses[name] = st_losses.DistillKLDivLoss(model, temperature=recipe.kl_temperature)
    evaluators = [e for e in [validation_evaluator(recipe), *(benchmark_evaluator(recipe, b) for b in BENCHMARKS)] if e]

    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.lr,
        warmup_ratio=recipe.warmup_ratio,
        weight_decay=recipe.weight_decay,
        batch_sampler=BatchSamplers.NO_DUPLICATES,  # a duplicate text in a batch would be a false in-batch negative
        multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL,
        eval_strategy="steps" if evaluators else "no",
        eval_steps=recipe.eval_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        logging_steps=recipe.logging_steps,
        report_to=["tensorboard"],
        bf16=torch.cuda.is_available(),
        seed=recipe.seed,
        prompts=recipe.prompts,
        dataloader_drop_last=True,
        optim="adamw_torch_fused",  # one fused kernel: ~10x faster than the foreach AdamW on a CPU
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=datasets.DatasetDict(train_sets),
        loss=losses,
        evaluator=SequentialEvaluator(evaluators) if evaluators else None,
    )
    save_recipe(recipe, output_dir / "recipe.json")
    sizes = {name: len(ds) for name, ds in train_sets.items()}
    (output_dir / "datasets.json").write_text(json.dumps(sizes, indent=2) + "\n")
    print(f"training sets: {sizes}")
    last = get_last_checkpoint(str(output_dir / "checkpoints")) if (output_dir / "checkpoints").exists() else None
    trainer.train(resume_from_checkpoint=last)
    with (output_dir / "train_log.jsonl").open("w") as f:
        for entry in trainer.state.log_history:
            f.write(json.dumps(entry) + "\n")
    final = output_dir / "final"
    model.save(str(final), create_model_card=False)
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser)
    args = parser.parse_args()
    recipe = load_recipe(FinetuneRecipe, args.recipe, args.overrides)
    print(f"final model: {train(recipe)}")


if __name__ == "__main__":
    main()
