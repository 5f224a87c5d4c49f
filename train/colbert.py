"""A late-interaction (ColBERT) MedEIR: one 128-dim vector per token, scored with MaxSim, trained with
sentence-transformers' multi-vector trainer.

    python -m train.colbert --recipe train/recipes/colbert-small.yaml [--set key=value ...]

The start is a dense MedEIR SentenceTransformer folder (models/medeir-small): `MultiVectorEncoder(init,
trust_remote_code=True)` keeps its encoder, drops the mean pooling and adds a token-level projection (Dense, no bias,
`projection_dim` outputs), the scoring mask (MultiVectorMask: padding, and punctuation in documents, and in queries with
`skip_query_punctuation`; in documents also the `skip_frequent_tokens` tokens that most of the build's training texts
hold, `frequent_tokens`) and a token-level Normalize. Queries are cut at `query_length` tokens and documents at
`document_length` (the model's whole 8,192-token context) once trained; at `train_query_length` and
`train_document_length` while training. The model expands no queries (no [MASK] padding), so a trained query length
can be raised for use: a query's MaxSim only gains the terms of its further tokens.

Objectives, each a dataset with its own loss, sampled together in proportion to their sizes:

    pairs       (anchor, positive[, negative_1..k]) from the data build (`train.finetune.training_pairs`: the build's
                mix, `pair_rows`, `pair_kinds`, `exclude_sources`); MaxSim scores of in-batch and hard negatives,
                multiple-negatives ranking loss
    reversed    (anchor, positive) = a pair's (positive, anchor) for `reversed_rows` rows of `reversed_kinds`: MaxSim
                is not symmetric, so a projection trained only on term -> definition has never scored a running-
                prose query against a short name; in-batch negatives, multiple-negatives ranking loss
    distill_kl  (query, positive, negative_1..k) -> a dense teacher's cosine scores (`kl_teachers`: the init model,
                all-MiniLM-L6-v2, or any SentenceTransformer folder; several are averaged); KL divergence between the
                teacher's and the MaxSim score distributions. Teacher scores are computed once per run and kept in
                `<output_dir>/teacher-scores/`, so a resumed run reads them back

Checkpoints every `save_steps`; a restarted run resumes from the newest one. The result, `<output_dir>/final`, loads
offline with `MultiVectorEncoder(path, trust_remote_code=True)`; the MedEIR remote code travels inside it.
"""

import dataclasses
import hashlib
import json
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Transformer
from sentence_transformers.base.modules.dense import Dense
from sentence_transformers.multi_vector_encoder import (
    MultiVectorEncoder,
    MultiVectorEncoderTrainer,
    MultiVectorEncoderTrainingArguments,
)
from sentence_transformers.multi_vector_encoder.evaluation import MultiVectorInformationRetrievalEvaluator
from sentence_transformers.multi_vector_encoder.losses import (
    CachedMultiVectorMultipleNegativesRankingLoss,
    MultiVectorDistillKLDivLoss,
    MultiVectorMultipleNegativesRankingLoss,
)
from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask
from transformers import set_seed

from corpus.dataset import DataBuild
from train import finetune
from train.recipe import recipe_from_command_line
from train.sentence_transformers_files import is_multi_vector_folder


