"""LoRA adaptation of a trained MedEIR to a sub-domain (cardiology by default), with peft.

    python -m train.lora --recipe train/recipes/lora-cardiology.yaml

Trains low-rank adapters on the attention projections with in-batch-negatives contrastive loss on the
sub-domain's training pairs (the data build marks ICD-10-CM chapter I00-I99 and HPO terms under
"Abnormality of the cardiovascular system" as cardiology), and reports the separation score of the
cardiology study (mean cosine of related pairs minus mean cosine of unrelated pairs, held-out pairs) before
and after. Writes `<output_dir>/adapter` (peft adapter files), `<output_dir>/merged` (the adapter merged into
the weights: a plain MedEIR SentenceTransformer folder) and `<output_dir>/separation.json`.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
from peft import LoraConfig, PeftModel, get_peft_model
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
from sentence_transformers import losses as st_losses

from corpus.dataset import DataBuild
from train.finetune import training_arguments
from train.metrics import pair_scores
from train.recipe import recipe_from_command_line, save_recipe


@dataclass
class LoraRecipe:
    base: str  # a trained MedEIR SentenceTransformer folder
    data: str = "data"
    output_dir: str = "runs/lora-cardiology"
    subdomain_column: str = "cardiology"  # boolean column of the pair files that selects the sub-domain
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["qkv", "out"])
    batch_size: int = 64
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1
    max_pairs: int | None = None
    max_seq_length: int = 128
    seed: int = 0


def subdomain_pairs(recipe: LoraRecipe) -> datasets.Dataset:
    pairs = DataBuild(recipe.data).pairs_dataset()
    pairs = pairs.filter(lambda flag: flag, input_columns=recipe.subdomain_column).shuffle(seed=recipe.seed)
    if recipe.max_pairs is not None:
        pairs = pairs.select(range(min(recipe.max_pairs, len(pairs))))
    return pairs.select_columns(["anchor", "positive"])


def held_out_pairs(recipe: LoraRecipe) -> datasets.Dataset:
    pairs = DataBuild(recipe.data).pairs_test_dataset()
    return pairs.filter(lambda flag: flag, input_columns=recipe.subdomain_column)


def score(model: SentenceTransformer, pairs: datasets.Dataset) -> dict[str, float]:
    a = model.encode(pairs["text1"], convert_to_tensor=True, batch_size=256, normalize_embeddings=True)
    b = model.encode(pairs["text2"], convert_to_tensor=True, batch_size=256, normalize_embeddings=True)
    cosine = (a * b).sum(-1).cpu().tolist()
    return pair_scores(cosine, pairs["label"])


def train(recipe: LoraRecipe) -> dict:
    output_dir = Path(recipe.output_dir)
    model = SentenceTransformer(recipe.base, trust_remote_code=True)
    model.max_seq_length = recipe.max_seq_length
    test_pairs = held_out_pairs(recipe)
    before = score(model, test_pairs)

    config = LoraConfig(
        r=recipe.r, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout, target_modules=recipe.target_modules
    )
    model[0].model = get_peft_model(model[0].model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    train_pairs = subdomain_pairs(recipe)
    args = training_arguments(recipe, warmup_ratio=0.1, save_strategy="no", logging_steps=10, report_to=[])
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train_pairs, loss=st_losses.MultipleNegativesRankingLoss(model)
    )
    trainer.train()
    after = score(model, test_pairs)

    adapter_dir = output_dir / "adapter"
    model[0].model.save_pretrained(adapter_dir)  # adapter weights + adapter_config.json only
    model[0].model = model[0].model.merge_and_unload()
    merged_dir = output_dir / "merged"
    model.save(str(merged_dir), create_model_card=False)

    report = {
        "subdomain": recipe.subdomain_column,
        "train_pairs": len(train_pairs),
        "test_pairs": len(test_pairs),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "steps": trainer.state.global_step,
        "separation_before": before,
        "separation_after": after,
        "recipe": asdict(recipe),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, output_dir / "recipe.json")
    (output_dir / "separation.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def load_adapted(base: str, adapter_dir: str | Path) -> SentenceTransformer:
    """The base model with a saved adapter applied (not merged): what a user does with `adapter/`."""
    model = SentenceTransformer(base, trust_remote_code=True)
    model[0].model = PeftModel.from_pretrained(model[0].model, str(adapter_dir))
    return model


def main() -> None:
    report = train(recipe_from_command_line(LoraRecipe, __doc__))
    before, after = report["separation_before"], report["separation_after"]
    print(f"separation score: {before['separation']:.4f} -> {after['separation']:.4f} ({report['steps']} steps)")


if __name__ == "__main__":
    main()
