"""Masked language modelling with accelerate: the same script on a laptop CPU and on many GPUs.

    python -m train.pretrain --recipe train/recipes/pretrain-small.yaml
    python -m train.pretrain --recipe train/recipes/pretrain-distill-small.yaml   # objective: distill (train.distill)
    python -m train.pretrain --recipe train/recipes/pretrain-vocab-transfer-small.yaml  # objective: word_distill
    accelerate launch --config_file train/accelerate/multi-gpu.yaml -m train.pretrain --recipe ...

Packed sequences (texts concatenated, each with [CLS] ... [SEP], cut into `seq_len` blocks), dynamic masking
(15%, 80/10/10, whole-word optional) by transformers' collator, bf16 on GPU, gradient accumulation. A checkpoint
(`accelerator.save_state`, named and rotated by accelerate: `checkpoints/checkpoint_<n>`, the newest
`keep_checkpoints` kept) every `save_every` steps; a restarted run resumes from the newest one, skips the
batches it already saw and ends where an uninterrupted run ends. Evaluation reports MLM loss and masked-token
accuracy (a local `evaluate` metric) at the training length and at `eval_length_factors` times it, which shows
whether ALiBi extrapolates. Logs go to tensorboard and to `train_log.jsonl`; the final model to `<output_dir>/final`.

`objective: distill` (and `word_distill`, for a student on another vocabulary) trains the encoder instead to
reproduce a teacher's hidden states layer by layer and its embeddings (train.distill), on texts of the data build
rather than packed blocks, with the same checkpoints, resume and logs; evaluation then reports the student's
agreement with the teacher on held-out texts.
"""

import hashlib
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import evaluate
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, get_linear_schedule_with_warmup

from corpus.dataset import DataBuild
from modeling_medeir import MedEIRForMaskedLM
from train.distill import HiddenStateDistillation, WordAlignedDistillation
from train.recipe import recipe_from_command_line, save_recipe
from train.sentence_transformers_files import write_sentence_transformers_files

METRIC = str(Path(__file__).parent / "metrics" / "masked_accuracy")
DISTILLERS = {"distill": HiddenStateDistillation, "word_distill": WordAlignedDistillation}
OBJECTIVES = ("mlm", *DISTILLERS)


@dataclass
class PretrainRecipe:
    init: str  # a MedEIRForMaskedLM folder (train.initialize writes one)
    data: str = "data"  # the data build (corpus.dataset): its corpus train and validation texts
    output_dir: str = "runs/pretrain"
    seq_len: int = 128  # tokens per packed block (distillation: the longest text)
    batch_size: int = 32
    grad_accum: int = 1  # batches per optimizer step
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 1000
    max_grad_norm: float = 1.0
    mlm_probability: float = 0.15
    whole_word_mask: bool = False
    max_train_texts: int | None = None  # a seeded sample of the corpus, for toy runs
    eval_every: int = 200
    eval_tokens: int = 32768  # validation tokens per evaluated length
    eval_length_factors: list[int] = field(default_factory=lambda: [1, 4, 16])
    save_every: int = 200
    keep_checkpoints: int | None = 2  # newest checkpoints kept (accelerate's total_limit); None keeps all
    attn_implementation: str = "sdpa"
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, fp32 elsewhere
    logger: str = "tensorboard"
    seed: int = 0
    # objective: "mlm", or "distill" (train.distill: hidden-state and embedding distillation from `teacher`; the
    # init must be on a tokenizer that keeps the teacher's ids, and `seq_len` is then the longest text in tokens), or
    # "word_distill" (the same aligned word by word, for a student on another vocabulary: vocabulary transfer)
    objective: Literal["mlm", "distill", "word_distill"] = "mlm"
    teacher: str = "minilm"
    distill_texts: int = 40_000  # texts drawn as train.finetune draws its MSE texts (pool, max chars, exclusions)
    distill_pool: list[str] | None = None  # "corpus" and/or "pairs"
    distill_max_chars: int = 0
    exclude_sources: list[str] | None = None  # sources none of whose text is trained on (leave-one-source-out)
    hidden_weight: float = 1.0
    embedding_weight: float = 1.0
    eval_texts: int = 1000  # held-out corpus texts on which agreement with the teacher is measured
    new_rows_only: bool = True  # word_distill: train only the embeddings of tokens the teacher's vocabulary lacks
    # word_distill: also up to this many words of the pool that use a new row, each read alone (train.distill.
    # covering_words): the rows no drawn text reaches get targets too, at a few tokens a word
    distill_words: int = 0

    # the draw of distillation texts under train.finetune's names, so that train.finetune.mse_texts reads this recipe
    @property
    def distill_mse_texts(self) -> int:
        return self.distill_texts

    @property
    def distill_mse_pool(self) -> list[str] | None:
        return self.distill_pool


