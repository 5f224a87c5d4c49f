"""ONNX files of a model folder: `onnx/model.onnx` (fp32) and `onnx/model_qint8_avx512_vnni.onnx` (int8).

Written by train.export (`python -m train.export --onnx-only FOLDER` rewrites them in place). Both files take
`input_ids` and `attention_mask` (int64, dynamic batch and length) and return `last_hidden_state` (batch, length,
hidden), zeros at padding: the names onnxruntime users, TEI's ONNX Runtime backend and transformers.js look for.
ALiBi and padding are inside the graph (one fp32 bias per forward, as the eager backend builds it), so any ONNX
runtime gives MedEIR's embeddings with `onnx_encoder`'s mean pooling; model.onnx holds standard ONNX operators only.
The int8 file is for onnxruntime on CPUs: its transformer fusions (contrib operators), then its own
`quantize_dynamic` (int8 weights, activations quantised per call), as sentence-transformers'
`export_dynamic_quantized_onnx_model(..., "avx512_vnni")` quantises. Writing the files needs torch, onnx,
onnxscript and onnxruntime (`pip install 'medeir[onnx]'`); reading them needs only the shipped `onnx_encoder.py`.
"""

import sys
from pathlib import Path

import torch
from torch import nn

ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model_qint8_avx512_vnni.onnx"
OPSET = 18  # the dynamo exporter's lowest; onnxruntime >= 1.14 and transformers.js run it
# The fp32 export must agree with torch on the check texts: cosine >= FP32_MIN_COSINE.
FP32_MIN_COSINE = 0.9999


class OnnxParityError(RuntimeError):
    """The fp32 ONNX file does not give the torch model's embeddings."""


class MedEIRGraph(nn.Module):
    """MedEIR's encoder as one static graph: embeddings, ALiBi + padding bias, every layer, zeros at padding.

    The model's own forward chooses kernels and layouts at run time (unpadding, chunking, windows) from the values of
    its inputs, which a traced graph would freeze; this forward has no data-dependent branch. It reuses the model's
    modules and its eager attention (fp32 scores and softmax), so it is the reference computation, not a copy of it.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.modeling = sys.modules[type(model).__module__]  # the model's own module (a Hub copy or this checkout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model, modeling = self.model, self.modeling
        hidden = model.embeddings(input_ids, None, None)
        seq_len = input_ids.shape[1]
        slopes = torch.tensor(modeling.config_alibi_slopes(model.config), dtype=torch.float32)  # the model's own
        pos = torch.arange(seq_len, device=input_ids.device)
        alibi = -slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs().float()  # (H, S, S)
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        bias = alibi[None].masked_fill(~keep, torch.finfo(torch.float32).min)  # finite: an all-padding row stays finite
        layout = modeling.AttentionLayout("eager", slopes, shape=tuple(input_ids.shape), bias=bias)
        for layer in model.layers:
            hidden = layer(hidden, layout)
        return hidden * attention_mask[..., None].to(hidden.dtype)


class HiddenStates(nn.Module):
    """Any transformers encoder (all-MiniLM-L6-v2's BertModel) with the same inputs and output as MedEIRGraph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def graph_module(model: nn.Module) -> nn.Module:
    """The exportable forward of a loaded encoder: MedEIRGraph for MedEIR, HiddenStates otherwise."""
    return MedEIRGraph(model) if getattr(model.config, "model_type", None) == "medeir" else HiddenStates(model)


def load_encoder(folder: Path) -> nn.Module:
    """The folder's encoder in fp32 on the CPU, eval mode (MedEIR through its remote code, anything else plainly)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    kwargs = {"attn_implementation": "eager"} if config.model_type == "medeir" else {}
    return AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32, **kwargs).eval()


def export_onnx(model: nn.Module, path: Path, opset: int = OPSET) -> Path:
    """torch.onnx (dynamo) export of `graph_module(model)` with dynamic batch and length; weights inside the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.tensor([[101, 2000, 2001, 2002, 102], [101, 2003, 102, 0, 0]])
    mask = (ids != 0).long()
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with torch.no_grad():
        program = torch.onnx.export(
            graph_module(model).eval(),
            (ids, mask),
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=False)
    return path


def quantize_int8(fp32: Path, int8: Path) -> Path:
    """onnxruntime's CPU int8 file: its transformer fusions, then dynamic quantisation of the weights.

    `optimize_model(model_type="bert", opt_level=0)` fuses each residual add + LayerNorm into SkipLayerNormalization
    and each bias + GELU into BiasGelu (onnxruntime contrib ops, offline, so nothing here depends on the onnxruntime
    version that later loads the file); the quantised graph keeps these fusions. `quantize_dynamic` then stores every weight
    MatMul (per output channel) and the embedding Gather as int8 and quantises activations per call; the attention
    products of two activations stay fp32 (MatMulConstBOnly).
    """
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    with tempfile.TemporaryDirectory() as tmp:
        fused = Path(tmp) / "fused.onnx"
        # num_heads / hidden_size 0: read from the graph (only attention fusion uses them; ALiBi's bias keeps
        # MedEIR's attention unfused, all-MiniLM-L6-v2's fuses)
        optimize_model(str(fp32), model_type="bert", num_heads=0, hidden_size=0, opt_level=0).save_model_to_file(
            str(fused)
        )
        quantize_dynamic(
            str(fused),
            str(int8),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gather"],
            extra_options={"MatMulConstBOnly": True},
        )
    return int8


def parity(folder: Path, texts: list[str]) -> dict:
    """Cosine of each ONNX file's sentence embeddings against SentenceTransformer.encode on `texts` (min and mean)."""
    from sentence_transformers import SentenceTransformer

    from onnx_encoder import OnnxEncoder

    reference = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu").encode(texts)
    report = {}
    for name in (FP32_FILE, INT8_FILE):
        if (Path(folder) / ONNX_DIR / name).is_file():
            embeddings = OnnxEncoder(folder, file_name=f"{ONNX_DIR}/{name}").encode(texts)
            cosine = (embeddings * reference).sum(-1)
            report[name] = {"min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean())}
    return report


def export_folder(folder: Path, quantize: bool = True, check: bool = True, texts: list[str] = ()) -> dict:
    """Write `onnx/model.onnx` (and the int8 file) into a model folder; with `check`, raise if fp32 disagrees with
    torch on `texts` (train.export passes its CHECK_TEXTS)."""
    folder = Path(folder)
    if check and not texts:
        raise ValueError("export_folder(check=True) needs the texts to check on")
    fp32 = export_onnx(load_encoder(folder), folder / ONNX_DIR / FP32_FILE)
    files = {FP32_FILE: fp32}
    if quantize:
        files[INT8_FILE] = quantize_int8(fp32, folder / ONNX_DIR / INT8_FILE)
    report = {"files": {name: round(p.stat().st_size / 2**20, 1) for name, p in files.items()}}
    if check:
        report["parity"] = parity(folder, texts)
        worst = report["parity"][FP32_FILE]["min_cosine"]
        if not worst >= FP32_MIN_COSINE:
            raise OnnxParityError(f"{fp32} disagrees with torch: cosine {worst:.6f} < {FP32_MIN_COSINE}")
    return report
