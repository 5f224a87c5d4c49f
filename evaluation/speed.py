"""Encoding throughput and peak memory against sequence length, per attention backend, next to BertModel.

    python -m evaluation.speed                        # both presets, 128..8192 tokens, every available backend
    python -m evaluation.speed --presets small --lengths 128 512 --out speed.json

Each measurement runs in a fresh process, so peak memory (CPU: peak RSS growth; CUDA: peak allocated) belongs
to that one configuration. Every run encodes about `--batch-tokens` tokens per forward (batch = tokens / length)
of random token ids, after one warm-up forward (which also compiles flex_attention). Rows:

    medeir/<backend>      MedEIR of the preset's shape (random weights: speed does not depend on them)
    medeir/sdpa-full-bias MedEIR with the whole (B, H, S, S) bias materialised up front, as Jina v2's code does
    bert                  transformers' BertModel of the same shape (small = all-MiniLM-L6-v2's config), sdpa,
                          with max_position_embeddings raised so that it runs at every length
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"small": REPO / "presets" / "small.json", "base": REPO / "presets" / "base.json"}
BACKENDS = ["eager", "sdpa", "sdpa-full-bias", "flex_attention", "flash_attention_2", "bert"]


def available_backends(device: str) -> list[str]:
    backends = ["sdpa", "sdpa-full-bias", "flex_attention", "bert"]
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            backends.insert(0, "flash_attention_2")
        except Exception:
            pass
    return backends


def build_model(preset: str, backend: str, device: str, dtype: torch.dtype, max_len: int) -> torch.nn.Module:
    sys.path.insert(0, str(REPO))
    import modeling_medeir
    from configuration_medeir import MedEIRConfig

    config = MedEIRConfig.from_json_file(PRESETS[preset])
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
        modeling_medeir.SDPA_BIAS_ELEMENTS = float("inf")
        backend = "sdpa"
    config._attn_implementation = backend
    return modeling_medeir.MedEIRModel(config).to(device, dtype).eval()


def measure(preset: str, backend: str, seq_len: int, batch_tokens: int, repeats: int, device: str, dtype_name: str):
    """One configuration, in this process: tokens/s and peak memory growth in MB."""
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = build_model(preset, backend, device, dtype, seq_len)
    batch = max(1, batch_tokens // seq_len)
    ids = torch.randint(1000, 20000, (batch, seq_len), device=device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)  # warm-up (and flex compilation)
        base = reset_peak_memory(device)
        start = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids, attention_mask=mask)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
    peak = peak_memory(device) - base
    return {"tokens_per_s": batch * seq_len / seconds, "peak_mb": max(peak, 0) / 2**20, "batch": batch}


def encode_throughput(
    model, lengths: list[int], batch_tokens: int = 8192, repeats: int = 3, seed: int = 0
) -> list[dict]:
    """Tokens/s of an already-loaded SentenceTransformer (all its modules: encoder, pooling, normalize) at each length.

    Same method as `measure`: random token ids (tokenization excluded), ~`batch_tokens` tokens per forward, one
    warm-up forward, mean of `repeats`. A length above the model's max_seq_length is reported as skipped, since the
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
            model(dict(features))  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                model(dict(features))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / repeats
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

    CPU: writing 5 to /proc/self/clear_refs resets the process's peak RSS (VmHWM) on Linux, so warm-up and
    compilation do not count; elsewhere the peak since process start is used.
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
    command += ["--device", args.device, "--dtype", args.dtype]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
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
            lines.append(f"| {'bert' if backend == 'bert' else 'medeir/' + backend} | " + " | ".join(cells) + " |")
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
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "base"], choices=sorted(PRESETS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 512, 2048, 8192])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, help="default: every one available here")
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", type=Path, help="write the measurements as JSON")
    parser.add_argument("--worker", nargs=3, metavar=("PRESET", "BACKEND", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    if args.worker:
        preset, backend, seq_len = args.worker
        print(
            json.dumps(measure(preset, backend, int(seq_len), args.batch_tokens, args.repeats, args.device, args.dtype))
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
        f"mean of {args.repeats} timed forwards after one warm-up; "
        f"MB = peak memory growth during the timed forwards."
    )
    print(markdown_table(rows, args.lengths))
    print("\n" + "\n".join(summary(rows)))
    if args.out:
        meta = {"device": device_name, "threads": threads, "dtype": args.dtype, "torch": torch.__version__}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
