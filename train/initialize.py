"""Starting points for training: MedEIR `small` converted from all-MiniLM-L6-v2, or any preset from scratch.

    python -m train.initialize minilm  --out runs/init/small-minilm
    python -m train.initialize minilm  --tokenizer minilm --alibi-slope-scale 0.05 --out runs/init/minilm-vocab
    python -m train.initialize scratch --preset base --out runs/init/base-scratch

Both write a MedEIRForMaskedLM folder (weights, tokenizer, sentence-transformers files) that
`train.pretrain` and `train.finetune` start from and that loads with trust_remote_code=True.

The MiniLM conversion copies every weight except the absolute position embeddings (ALiBi replaces them):
query/key/value are fused into one `qkv` projection, and the vocabulary moves to the MedEIR tokenizer: a token
that exists in both vocabularies keeps its MiniLM embedding; a new token starts as the mean of the MiniLM
embeddings of the pieces MiniLM's tokenizer cuts it into. Optionally the mean of the first N position
embeddings is folded into token type 0, which every token receives, so the first LayerNorm sees inputs
centred where MiniLM's were; with `cls_position`, [CLS], which every input starts with, also keeps MiniLM's exact
position-0 embedding inside its own token embedding, so the first token enters the encoder as it entered MiniLM.
The MLM head is new (MiniLM ships none).

Two switches isolate what the conversion costs. `--tokenizer minilm` keeps MiniLM's own vocabulary (bert-base-uncased's
30,522 WordPiece tokens): every token keeps its MiniLM embedding, so only positions change. `--alibi-slope-scale S`
multiplies every head's standard ALiBi slope by S and writes the slopes into the config (`alibi_slopes`): MiniLM
never saw a distance penalty, and small slopes disturb it least. S = 0 is allowed and means no ALiBi at all (every
slope 0; the config accepts slopes of 0 or more): the model then has no word-order information, [CLS] aside with
`--cls-position`; S = 1 keeps the standard slopes (`alibi_slopes` stays None in the config).
"""

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from configuration_medeir import MedEIRConfig
from corpus.reference import minilm_path
from modeling_medeir import MedEIRForMaskedLM, alibi_slopes
from train.sentence_transformers_files import write_sentence_transformers_files

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO / "tokenizer"
DEFAULT_FOLD_POSITIONS = 32  # measured in --help; what the medeir-small recipe starts from
MINILM_TOKENIZER = "minilm"  # --tokenizer: all-MiniLM-L6-v2's own (bert-base-uncased's vocabulary)


