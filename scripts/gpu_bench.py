"""The GPU check's own measurements: the bf16 matrix-product peak, forward+backward speed, and MLM step MFU.

    python -m scripts.gpu_bench peak  --out peak.json
    python -m scripts.gpu_bench train --preset base --backends sdpa sdpa-full-bias --lengths 512 2048 8192 --out t.json
    python -m scripts.gpu_bench mfu   --preset base --backends sdpa flex_attention --batch-sizes 32 128 --out m.json

Forward-only speed is `evaluation.speed`; `train` is its forward+backward counterpart and reuses its model builder
(`evaluation.speed.build_model`: MedEIR per backend, the materialised-bias variant, BertModel) and its peak-memory
window, in one process per preset (peak allocated memory is per window on CUDA, so processes need not be fresh).
`mfu` times `train.pretrain`'s step (bf16 autocast, sparse MLM prediction, gradient clipping, fused AdamW) on
full 512-token blocks, as `train.pretrain` packs them, and counts model FLOPs with `step_flops`.
"""

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
H200_BF16_PEAK_TFLOPS = 790.0  # measured on this workplace's H200s (8192^3 bf16 products on random data)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> list[float]:
    """Seconds per call of `fn`, each call timed alone (host clock after a device sync)."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_peak(device: str, size: int, repeats: int = 10) -> dict:
    """Dense matrix-product rate on random data (bf16 on CUDA, fp32 on a CPU): the ceiling MFU is read against."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    seconds = statistics.median(timed(lambda: a @ b, device, repeats))
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * size**3 / seconds / 1e12}


def train_speed(preset: str, backend: str, seq_len: int, batch_tokens: int, repeats: int, device: str, dtype_name: str):
    """Forward+backward tokens/s and peak memory growth of one configuration (evaluation.speed's models)."""
    import modeling_medeir
    from evaluation.speed import build_model, peak_memory, reset_peak_memory

    bias_elements = modeling_medeir.SDPA_BIAS_ELEMENTS
    try:
        torch.manual_seed(0)
        model = build_model(preset, backend, device, getattr(torch, dtype_name), seq_len).train()
        batch = max(1, batch_tokens // seq_len)
        ids = torch.randint(1000, 20000, (batch, seq_len), device=device)
        mask = torch.ones_like(ids)

        def step():
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            out.float().square().mean().backward()

        step()  # warm-up (and flex compilation)
        base = reset_peak_memory(device)
        seconds = statistics.median(timed(step, device, repeats))
        peak = peak_memory(device) - base
        return {"tokens_per_s": batch * seq_len / seconds, "peak_mb": max(peak, 0) / 2**20, "batch": batch}
    finally:
        modeling_medeir.SDPA_BIAS_ELEMENTS = bias_elements  # build_model raises it for sdpa-full-bias


def step_flops(config, tokens: int, masked_tokens: int, seq_len: int) -> dict:
    """Model FLOPs of one MLM training step (forward + backward), the convention MFU is quoted in.

    6 * N_encoder * T  +  6 * (N_head + N_decoder) * T_masked  +  12 * layers * hidden * S * T
    N_encoder: weights of the encoder's linear layers (qkv, out, up, down); N_head + N_decoder: the MLM head's
    dense layer and the vocabulary projection, which sparse prediction runs on masked tokens only; the last term is
    attention (QK^T and PV, 2 * 2 * S * hidden per token and layer forward, 3x with backward). Embedding lookups,
    norms, softmax and the optimizer are not counted.
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    up = (2 if config.feed_forward_type == "glu" else 1) * config.intermediate_size * h
    n_encoder = layers * (3 * h * h + h * h + up + config.intermediate_size * h)
    n_head = h * h + config.vocab_size * h
    attention = 12 * layers * h * seq_len * tokens
    total = 6 * n_encoder * tokens + 6 * n_head * masked_tokens + attention
    formula = "6*N_encoder*T + 6*(N_head+N_decoder)*T_masked + 12*layers*hidden*S*T"
    return {"flops": total, "n_encoder": n_encoder, "n_head_decoder": n_head, "formula": formula}


def mlm_step_mfu(
    preset: str, backend: str, batch: int, seq_len: int, steps: int, device: str, peak_tflops: float, mlm: float
) -> dict:
    """Time train.pretrain's step on random full blocks; MFU = step_flops / step time / peak."""
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    from configuration_medeir import MedEIRConfig
    from modeling_medeir import MedEIRForMaskedLM

    config = MedEIRConfig.from_json_file(REPO / "presets" / f"{preset}.json")
    config._attn_implementation = backend
    torch.manual_seed(0)
    model = MedEIRForMaskedLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenizer")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm, seed=0)
    rows = torch.randint(1000, config.vocab_size, (batch, seq_len)).tolist()
    inputs = {k: v.to(device) for k, v in collator([{"input_ids": r} for r in rows]).items()}
    masked = int((inputs["labels"] != -100).sum())
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            loss = model(**inputs, sparse_prediction=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(min(3, steps)):
        step()  # warm-up, compilation, optimizer state
    seconds = statistics.median(timed(step, device, steps))
    flops = step_flops(config, batch * seq_len, masked, seq_len)
    achieved = flops["flops"] / seconds / 1e12
    loss = float(step().detach())
    return {
        "batch": batch,
        "seq_len": seq_len,
        "step_s": seconds,
        "tokens_per_s": batch * seq_len / seconds,
        "model_tflops": achieved,
        "mfu": achieved / peak_tflops,
        "peak_tflops": peak_tflops,
        "masked_tokens": masked,
        "loss": loss,
        **flops,
    }


def each(rows: list[dict], keys: dict, fn) -> None:
    """Run one measurement, keep its error instead of losing the rows measured before it."""
    try:
        rows.append({**keys, **fn()})
    except Exception as error:  # an OOM or a backend failure is a result to report, not a crash
        rows.append({**keys, "error": f"{type(error).__name__}: {str(error)[:300]}"})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(json.dumps(rows[-1]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["peak", "train", "mfu"])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--backends", nargs="+", default=["sdpa"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2048, 8192])
    parser.add_argument("--batch-tokens", type=int, default=32768)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128], help="mfu: sequences per step")
    parser.add_argument("--seq-len", type=int, default=512, help="mfu")
    parser.add_argument("--mlm-probability", type=float, default=0.3, help="mfu (pretrain-base.yaml's)")
    parser.add_argument("--steps", type=int, default=10, help="timed repeats")
    parser.add_argument("--size", type=int, default=8192, help="peak: matrix size")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK_TFLOPS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="train: default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    rows: list[dict] = []
    if args.what == "peak":
        each(rows, {"device": args.device}, lambda: matmul_peak(args.device, args.size, args.steps))
    elif args.what == "train":
        for backend, n in [(b, n) for b in args.backends for n in args.lengths]:
            keys = {"preset": args.preset, "backend": backend, "seq_len": n, "mode": "forward+backward"}
            run = partial(train_speed, args.preset, backend, n, args.batch_tokens, args.steps, args.device, dtype)
            each(rows, keys, run)
    else:
        for backend, batch in [(b, n) for b in args.backends for n in args.batch_sizes]:
            keys = {"preset": args.preset, "backend": backend}
            run = partial(mlm_step_mfu, args.preset, backend, batch, args.seq_len, args.steps, args.device)
            each(rows, keys, partial(run, args.peak_tflops, args.mlm_probability))
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    args.out.write_text(json.dumps({"device": device, "dtype": dtype, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
