"""Export: the one path from a trained SentenceTransformer folder to the shipped model package.

    python -m train.export runs/medeir-small/finetune/final models/medeir-small    # fp16 weights, code, onnx/
    python -m train.export --onnx-only models/medeir-small                         # (re)write onnx/ in place

Training ends with it (train/medeir-small.sh) and publishing goes through the same pieces: `hub.publish` copies an
exported folder, calls `package` on the copy and checks it with `verify`. What a shipped folder holds:
- weights in float16 (half the size: `small` fits in ~62 MB) while `config.dtype` stays float32, so AutoModel and
  SentenceTransformer load and compute in float32 unless a user asks for half precision (`--full` keeps float32);
- the code that ships inside the model (the top-level SHIPPED_CODE files), refreshed from this repository;
- sentence-transformers files with the model's whole context as its limit and legacy module types;
- onnx/model.onnx and onnx/model_qint8_avx512_vnni.onnx (train.onnx_export), checked against torch.
`verify` is the one embedding check: a fresh offline process, without this checkout on its path, loads the folder
through AutoModel (mean pooling), SentenceTransformer and, where the folder has one, the Endpoints handler, and each
must give the reference folder's embeddings of CHECK_TEXTS within `atol`.

A late-interaction folder (train.colbert's MultiVectorEncoder, `is_multi_vector_folder`) takes the same path with its
own sentence-transformers files kept (projection, scoring mask, query and document lengths): float16 encoder
weights, the shipped code, and the check that a fresh process loading it with MultiVectorEncoder (and AutoModel, and
the handler where there is one) gives the source's token vectors of CHECK_TEXTS as queries and as documents. It has
no onnx/ files: the ONNX graph is the dense model's (mean pooling inside).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from train import onnx_export
from train.sentence_transformers_files import is_multi_vector_folder, write_sentence_transformers_files

REPO = Path(__file__).resolve().parents[1]
# The code that ships inside every model folder: the remote code and the onnxruntime encoder (the top-level files).
SHIPPED_CODE = ("configuration_medeir.py", "modeling_medeir.py", "onnx_encoder.py")
# Real texts for every export check (torch and ONNX): codes, phenotypes, lay words, general English, one character.
CHECK_TEXTS = [
    "Cholera due to Vibrio cholerae 01, biovar cholerae",
    "Acute myocardial infarction of inferior wall",
    "Abnormality of the cardiovascular system",
    "always thirsty and peeing a lot",
    "the decade from 1530 to 1539",
    "x",
]
HALF_ATOL = 5e-3  # float16 weights against the float32 source
COPY_ATOL = 1e-5  # the same weights in another folder


class ExportError(RuntimeError):
    """A folder that cannot ship; the message says which check failed and why."""


def export(source: Path, target: Path, half: bool = True, onnx: bool = True) -> dict:
    """Write the shipped package of trained folder `source` into a fresh `target`, checked against `source`."""
    source, target = Path(source), Path(target)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "README.md", "onnx"))
    weights_file = target / "model.safetensors"
    if half:
        weights = load_file(weights_file)
        save_file(
            {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, weights_file, {"format": "pt"}
        )
    package(target)
    report = verify(source, target, atol=HALF_ATOL if half else COPY_ATOL)
    result = {
        "weights_mb": round(weights_file.stat().st_size / 2**20, 1),
        "half": half,
        "max_embedding_diff": max(report["gaps"].values()),
    }
    if is_multi_vector_folder(target):
        result["onnx"] = "none: a late-interaction folder is served by torch (MultiVectorEncoder)"
    elif onnx:  # onnx/model.onnx + onnx/model_qint8_avx512_vnni.onnx, checked against torch on CHECK_TEXTS
        result["onnx"] = onnx_export.export_folder(target, texts=CHECK_TEXTS)
    return result


def package(folder: Path) -> None:
    """Make a saved MedEIR folder what ships, in place (idempotent): compute dtype float32 in config.json, this
    repository's SHIPPED_CODE, sentence-transformers files for the whole context (a dense folder, keeping its
    prompts; a late-interaction folder keeps its own, checked against the context), and a tokenizer_config.json
    without facts about the training machine."""
    folder = Path(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = "float32"  # compute dtype on load; the stored weights may be float16
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in SHIPPED_CODE:
        shutil.copyfile(REPO / name, folder / name)
    if is_multi_vector_folder(folder):
        check_multi_vector_lengths(folder, config["max_position_embeddings"])
    else:
        write_dense_files(folder, config)
    tokenizer_file = folder / "tokenizer_config.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    for key in ("is_local", "local_files_only"):  # facts about the training machine, not settings of the model
        tokenizer.pop(key, None)
    tokenizer["model_max_length"] = config["max_position_embeddings"]
    tokenizer_file.write_text(json.dumps(tokenizer, indent=2, sort_keys=True) + "\n")


def write_dense_files(folder: Path, config: dict) -> None:
    """A dense folder's sentence-transformers files for the whole context, keeping the folder's prompts."""
    st_config = folder / "config_sentence_transformers.json"
    prompts = (json.loads(st_config.read_text()).get("prompts") or {}) if st_config.is_file() else {}
    write_sentence_transformers_files(
        folder,
        config["hidden_size"],
        max_seq_length=config["max_position_embeddings"],
        prompts={k: v for k, v in prompts.items() if v},
    )


def check_multi_vector_lengths(folder: Path, context: int) -> None:
    """A late-interaction folder keeps the lengths it was saved with; they must fit the model's context."""
    settings = json.loads((folder / "sentence_bert_config.json").read_text())
    for key in ("query_length", "document_length", "max_seq_length"):
        value = settings.get(key)
        if value is not None and not 0 < value <= context:
            raise ExportError(f"{folder}: {key} {value} does not fit the model's {context}-token context")