@dataclass
class ColbertRecipe:
    init: str = "models/medeir-small"  # a dense MedEIR SentenceTransformer folder (or a MultiVectorEncoder folder)
    data: str = "data"
    output_dir: str = "runs/colbert"
    # the multi-vector head
    projection_dim: int = 128  # width of every token vector
    query_length: int = 128  # query tokens kept once trained (saved with the model)
    train_query_length: int = 32  # query tokens kept while training
    document_length: int = 8192  # document tokens kept once trained (saved with the model)
    train_document_length: int = 256  # document tokens kept while training
    skip_punctuation: bool = True  # document tokens that are punctuation are not scored (ColBERT's skiplist)
    skip_query_punctuation: bool = False  # nor are query tokens that are punctuation
    skip_frequent_tokens: int = 0  # nor are document tokens among the N held by most training texts (function words)
    # pairs
    pair_loss: str = "mnrl"  # mnrl | cached_mnrl
    pair_rows: int | None = None  # rows sampled (seeded, uniformly) from the training pairs; None: every row
    pair_kinds: list[str] | None = None  # only these kinds (None: every kind), in the file's proportions
    hard_negatives: int = 1  # hard negatives per row from the build (rows with fewer train in-batch only)
    exclude_sources: list[str] | None = None  # sources (corpus.build names) none of whose text is trained on
    reversed_kinds: list[str] | None = None  # pair kinds also trained the other way round: positive -> anchor
    reversed_rows: int = 0  # rows of `reversed_kinds` trained reversed (in-batch negatives), 0 = off
    scale: float = 1.0  # multiplies MaxSim scores before the softmax (MaxSim already spans ~0..query tokens)
    mini_batch_size: int = 32  # rows per forward pass of the pair loss
    # distillation of a dense teacher's scores
    distill_kl_rows: int = 0  # pair rows with `hard_negatives` negatives scored by the teachers, 0 = off
    kl_teachers: list[str] | None = None  # init | minilm | mpnet | a SentenceTransformer folder; None: [init]
    teacher_max_seq_length: int | None = 256  # the teachers' window in tokens; None: their own
    kl_temperature: float = 1.0  # the student's (MaxSim scores)
    kl_teacher_temperature: float = 0.05  # the teachers' (cosine scores lie within a few tenths of each other)
    # optimisation
    freeze_encoder: bool = False  # the encoder keeps the init's weights, computes no gradients; the projection trains
    batch_size: int = 32
    lr: float = 1e-4
    projection_lr: float | None = None  # the projection's rate when it differs from the encoder's `lr`
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    epochs: float = 1.0
    max_steps: int = -1
    # evaluation and checkpoints
    eval_steps: int = 100
    eval_queries: int = 200  # validation: retrieval of this many anchors' positives among twice as many pairs
    save_steps: int = 100
    save_total_limit: int = 2
    logging_steps: int = 10
    attn_implementation: str = "sdpa"
    bf16: bool | None = None  # bf16 autocast; None: on a CUDA GPU only
    seed: int = 0


def pairs_recipe(recipe: ColbertRecipe) -> finetune.FinetuneRecipe:
    """The recipe's pair selection and validation settings as train.finetune reads them, so both trainers draw the
    same rows from a build (and leave the same sources out)."""
    return finetune.FinetuneRecipe(
        init=recipe.init,
        data=recipe.data,
        output_dir=recipe.output_dir,
        pair_rows=recipe.pair_rows,
        pair_kinds=recipe.pair_kinds,
        hard_negatives=recipe.hard_negatives,
        exclude_sources=recipe.exclude_sources,
        eval_queries=recipe.eval_queries,
        seed=recipe.seed,
    )


def load_model(recipe: ColbertRecipe) -> MultiVectorEncoder:
    """The init as a MultiVectorEncoder: Transformer -> Dense(projection_dim) -> MultiVectorMask -> Normalize, with
    the recipe's query and document lengths and skiplist, its encoder frozen with `freeze_encoder`. A dense init gets
    a fresh projection (seeded); a multi-vector init keeps its own, which must then have `projection_dim` outputs."""
    set_seed(recipe.seed)
    model = MultiVectorEncoder(
        recipe.init, trust_remote_code=True, model_kwargs={"attn_implementation": recipe.attn_implementation}
    )
    modules = list(model)
    transformer = next(m for m in modules if isinstance(m, Transformer))
    position, dense = next((i, m) for i, m in enumerate(modules) if isinstance(m, Dense))
    if dense.out_features != recipe.projection_dim:
        if is_multi_vector_folder(recipe.init):
            raise ValueError(
                f"{recipe.init} projects to {dense.out_features} dimensions, the recipe asks for "
                f"{recipe.projection_dim}: start from its dense model instead, or keep projection_dim"
            )
        model[position] = Dense(
            in_features=dense.in_features,
            out_features=recipe.projection_dim,
            bias=False,
            activation_function=torch.nn.Identity(),
            module_input_name="token_embeddings",
        )
    transformer.query_length = recipe.query_length
    transformer.document_length = recipe.document_length
    if model.max_seq_length < recipe.document_length:
        raise ValueError(f"document_length {recipe.document_length} exceeds the model's {model.max_seq_length} tokens")
    mask = next(m for m in model if isinstance(m, MultiVectorMask))
    vocabulary = model.tokenizer.get_vocab()  # the skiplist holds tokens, so only punctuation that is one token
    skipped = [
        task for task, on in (("query", recipe.skip_query_punctuation), ("document", recipe.skip_punctuation)) if on
    ]
    words = [p for p in string.punctuation if p in vocabulary] if skipped else []
    if recipe.skip_frequent_tokens:
        if recipe.skip_query_punctuation:  # the mask keeps one list for every side it applies to
            raise ValueError(
                "skip_frequent_tokens drops document tokens only, and the scoring mask has one skiplist for both "
                "sides: it cannot be combined with skip_query_punctuation"
            )
        words += frequent_tokens(recipe, model.tokenizer, recipe.skip_frequent_tokens)
        skipped = ["document"]
    mask.skiplist_words = list(dict.fromkeys(words))
    mask.skiplist_tasks = skipped or ["document"]
    mask.resolve_with_tokenizer(model.tokenizer)
    if recipe.freeze_encoder:  # the backward pass then stops at the projection
        transformer.requires_grad_(False)
    return model


