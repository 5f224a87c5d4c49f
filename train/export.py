"""Export a trained SentenceTransformer folder as a shipped model.

    python -m train.export runs/medeir-small/finetune/final models/medeir-small

Weights are stored in float16 (half the size: `small` fits in ~62 MB) while `config.dtype` stays float32, so
AutoModel and SentenceTransformer load and compute in float32 unless a user asks for half precision. The two
remote-code files are refreshed from this repository. The export is checked against its source: embeddings of
a few real texts must agree to float16 rounding; the evaluation report measures both if in doubt (`--full` keeps
float32 weights).
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hub.onnx_export import export_folder as export_onnx_files
from hub.sentence_transformers_files import write_sentence_transformers_files

REPO = Path(__file__).resolve().parents[1]
REMOTE_CODE = ("modeling_medeir.py", "configuration_medeir.py")
CHECK_TEXTS = [
    "Cholera due to Vibrio cholerae 01, biovar cholerae",
    "Abnormality of the cardiovascular system",
    "the decade from 1530 to 1539",
]


def export(source: Path, target: Path, half: bool = True) -> dict:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "README.md"))
    for name in REMOTE_CODE:
        shutil.copy2(REPO / name, target / name)
    weights_file = target / "model.safetensors"
    if half:
        weights = load_file(weights_file)
        save_file(
            {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, weights_file, {"format": "pt"}
        )
    config_file = target / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = "float32"  # compute dtype on load; the stored weights may be float16
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    publishable_sentence_transformers_files(target, config)
    difference = check(source, target)
    onnx = export_onnx_files(target)  # onnx/model.onnx + onnx/model_qint8_avx512_vnni.onnx, checked against torch
    return {
        "weights_mb": round(weights_file.stat().st_size / 2**20, 1),
        "half": half,
        "max_embedding_diff": difference,
        "onnx": onnx,
    }


def publishable_sentence_transformers_files(target: Path, config: dict) -> None:
    """The trainer saves sentence-transformers 6 files with the training length (512) as the model's limit; the
    shipped model reads its whole context and loads in every sentence-transformers version (legacy module types)."""
    prompts = json.loads((target / "config_sentence_transformers.json").read_text()).get("prompts") or {}
    write_sentence_transformers_files(
        target,
        config["hidden_size"],
        max_seq_length=config["max_position_embeddings"],
        prompts={k: v for k, v in prompts.items() if v},
    )
    tokenizer_file = target / "tokenizer_config.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    for key in ("is_local", "local_files_only"):  # facts about the training machine, not settings of the model
        tokenizer.pop(key, None)
    tokenizer["model_max_length"] = config["max_position_embeddings"]
    tokenizer_file.write_text(json.dumps(tokenizer, indent=2, sort_keys=True) + "\n")


def check(source: Path, target: Path) -> float:
    """Largest absolute difference between the source's and the export's embeddings of CHECK_TEXTS."""
    from sentence_transformers import SentenceTransformer

    a = SentenceTransformer(str(source), trust_remote_code=True, device="cpu").encode(
        CHECK_TEXTS, convert_to_tensor=True
    )
    exported = SentenceTransformer(str(target), trust_remote_code=True, device="cpu")
    if next(exported.parameters()).dtype != torch.float32:
        raise RuntimeError("the export does not load in float32")
    b = exported.encode(CHECK_TEXTS, convert_to_tensor=True)
    difference = float((a - b).abs().max())
    if difference > 5e-3:
        raise RuntimeError(f"export differs from its source by {difference:.4f}")
    return difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--full", action="store_true", help="keep float32 weights")
    args = parser.parse_args()
    print(json.dumps(export(args.source, args.target, half=not args.full), indent=2))


if __name__ == "__main__":
    main()