VERIFY = """
import json, os, sys
import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer
from sentence_transformers import SentenceTransformer

folder, reference, texts = sys.argv[1], np.load(sys.argv[2]), json.loads(sys.argv[3])
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
assert type(config).__name__ == "MedEIRConfig", type(config)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__name__ == "MedEIRModel" and "transformers_modules" in type(model).__module__, type(model)
assert next(model.parameters()).dtype == torch.float32, "the folder does not load in float32"
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
batch = tokenizer(texts, padding=True, return_tensors="pt")
with torch.no_grad():
    hidden = model(**batch).last_hidden_state
mask = batch["attention_mask"][..., None].float()
pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
ways = {"automodel_mean_pooling": pooled, "sentence_transformers": st.encode(texts, convert_to_numpy=True)}
if os.path.isfile(os.path.join(folder, "handler.py")):
    sys.path.insert(0, folder)
    from handler import EndpointHandler
    ways["handler"] = np.asarray(EndpointHandler(folder)({"inputs": texts})["embeddings"])
gaps = {name: float(np.abs(value - reference).max()) for name, value in ways.items()}
print("RESULT " + json.dumps({"gaps": gaps, "dimension": int(ways["sentence_transformers"].shape[1]),
                             "max_seq_length": st.max_seq_length, "model_class": type(model).__name__}))
"""


VERIFY_MULTI_VECTOR = """
import json, os, sys
import numpy as np
import torch
from transformers import AutoConfig, AutoModel
from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

folder, reference, texts = sys.argv[1], np.load(sys.argv[2]), json.loads(sys.argv[3])
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
assert type(config).__name__ == "MedEIRConfig", type(config)
encoder = AutoModel.from_pretrained(folder, trust_remote_code=True)
assert type(encoder).__name__ == "MedEIRModel" and "transformers_modules" in type(encoder).__module__, type(encoder)
assert next(encoder.parameters()).dtype == torch.float32, "the folder does not load in float32"
model = MultiVectorEncoder(folder, trust_remote_code=True, device="cpu")
ways = {}
for side in ("query", "document"):
    ways[side] = [v.float().numpy() for v in getattr(model, "encode_" + side)(texts)]
if os.path.isfile(os.path.join(folder, "handler.py")):
    sys.path.insert(0, folder)
    from handler import EndpointHandler
    handler = EndpointHandler(folder)
    for side in ("query", "document"):
        answer = handler({"inputs": texts, "parameters": {"output": "multi_vector", "input_type": side}})
        ways["handler_" + side] = [np.asarray(v, dtype=np.float32) for v in answer["multi_vectors"]]
gaps = {}
for name, vectors in ways.items():
    side = name.removeprefix("handler_")
    expected = [reference[f"{side}_{i}"] for i in range(len(texts))]
    if [v.shape for v in vectors] != [e.shape for e in expected]:
        gaps[name] = float("inf")
    else:
        gaps[name] = max(float(np.abs(v - e).max()) for v, e in zip(vectors, expected))
print("RESULT " + json.dumps({"gaps": gaps, "dimension": int(ways["query"][0].shape[1]),
                             "query_length": model[0].query_length, "document_length": model[0].document_length,
                             "model_class": type(encoder).__name__}))
"""