def packed_blocks(
    path: Path, tokenizer, seq_len: int, whole_word: bool, max_texts: int | None = None, seed: int = 0
) -> datasets.Dataset:
    """Tokenize a parquet of texts and pack the token stream into `seq_len` blocks (the remainder is dropped)."""
    texts = datasets.load_dataset("parquet", data_files=str(path), split="train")
    if max_texts is not None and max_texts < len(texts):
        texts = texts.shuffle(seed=seed).select(range(max_texts))

    def tokenize(batch):
        return tokenizer(
            batch["text"], return_special_tokens_mask=True, return_offsets_mapping=whole_word, verbose=False
        )

    def pack(batch):
        columns = {key: list(itertools.chain.from_iterable(values)) for key, values in batch.items()}
        total = len(columns["input_ids"]) // seq_len * seq_len
        return {key: [seq[i : i + seq_len] for i in range(0, total, seq_len)] for key, seq in columns.items()}

    tokens = texts.map(tokenize, batched=True, remove_columns=texts.column_names, desc="tokenize")
    tokens = tokens.remove_columns([c for c in tokens.column_names if c == "token_type_ids"])
    return tokens.map(pack, batched=True, batch_size=2000, desc=f"pack into {seq_len}-token blocks")


def evaluation_batches(recipe: PretrainRecipe, tokenizer, validation: Path) -> dict[int, list[dict]]:
    """Masked validation batches per length, masked once with a fixed seed so every evaluation sees the same."""
    collator = DataCollatorForLanguageModeling(
        tokenizer, mlm_probability=recipe.mlm_probability, whole_word_mask=recipe.whole_word_mask, seed=recipe.seed
    )
    out = {}
    for factor in recipe.eval_length_factors:
        length = recipe.seq_len * factor
        blocks = packed_blocks(validation, tokenizer, length, recipe.whole_word_mask)
        blocks = blocks.select(range(min(len(blocks), max(1, recipe.eval_tokens // length))))
        rows = [blocks[i] for i in range(len(blocks))]
        size = max(1, recipe.batch_size // factor)
        out[length] = [collator(rows[i : i + size]) for i in range(0, len(rows), size)]
    return out


@torch.no_grad()
def evaluate_lengths(model, batches: dict[int, list[dict]], accelerator: Accelerator) -> dict[str, float]:
    model.eval()
    results = {}
    for length, length_batches in batches.items():
        metric = evaluate.load(METRIC)
        loss_sum = count = 0.0
        for batch in length_batches[accelerator.process_index :: accelerator.num_processes]:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            out = model(**batch)
            labelled = int((batch["labels"] != -100).sum())
            loss_sum += out.loss.item() * labelled
            count += labelled
            metric.add_batch(
                predictions=out.logits.argmax(-1).flatten().cpu(), references=batch["labels"].flatten().cpu()
            )
        totals = accelerator.reduce(torch.tensor([loss_sum, count], device=accelerator.device), reduction="sum")
        accuracy = metric.compute()["accuracy"] if count else float("nan")
        accuracy = accelerator.reduce(torch.tensor([accuracy * count], device=accelerator.device), "sum")
        results[f"eval/loss@{length}"] = (totals[0] / totals[1]).item()
        results[f"eval/accuracy@{length}"] = (accuracy[0] / totals[1]).item()
    model.train()
    return results


class Progress:
    """What a checkpoint adds to accelerate's state: the optimizer step, and the save counter behind accelerate's
    `checkpoints/checkpoint_<n>` names, which `load_state` does not restore by itself."""

    def __init__(self, project: ProjectConfiguration):
        self.step, self.project = 0, project

    def state_dict(self) -> dict:
        return {"step": self.step, "iteration": self.project.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.project.iteration = state["iteration"] + 1


def weights_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def mixed_precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return name


def save_model(model: MedEIRForMaskedLM, tokenizer, folder: Path) -> None:
    """A MedEIR folder that train.finetune, train.monitor and sentence-transformers load."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    write_sentence_transformers_files(folder, hidden_size=model.config.hidden_size)


def check_recipe(recipe: PretrainRecipe) -> None:
    """What the recipe alone can get wrong, checked before any model, tokenizer or text loads."""
    if recipe.objective not in OBJECTIVES:
        raise ValueError(f"objective must be 'mlm', 'distill' or 'word_distill', got {recipe.objective!r}")
    for key in ("batch_size", "grad_accum", "max_steps", "save_every", "eval_every", "seq_len"):
        if getattr(recipe, key) < 1:
            raise ValueError(f"recipe key {key} must be 1 or more, got {getattr(recipe, key)}")
    if recipe.distill_words < 0 or (recipe.distill_words and recipe.objective != "word_distill"):
        raise ValueError(
            f"distill_words must be 0 or more, and is read by objective word_distill only (got {recipe.distill_words} "
            f"with objective {recipe.objective})"
        )


class MaskedLanguageModelling:
    """`objective: mlm`: packed blocks of the corpus, masked per batch, evaluated at several lengths.

    The loader yields unmasked rows; each batch is masked with a generator seeded by (seed, rank, batch index), so a
    resumed run draws the same masks whatever the loader had prefetched before the kill.
    """

    frozen_rows = None  # every parameter trains

    def __init__(self, recipe: PretrainRecipe, tokenizer, full_model: MedEIRForMaskedLM, accelerator: Accelerator):
        self.recipe, self.accelerator, self.model = recipe, accelerator, full_model
        data = DataBuild(recipe.data)
        with accelerator.main_process_first():
            blocks = packed_blocks(
                data.corpus_path("train"),
                tokenizer,
                recipe.seq_len,
                recipe.whole_word_mask,
                recipe.max_train_texts,
                recipe.seed,
            )
            self.eval_batches = evaluation_batches(recipe, tokenizer, data.corpus_path("validation"))
        self.collator = DataCollatorForLanguageModeling(
            tokenizer, mlm_probability=recipe.mlm_probability, whole_word_mask=recipe.whole_word_mask
        )
        self.loader = DataLoader(blocks, batch_size=recipe.batch_size, shuffle=True, collate_fn=list, drop_last=True)

    def loss(self, model, rows: list[dict], batch_index: int) -> tuple[torch.Tensor, dict]:
        rank = self.accelerator.process_index
        self.collator.generator = torch.Generator().manual_seed(
            (self.recipe.seed * 1_000_003 + rank) * 1_000_000_007 + batch_index
        )
        batch = {k: v.to(self.accelerator.device) for k, v in self.collator(rows).items()}
        return model(**batch, sparse_prediction=True).loss, {}

    def speed(self, rows_per_second: float) -> dict[str, float]:
        return {"train/tokens_per_s": rows_per_second * self.recipe.seq_len}

    def evaluate(self, model) -> tuple[dict[str, float], dict[str, str]]:
        """The evaluation's results, and the progress bar's note."""
        results = evaluate_lengths(model, self.eval_batches, self.accelerator)
        return results, {"loss": f"{results[f'eval/loss@{self.recipe.seq_len}']:.3f}"}


class Distillation:
    """`objective: distill` or `word_distill` (train.distill): the encoder alone (the MLM head is neither trained nor
    run) learns the teacher's hidden states from texts in length buckets, whose order is already a seeded shuffle."""

    def __init__(self, recipe: PretrainRecipe, tokenizer, full_model: MedEIRForMaskedLM, accelerator: Accelerator):
        self.accelerator, self.model = accelerator, full_model.model
        with accelerator.main_process_first():
            self.distiller = DISTILLERS[recipe.objective](recipe, tokenizer, accelerator.device)
        # word_distill trains only the new rows of the embedding table: its gradient is masked
        new_rows_only = recipe.objective == "word_distill" and recipe.new_rows_only
        self.frozen_rows = self.distiller.freeze_shared(self.model) if new_rows_only else None
        self.loader = DataLoader(self.distiller.texts, batch_size=recipe.batch_size, collate_fn=list, drop_last=True)

    def loss(self, model, rows: list[str], batch_index: int) -> tuple[torch.Tensor, dict]:
        return self.distiller.loss(model, rows)

    def speed(self, rows_per_second: float) -> dict[str, float]:
        return {"train/texts_per_s": rows_per_second}

    def evaluate(self, model) -> tuple[dict[str, float], dict[str, str]]:
        results = self.distiller.evaluate(model, self.accelerator)
        return results, {"cosine": f"{results['eval/cosine_to_teacher']:.4f}"}


def optimizer_and_schedule(recipe: PretrainRecipe, model: torch.nn.Module, frozen_rows, processes: int):
    """AdamW with weight decay on matrices only, and a linear schedule with warm-up."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    # weight decay moves rows whatever their gradient: none on a table whose gradient is masked
    decay = [p for p in trainable if p.ndim >= 2 and p is not frozen_rows]
    no_decay = [p for p in trainable if p.ndim < 2 or p is frozen_rows]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        fused=True,  # one kernel over all parameters (CPU and CUDA): the 52,543-row embedding dominates the update
    )
    # a prepared scheduler steps once per process at every optimizer step
    scheduler = get_linear_schedule_with_warmup(
        optimizer, recipe.warmup_steps * processes, recipe.max_steps * processes
    )
    return optimizer, scheduler


@dataclass
class Run:
    """One prepared run: what every step of the loop uses."""

    recipe: PretrainRecipe
    accelerator: Accelerator
    tokenizer: Any
    full_model: MedEIRForMaskedLM  # what is saved at the end: it holds the trained encoder's parameters
    objective: MaskedLanguageModelling | Distillation
    model: torch.nn.Module  # what trains, prepared: the full model, or its encoder alone when distilling
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: DataLoader
    progress: Progress  # progress.step: optimizer steps done, saved with every checkpoint
    steps_per_epoch: int

    def log(self, values: dict) -> None:
        self.accelerator.log(values, step=self.progress.step)
        if self.accelerator.is_main_process:
            with (Path(self.recipe.output_dir) / "train_log.jsonl").open("a") as f:
                f.write(json.dumps({"step": self.progress.step, **values}) + "\n")


def start_run(recipe: PretrainRecipe) -> Run:
    """Load the model, the objective's data and the optimizer, prepare them, and resume from the newest checkpoint."""
    output_dir = Path(recipe.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.grad_accum,
        mixed_precision=mixed_precision(recipe.mixed_precision),
        log_with=recipe.logger if recipe.logger != "none" else None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), automatic_checkpoint_naming=True, total_limit=recipe.keep_checkpoints
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(recipe.init, trust_remote_code=True)
    full_model = MedEIRForMaskedLM.from_pretrained(recipe.init, attn_implementation=recipe.attn_implementation)
    kind = Distillation if recipe.objective in DISTILLERS else MaskedLanguageModelling
    objective = kind(recipe, tokenizer, full_model, accelerator)
    optimizer, scheduler = optimizer_and_schedule(
        recipe, objective.model, objective.frozen_rows, accelerator.num_processes
    )
    model, optimizer, loader, scheduler = accelerator.prepare(objective.model, optimizer, objective.loader, scheduler)
    steps_per_epoch = len(loader) // recipe.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(loader.dataset)} training rows make no full step of {recipe.batch_size} x {recipe.grad_accum}"
        )
    progress = Progress(accelerator.project_configuration)
    accelerator.register_for_checkpointing(progress)
    checkpoints = output_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        accelerator.load_state()  # the newest checkpoints/checkpoint_<n>
        accelerator.print(f"resumed from {checkpoints} at step {progress.step}")
    if accelerator.is_main_process:
        save_recipe(recipe, output_dir / "recipe.json")
    accelerator.init_trackers("pretrain", config={k: str(v) for k, v in asdict(recipe).items()})
    return Run(
        recipe, accelerator, tokenizer, full_model, objective, model, optimizer, scheduler, loader, progress,
        steps_per_epoch,
    )  # fmt: skip


def train_batch(run: Run, rows: list, batch_index: int) -> tuple[torch.Tensor, dict]:
    """Forward and backward of one batch; the optimizer steps when the accumulation is complete."""
    accelerator = run.accelerator
    with accelerator.accumulate(run.model):
        loss, parts = run.objective.loss(run.model, rows, batch_index)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(run.model.parameters(), run.recipe.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()
    return loss, parts


def end_of_step(run: Run) -> dict[str, str]:
    """After each optimizer step: a checkpoint every `save_every` steps and an evaluation every `eval_every` (both at
    the last step). Returns the progress bar's note when it evaluated."""
    step, recipe = run.progress.step, run.recipe
    if step % recipe.save_every == 0 or step == recipe.max_steps:
        run.accelerator.save_state()  # checkpoints/checkpoint_<n>, the oldest beyond keep_checkpoints deleted
    if step % recipe.eval_every == 0 or step == recipe.max_steps:
        results, note = run.objective.evaluate(run.model)
        run.log(results)
        return note
    return {}


def run_steps(run: Run) -> None:
    """Optimizer steps up to `max_steps`; a resumed run skips the batches its checkpoint had already seen."""
    recipe, accelerator = run.recipe, run.accelerator
    step = run.progress.step
    bar = tqdm(total=recipe.max_steps, initial=step, desc="pretrain", disable=not accelerator.is_local_main_process)
    run.model.train()
    rows_seen, started = 0, time.perf_counter()
    epoch = step // run.steps_per_epoch
    batches_seen = step * recipe.grad_accum
    while run.progress.step < recipe.max_steps:
        run.loader.set_epoch(epoch)
        skip = (run.progress.step - epoch * run.steps_per_epoch) * recipe.grad_accum
        for rows in accelerator.skip_first_batches(run.loader, skip) if skip else run.loader:
            batches_seen += 1
            loss, parts = train_batch(run, rows, batches_seen - 1)
            rows_seen += len(rows)
            if not accelerator.sync_gradients:
                continue
            run.progress.step += 1
            bar.update(1)
            rate = rows_seen * accelerator.num_processes / (time.perf_counter() - started)
            lr = run.scheduler.get_last_lr()[0]
            run.log({"train/loss": loss.item(), **parts, "train/lr": lr, **run.objective.speed(rate)})
            note = end_of_step(run)
            if note:
                bar.set_postfix(**note)
            if run.progress.step >= recipe.max_steps:
                break
        epoch += 1
    bar.close()


def finish(run: Run) -> Path:
    """Check that every rank ends with the same weights, save the final model, and end the run."""
    accelerator = run.accelerator
    # a divergence (e.g. a rank that skipped a step) fails loudly
    hashes = gather_object([weights_sha256(accelerator.unwrap_model(run.model))])
    if len(set(hashes)) != 1:
        raise RuntimeError(f"ranks ended with different weights: {hashes}")
    run.log({"weights_sha256": hashes[0], "ranks": len(hashes)})
    final = Path(run.recipe.output_dir) / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(run.full_model, run.tokenizer, final)  # holds the trained encoder's parameters
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also tears down the process group
    return final


def train(recipe: PretrainRecipe) -> Path:
    check_recipe(recipe)  # before anything loads
    run = start_run(recipe)
    run_steps(run)
    return finish(run)


def main() -> None:
    recipe = recipe_from_command_line(PretrainRecipe, __doc__)
    print(f"final model: {train(recipe)}")


if __name__ == "__main__":
    main()