def frequent_tokens(recipe: ColbertRecipe, tokenizer, n: int) -> list[str]:
    """The `n` tokens that the most texts of the build's training corpus hold (document frequency; special tokens
    aside; ties by token id), the recipe's excluded sources left out. Mostly function words ("of", "the", "a", "or",
    "in"), which in a document match the same word in any query; dropping them shrinks the index (what it does to
    retrieval: docs/experiments.md, *Late interaction*)."""
    if n < 0:
        raise ValueError(f"skip_frequent_tokens must be 0 (off) or a positive number of tokens, not {n}")
    corpus = finetune.without_sources(DataBuild(recipe.data).corpus_dataset(), pairs_recipe(recipe))
    texts = corpus["text"]
    counts: Counter[int] = Counter()
    for start in range(0, len(texts), 4096):
        encoded = tokenizer(texts[start : start + 4096], add_special_tokens=False, truncation=True, max_length=8192)
        for ids in encoded["input_ids"]:
            counts.update(set(ids))
    special = set(tokenizer.all_special_ids)
    ranked = sorted((token for token in counts if token not in special), key=lambda token: (-counts[token], token))
    return tokenizer.convert_ids_to_tokens(ranked[:n])


def pair_datasets(recipe: ColbertRecipe) -> dict[str, datasets.Dataset]:
    """train.finetune's pair datasets of the recipe's rows: "pairs_hard" (anchor, positive, negative_1..k) for rows
    with enough hard negatives, "pairs" (anchor, positive) for the rest."""
    return finetune.pair_datasets(pairs_recipe(recipe), model=None)


def reversed_pairs(recipe: ColbertRecipe) -> datasets.Dataset | None:
    """`reversed_rows` pair rows of `reversed_kinds` (drawn with their own seed from the rows the recipe's sources
    allow) turned round: the positive is the anchor and the anchor the positive; their hard negatives are dropped (they
    are positives' texts, not anchors')."""
    if not recipe.reversed_rows:
        return None
    if not recipe.reversed_kinds:
        raise ValueError("reversed_rows needs reversed_kinds: the pair kinds to train the other way round")
    selection = dataclasses.replace(
        pairs_recipe(recipe), pair_kinds=recipe.reversed_kinds, pair_rows=recipe.reversed_rows, seed=recipe.seed + 2
    )
    rows = finetune.training_pairs(selection)
    return datasets.Dataset.from_dict({"anchor": rows["positive"], "positive": rows["anchor"]})


def kl_rows(recipe: ColbertRecipe) -> datasets.Dataset:
    """`distill_kl_rows` pair rows with at least `hard_negatives` (and at least one) negatives, drawn with their
    own seed from the rows `training_pairs` allows (same kinds, same sources left out), as (query, positive,
    negative_1..k)."""
    k = max(recipe.hard_negatives, 1)
    selection = dataclasses.replace(pairs_recipe(recipe), pair_rows=None, seed=recipe.seed + 1)
    rows = finetune.training_pairs(selection).filter(lambda negatives: len(negatives) >= k, input_columns="negatives")
    rows = rows.select(range(min(recipe.distill_kl_rows, len(rows))))
    columns = {"query": rows["anchor"], "positive": rows["positive"]}
    negatives = rows["negatives"]
    columns |= {f"negative_{i + 1}": [n[i] for n in negatives] for i in range(k)}
    return datasets.Dataset.from_dict(columns)