def load_tokenizer(name: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer folder, or MINILM_TOKENIZER for all-MiniLM-L6-v2's own: the conversion then changes no token."""
    return AutoTokenizer.from_pretrained(minilm_path() if str(name) == MINILM_TOKENIZER else Path(name))


def scaled_slopes(num_heads: int, scale: float) -> list[float] | None:
    """The standard ALiBi slopes times `scale` (0 or more), for `MedEIRConfig.alibi_slopes`; None (the standard
    slopes) at scale 1."""
    if not 0 <= scale < math.inf:
        raise ValueError(f"the ALiBi slope scale must be finite and 0 or more (0: no ALiBi), got {scale}")
    return None if scale == 1 else [slope * scale for slope in alibi_slopes(num_heads)]


def source_pieces(token: str, source: PreTrainedTokenizerBase, source_vocab: dict[str, int]) -> list[int]:
    """Ids of the pieces the source tokenizer cuts `token` into; a `##` continuation stays a continuation."""
    continuation = token.startswith("##") and len(token) > 2
    ids = source(token[2:] if continuation else token, add_special_tokens=False)["input_ids"]
    if continuation and ids:
        first = source.convert_ids_to_tokens(ids[0])
        ids[0] = source_vocab.get("##" + first, ids[0])
    return ids


def transfer_embeddings(
    source_embeddings: torch.Tensor, source: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, dict]:
    """Embeddings for the target vocabulary: shared tokens copied, new tokens the mean of their source pieces."""
    source_vocab = source.get_vocab()
    target_vocab = target.get_vocab()
    out = torch.empty(len(target_vocab), source_embeddings.shape[1], dtype=source_embeddings.dtype)
    shared = pieces_total = 0
    for token, index in target_vocab.items():
        if token in source_vocab:
            out[index] = source_embeddings[source_vocab[token]]
            shared += 1
            continue
        ids = source_pieces(token, source, source_vocab) or [source.unk_token_id]
        out[index] = source_embeddings[ids].mean(dim=0)
        pieces_total += len(ids)
    new = len(target_vocab) - shared
    stats = {"target_vocab": len(target_vocab), "shared": shared, "new": new}
    stats["mean_pieces_per_new_token"] = round(pieces_total / max(new, 1), 3)
    return out, stats


def convert_minilm(
    tokenizer: PreTrainedTokenizerBase,
    source_dir: Path | None = None,
    fold_positions: int = 0,
    cls_position: bool = False,
    alibi_slope_scale: float = 1.0,
) -> tuple[MedEIRForMaskedLM, dict]:
    """MedEIR `small` carrying all-MiniLM-L6-v2's weights on `tokenizer`'s vocabulary, its ALiBi slopes the standard
    ones times `alibi_slope_scale` (0 or more; 0: no ALiBi)."""
    source_dir = source_dir or minilm_path()
    source_config = json.loads((source_dir / "config.json").read_text())
    source_tokenizer = AutoTokenizer.from_pretrained(source_dir)
    weights = load_file(source_dir / "model.safetensors")
    config = MedEIRConfig(
        vocab_size=len(tokenizer),
        hidden_size=source_config["hidden_size"],
        num_hidden_layers=source_config["num_hidden_layers"],
        num_attention_heads=source_config["num_attention_heads"],
        intermediate_size=source_config["intermediate_size"],
        hidden_act=source_config["hidden_act"],
        layer_norm_eps=source_config["layer_norm_eps"],
        type_vocab_size=source_config["type_vocab_size"],
        pad_token_id=tokenizer.pad_token_id,
        feed_forward_type="mlp",
        alibi_slopes=scaled_slopes(source_config["num_attention_heads"], alibi_slope_scale),
    )
    embeddings, stats = transfer_embeddings(weights["embeddings.word_embeddings.weight"], source_tokenizer, tokenizer)
    token_types = weights["embeddings.token_type_embeddings.weight"].clone()
    positions = weights["embeddings.position_embeddings.weight"]
    folded = positions[:fold_positions].mean(dim=0) if fold_positions else torch.zeros_like(positions[0])
    token_types[0] += folded
    if cls_position:  # [CLS] + type 0 = MiniLM's [CLS] + position 0 + type 0 exactly
        embeddings[tokenizer.cls_token_id] += positions[0] - folded
    state = {
        "embeddings.word_embeddings.weight": embeddings,
        "embeddings.token_type_embeddings.weight": token_types,
        "embeddings.norm.weight": weights["embeddings.LayerNorm.weight"],
        "embeddings.norm.bias": weights["embeddings.LayerNorm.bias"],
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            state[f"{dst}attention.qkv.{kind}"] = torch.cat(
                [weights[f"{src}attention.self.{name}.{kind}"] for name in ("query", "key", "value")]
            )
            state[f"{dst}attention.out.{kind}"] = weights[f"{src}attention.output.dense.{kind}"]
            state[f"{dst}attention_norm.{kind}"] = weights[f"{src}attention.output.LayerNorm.{kind}"]
            state[f"{dst}feed_forward.up.{kind}"] = weights[f"{src}intermediate.dense.{kind}"]
            state[f"{dst}feed_forward.down.{kind}"] = weights[f"{src}output.dense.{kind}"]
            state[f"{dst}feed_forward_norm.{kind}"] = weights[f"{src}output.LayerNorm.{kind}"]
    dropped = sorted(k for k in weights if k.startswith("embeddings.position"))
    model = MedEIRForMaskedLM(config)
    missing, unexpected = model.model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    model.tie_weights()
    stats.update(
        source=str(source_dir),
        dropped=dropped,
        fold_positions=fold_positions,
        cls_position=cls_position,
        alibi_slope_scale=alibi_slope_scale,
    )
    return model, stats


def from_scratch(preset: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> MedEIRForMaskedLM:
    config = MedEIRConfig.from_json_file(REPO / "presets" / f"{preset}.json")
    if config.vocab_size != len(tokenizer):
        raise ValueError(f"preset {preset} has vocab_size {config.vocab_size}, the tokenizer has {len(tokenizer)}")
    torch.manual_seed(seed)
    return MedEIRForMaskedLM(config)


def save(model: MedEIRForMaskedLM, tokenizer: PreTrainedTokenizerBase, out: Path, stats: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_sentence_transformers_files(out, hidden_size=model.config.hidden_size)
    (out / "initialization.json").write_text(json.dumps(stats, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("start", choices=["minilm", "scratch"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--tokenizer",
        default=str(DEFAULT_TOKENIZER),
        help=f"a tokenizer folder, or '{MINILM_TOKENIZER}': all-MiniLM-L6-v2's own 30,522 tokens (bert-base-uncased's "
        "vocabulary), so that the conversion changes no token",
    )
    parser.add_argument("--preset", default="small", help="scratch only: a name in presets/")
    parser.add_argument(
        "--fold-positions",
        type=int,
        default=DEFAULT_FOLD_POSITIONS,
        help="minilm only: fold the mean of the first N position embeddings into token type 0 (0: off). 32 measured "
        "best of {0, 32} zero-shot: nDCG@10 HPO 0.20 vs 0.12, ICD-10-CM 0.36 vs 0.33, WordNet 0.15 vs 0.05",
    )
    parser.add_argument(
        "--cls-position",
        action="store_true",
        help="minilm only: [CLS] keeps MiniLM's position-0 embedding in its token embedding. Measured zero-shot (train."
        "monitor's HPO layperson sample, BERT-superset tokenizer, --fold-positions 32): nDCG@10 0.378 vs 0.238",
    )
    parser.add_argument(
        "--alibi-slope-scale",
        type=float,
        default=1.0,
        help="minilm only: multiply every head's standard ALiBi slope by S (S >= 0; 0: no ALiBi, no word order) and "
        "write the slopes into the config. Measured untrained on MiniLM's vocabulary (`python -m "
        "train.conversion_report`, the monitor's samples, nDCG@10): x0.05 is 0.013 to 0.086 below all-MiniLM-L6-v2, "
        "x1 0.079 to 0.361 below it",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 <= args.alibi_slope_scale < math.inf:
        parser.error(f"--alibi-slope-scale must be finite and 0 or more (0: no ALiBi), got {args.alibi_slope_scale}")

    tokenizer = load_tokenizer(args.tokenizer)
    if args.start == "minilm":
        model, stats = convert_minilm(
            tokenizer,
            fold_positions=args.fold_positions,
            cls_position=args.cls_position,
            alibi_slope_scale=args.alibi_slope_scale,
        )
    else:
        model = from_scratch(args.preset, tokenizer, args.seed)
        stats = {"preset": args.preset, "seed": args.seed}
    stats["tokenizer"] = args.tokenizer
    save(model, tokenizer, args.out, stats)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