def reference_vectors(folder: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """`folder`'s embeddings of `texts` as train.export's checks compare them: {"embeddings": texts x dim} for a
    dense folder; for a late-interaction folder each text's token vectors as a query and as a document
    ({"query_0": tokens x dim, ..., "document_0": ...})."""
    if is_multi_vector_folder(folder):
        from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

        model = MultiVectorEncoder(str(folder), trust_remote_code=True, device="cpu")
        return {
            f"{side}_{i}": vectors.float().numpy()
            for side in ("query", "document")
            for i, vectors in enumerate(getattr(model, f"encode_{side}")(texts))
        }
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    return {"embeddings": model.encode(texts, convert_to_numpy=True)}


def fresh_env() -> dict[str, str]:
    """Offline, and without this checkout on the path: only the folder itself can supply the model code."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}


def verify(reference: Path, folder: Path, atol: float = COPY_ATOL) -> dict:
    """Load `folder` in a fresh offline process every way a user does and compare with `reference`'s embeddings (a
    late-interaction folder: its token vectors as queries and as documents)."""
    multi_vector = is_multi_vector_folder(folder)
    if multi_vector != is_multi_vector_folder(reference):
        raise ExportError(f"{folder} and {reference} are not the same kind of model (dense / late interaction)")
    expected = reference_vectors(Path(reference), CHECK_TEXTS)
    script, reference_file = (VERIFY_MULTI_VECTOR, "reference.npz") if multi_vector else (VERIFY, "reference.npy")
    with tempfile.TemporaryDirectory(prefix="medeir-verify-") as tmp:
        if multi_vector:
            np.savez(Path(tmp) / reference_file, **expected)
        else:
            np.save(Path(tmp) / reference_file, expected["embeddings"])
        result = subprocess.run(
            [sys.executable, "-c", script, str(Path(folder).resolve()), reference_file, json.dumps(CHECK_TEXTS)],
            cwd=tmp,
            env=fresh_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise ExportError(f"{folder} does not load in a fresh offline process:\n{result.stderr[-3000:]}")
    report = json.loads(lines[-1][len("RESULT ") :])
    if max(report["gaps"].values()) > atol:
        raise ExportError(
            f"{folder} loads but its embeddings differ from {reference}'s (atol {atol}): {report['gaps']}"
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "source", type=Path, help="a trained SentenceTransformer folder (or, with --onnx-only, a model)"
    )
    parser.add_argument("target", type=Path, nargs="?", help="the shipped folder to write (replaced if it exists)")
    parser.add_argument("--full", action="store_true", help="keep float32 weights")
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnx/ files")
    parser.add_argument("--onnx-only", action="store_true", help="only (re)write SOURCE/onnx/, checked against torch")
    parser.add_argument("--no-int8", action="store_true", help="with --onnx-only: only the fp32 file")
    args = parser.parse_args()
    try:
        if args.onnx_only:
            report = onnx_export.export_folder(args.source, quantize=not args.no_int8, texts=CHECK_TEXTS)
        elif args.target is None:
            parser.error("give SOURCE and TARGET (or --onnx-only FOLDER)")
        else:
            report = export(args.source, args.target, half=not args.full, onnx=not args.no_onnx)
    except (ExportError, onnx_export.OnnxParityError) as err:
        print(f"train.export failed: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