def teacher_folder(name: str, recipe: ColbertRecipe) -> str:
    """The SentenceTransformer folder of a KL teacher: "init" is the recipe's own start."""
    return recipe.init if name == "init" else finetune.teacher_path(name)


def teacher_scores(recipe: ColbertRecipe, rows: datasets.Dataset) -> np.ndarray:
    """The mean over `kl_teachers` of each teacher's cosine score between a row's query and every candidate
    (positive, negative_1..k): shape (rows, candidates). Every distinct text is encoded once per teacher."""
    candidates = [c for c in rows.column_names if c != "query"]
    queries = list(rows["query"])
    documents = [list(rows[c]) for c in candidates]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    total = np.zeros((len(rows), len(candidates)), dtype=np.float32)
    teachers = recipe.kl_teachers or ["init"]
    for name in teachers:
        teacher = SentenceTransformer(teacher_folder(name, recipe), trust_remote_code=True, device=device)
        if recipe.teacher_max_seq_length:
            teacher.max_seq_length = recipe.teacher_max_seq_length
        texts = list(dict.fromkeys(t for column in documents for t in column))
        print(f"teacher {name}: {len(set(queries)):,} queries, {len(texts):,} candidates")
        query_vectors = encode(teacher.encode_query, list(dict.fromkeys(queries)))
        document_vectors = encode(teacher.encode_document, texts)
        q = np.stack([query_vectors[t] for t in queries])
        for j, column in enumerate(documents):
            total[:, j] += (q * np.stack([document_vectors[t] for t in column])).sum(-1)
    return total / len(teachers)


def encode(embed, texts: list[str]) -> dict[str, np.ndarray]:
    """Normalised embeddings of distinct texts, by text."""
    vectors = embed(texts, batch_size=128, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return dict(zip(texts, np.asarray(vectors, dtype=np.float32), strict=True))


def distill_dataset(recipe: ColbertRecipe) -> datasets.Dataset | None:
    """The KL rows with their teacher scores as "label", read back from `<output_dir>/teacher-scores/` when this
    selection was scored before (a resumed run), computed and written there otherwise."""
    if not recipe.distill_kl_rows:
        return None
    settings = {
        key: getattr(recipe, key)
        for key in (
            "init",
            "data",
            "pair_kinds",
            "exclude_sources",
            "hard_negatives",
            "distill_kl_rows",
            "kl_teachers",
            "teacher_max_seq_length",
            "seed",
        )
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(recipe.output_dir) / "teacher-scores" / f"{digest}.parquet"
    if path.is_file():
        return datasets.Dataset.from_parquet(str(path))
    rows = kl_rows(recipe)
    scored = rows.add_column("label", teacher_scores(recipe, rows).tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    scored.to_parquet(str(tmp))
    tmp.rename(path)  # a complete file or none
    return scored


def training_sets(recipe: ColbertRecipe) -> dict[str, datasets.Dataset]:
    """Every dataset the recipe trains on, by name ("pairs_hard", "pairs", "reversed", "distill_kl"); refuses a
    recipe that trains nothing."""
    sets = pair_datasets(recipe)
    turned = reversed_pairs(recipe)
    if turned is not None:
        sets["reversed"] = turned
    distill = distill_dataset(recipe)
    if distill is not None and len(distill):
        sets["distill_kl"] = distill
    sets = {name: ds for name, ds in sets.items() if len(ds)}
    if not sets:
        raise ValueError("the recipe trains nothing: its pair selection is empty and distill_kl_rows is 0")
    return sets


def losses_for(recipe: ColbertRecipe, model: MultiVectorEncoder, names: list[str]) -> dict[str, torch.nn.Module]:
    """The loss of every dataset: MaxSim multiple-negatives ranking for pairs, MaxSim KL for distillation."""
    if recipe.pair_loss == "mnrl":
        ranking = MultiVectorMultipleNegativesRankingLoss(
            model, scale=recipe.scale, mini_batch_size=recipe.mini_batch_size
        )
    elif recipe.pair_loss == "cached_mnrl":
        ranking = CachedMultiVectorMultipleNegativesRankingLoss(
            model, scale=recipe.scale, mini_batch_size=recipe.mini_batch_size
        )
    else:
        raise ValueError(f"unknown pair_loss {recipe.pair_loss!r}: mnrl or cached_mnrl")
    distill = MultiVectorDistillKLDivLoss(
        model,
        student_temperature=recipe.kl_temperature,
        teacher_temperature=recipe.kl_teacher_temperature,
        mini_batch_size=recipe.mini_batch_size,
    )
    return {name: distill if name == "distill_kl" else ranking for name in names}


def training_arguments(recipe: ColbertRecipe, **settings) -> MultiVectorEncoderTrainingArguments:
    """train.finetune's arguments (the one definition every sentence-transformers run here shares: schedule, seed,
    checkpoints, batches without duplicate texts, fused AdamW, bf16 on a GPU) as the multi-vector trainer's, with
    the training caps of queries and documents."""
    dense = finetune.training_arguments(recipe, **settings)
    values = {field.name: getattr(dense, field.name) for field in dataclasses.fields(dense) if field.init}
    return MultiVectorEncoderTrainingArguments(
        **values, max_length={"query": recipe.train_query_length, "document": recipe.train_document_length}
    )


def validation_evaluator(recipe: ColbertRecipe) -> MultiVectorInformationRetrievalEvaluator | None:
    """train.finetune's validation retrieval (each anchor must find its positive among the validation positives),
    scored with MaxSim."""
    dense = finetune.validation_evaluator(pairs_recipe(recipe))
    if dense is None:
        return None
    return MultiVectorInformationRetrievalEvaluator(
        queries=dict(zip(dense.queries_ids, dense.queries, strict=True)),
        corpus=dict(zip(dense.corpus_ids, dense.corpus, strict=True)),
        relevant_docs=dense.relevant_docs,
        name="validation",
        ndcg_at_k=[10],
        mrr_at_k=[10],
        accuracy_at_k=[1],
        precision_recall_at_k=[10],
        map_at_k=[10],
        batch_size=128,
        show_progress_bar=False,
    )


def projection_rate(recipe: ColbertRecipe, model: MultiVectorEncoder) -> dict[str, float]:
    """The trainer's learning_rate_mapping that gives the token projection its own rate (`projection_lr`), or none.
    The projection starts random while the encoder starts trained, so the two may want different rates (to train the
    projection alone, `freeze_encoder` is the cheaper way: the encoder then computes no gradients). Its parameters are
    named by the module's position in the model (each loss holds the model, so the names of the trainer's optimizer end
    in `<position>.linear.weight`)."""
    if recipe.projection_lr is None:
        return {}
    if recipe.projection_lr <= 0:
        raise ValueError(f"projection_lr must be positive, got {recipe.projection_lr}")
    position = next(i for i, m in enumerate(model) if isinstance(m, Dense))
    return {rf"(^|\.){position}\.linear\.(weight|bias)$": recipe.projection_lr}


def trainer_for(
    recipe: ColbertRecipe, model: MultiVectorEncoder, train_sets: dict[str, datasets.Dataset]
) -> MultiVectorEncoderTrainer:
    """The multi-vector trainer of the run: every dataset with its loss, sampled in proportion to its size,
    evaluated on the validation pairs."""
    evaluator = validation_evaluator(recipe)
    settings = finetune.run_settings(recipe, evaluated=evaluator is not None)
    args = training_arguments(recipe, **settings, learning_rate_mapping=projection_rate(recipe, model))
    return MultiVectorEncoderTrainer(
        model=model,
        args=args,
        train_dataset=datasets.DatasetDict(train_sets),
        loss=losses_for(recipe, model, list(train_sets)),
        evaluator=evaluator,
    )


def train(recipe: ColbertRecipe) -> Path:
    model = load_model(recipe)
    train_sets = training_sets(recipe)
    return finetune.run_to_final(recipe, trainer_for(recipe, model, train_sets), model, train_sets)


def main() -> None:
    print(f"final model: {train(recipe_from_command_line(ColbertRecipe, __doc__))}")


if __name__ == "__main__":
    main()
