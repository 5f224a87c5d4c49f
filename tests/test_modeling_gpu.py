"""GPU parity: flash_attention_2, flex_attention and sdpa against eager in bf16/fp16, eager in bf16/fp16 against
fp32, forward and backward, padded and packed batches (cu_seq_lens_q, and the batches sentence-transformers' own
flattening collator builds), and sentence-transformers' packed encode against its padded one. Skipped without CUDA;
`scripts/gpu_check.sh` runs them on a GPU machine (flash-attn built there). MEDEIR_GPU_TESTS_DEVICE=cpu runs what a
CPU can (no flex_attention backward, no flash-attn) so the GPU check's rehearsal exercises these tests' code."""

import os

import pytest
import torch

from modeling_medeir import MedEIRForMaskedLM, MedEIRModel

from .conftest import REPO, tiny_config
from .test_modeling import pack, padded_batch, real_tokens

DEVICE = os.environ.get("MEDEIR_GPU_TESTS_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


needs_flash_attn = pytest.mark.skipif(
    DEVICE != "cuda" or not has_flash_attn(), reason="flash-attn is not installed (or not a CUDA device)"
)
IMPLEMENTATIONS = [
    "sdpa",
    pytest.param(
        "flex_attention",
        marks=pytest.mark.skipif(DEVICE != "cuda", reason="flex_attention has no backward on a CPU"),
    ),
    pytest.param("flash_attention_2", marks=needs_flash_attn),
]
DTYPES = [torch.bfloat16, torch.float16]
# head_dim 64 (flash-attn needs a multiple of 8), 12 heads: the interleaved slopes of the real presets
CONFIG = dict(hidden_size=768, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=2, vocab_size=1000)
LENGTHS = [300, 173, 64, 9]


def gpu_model(implementation: str, dtype: torch.dtype, **overrides) -> MedEIRModel:
    torch.manual_seed(0)
    model = MedEIRModel(tiny_config(**(CONFIG | overrides))).to(DEVICE, dtype)
    model.set_attn_implementation(implementation)
    return model


def forward_backward(model, **inputs):
    """Real-token states and gradients of a fixed random projection of them. (Not their mean square: after the
    final LayerNorm that is ~1 whatever the weights, so its gradients would be rounding noise.)"""
    model.zero_grad()
    out = model(**inputs).last_hidden_state
    mask = inputs.get("attention_mask")
    states = real_tokens(out, mask) if mask is not None else out[0]
    probe = torch.randn(states.shape, generator=torch.Generator().manual_seed(1)).to(states.device)
    (states.float() * probe).sum().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return states.detach().float(), grads


def assert_close_relative(actual, expected, tolerance):
    error = (actual - expected).norm() / expected.norm().clamp(min=1e-6)
    assert error < tolerance, f"relative error {error:.4f} >= {tolerance}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_forward_and_backward_match_eager_on_a_padded_batch(implementation, dtype):
    ids, mask = padded_batch(LENGTHS, vocab=1000)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    ref_states, ref_grads = forward_backward(gpu_model("eager", dtype), input_ids=ids, attention_mask=mask)
    states, grads = forward_backward(gpu_model(implementation, dtype), input_ids=ids, attention_mask=mask)
    tolerance = 0.02 if dtype == torch.bfloat16 else 0.005
    assert_close_relative(states, ref_states, tolerance)
    assert grads.keys() == ref_grads.keys()
    for name in ("layers.0.attention.qkv.weight", "layers.1.attention.qkv.weight", "embeddings.word_embeddings.weight"):
        assert_close_relative(grads[name], ref_grads[name], 5 * tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_packed_batch_matches_padded_batch(implementation, dtype):
    ids, mask = padded_batch(LENGTHS, vocab=1000)
    packed, cu = pack(ids, mask)
    model = gpu_model(implementation, dtype)
    padded_states, _ = forward_backward(model, input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE))
    cu = cu.to(DEVICE)
    packed_states, _ = forward_backward(
        model, input_ids=packed.to(DEVICE), cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS)
    )
    assert_close_relative(packed_states, padded_states, 0.02 if dtype == torch.bfloat16 else 0.005)


# Not the standard slopes: a head of slope 0 (no position bias) and steep heads that window at 1,100 tokens.
SLOPES = [0.3, 0.0, 0.02, 0.7, 0.001, 0.1, 0.05, 0.5, 0.004, 0.2, 0.0005, 0.01]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_the_configs_slopes_reach_every_kernel(implementation):
    """config.alibi_slopes, bf16, a padded batch long enough to window and the same batch packed: every backend
    matches eager with the same slopes."""
    lengths = [1100, 300, 9]
    ids, mask = padded_batch(lengths, vocab=1000)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    reference = gpu_model("eager", torch.bfloat16, alibi_slopes=SLOPES)
    ref_states, _ = forward_backward(reference, input_ids=ids, attention_mask=mask)
    model = gpu_model(implementation, torch.bfloat16, alibi_slopes=SLOPES)
    states, _ = forward_backward(model, input_ids=ids, attention_mask=mask)
    assert_close_relative(states, ref_states, 0.02)
    packed, cu = pack(ids.cpu(), mask.cpu())
    cu = cu.to(DEVICE)
    packed_states, _ = forward_backward(
        model, input_ids=packed.to(DEVICE), cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths)
    )
    assert_close_relative(packed_states, ref_states, 0.02)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_eager_half_precision_matches_fp32_eager(dtype, left):
    """The reference itself in bf16/fp16 (fp32 scores and softmax inside) against fp32, forward and backward."""
    ids, mask = padded_batch(LENGTHS, left=left, vocab=1000)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    ref_states, ref_grads = forward_backward(gpu_model("eager", torch.float32), input_ids=ids, attention_mask=mask)
    states, grads = forward_backward(gpu_model("eager", dtype), input_ids=ids, attention_mask=mask)
    tolerance = 0.02 if dtype == torch.bfloat16 else 0.005
    assert_close_relative(states, ref_states, tolerance)
    for name in ("layers.0.attention.qkv.weight", "layers.1.attention.qkv.weight", "embeddings.word_embeddings.weight"):
        assert_close_relative(grads[name], ref_grads[name], 5 * tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("implementation", ["eager", *IMPLEMENTATIONS])
def test_sentence_transformers_flattened_batch_matches_padded_batch(implementation, dtype):
    """The packed batch exactly as sentence-transformers builds it (DataCollatorWithFlattening with flash kwargs,
    position_ids and seq_idx), forward and backward, equals the padded batch."""
    from transformers import DataCollatorWithFlattening

    ids, mask = padded_batch(LENGTHS, vocab=1000)
    features = [{"input_ids": row[m.bool()].tolist()} for row, m in zip(ids, mask, strict=True)]
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True, return_seq_idx=True)
    flat = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in collator(features).items() if k != "labels"}
    model = gpu_model(implementation, dtype)
    padded_states, padded_grads = forward_backward(model, input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE))
    flat_states, flat_grads = forward_backward(model, **flat)
    tolerance = 0.02 if dtype == torch.bfloat16 else 0.005
    assert_close_relative(flat_states, padded_states, tolerance)
    assert_close_relative(
        flat_grads["layers.0.attention.qkv.weight"], padded_grads["layers.0.attention.qkv.weight"], 5 * tolerance
    )


@pytest.fixture(scope="module")
def medeir_tokenizer_model_dir(tmp_path_factory):
    """A small saved MedEIR (head dim 64, as the patched flash-attn build has) on the repository's tokenizer, with
    the sentence-transformers files: needs no model package, so it builds on the GPU machine too."""
    from transformers import AutoTokenizer

    from train.initialize import save

    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenizer")
    torch.manual_seed(0)
    config = tiny_config(**(CONFIG | {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}))
    path = tmp_path_factory.mktemp("medeir-st")
    save(MedEIRForMaskedLM(config), tokenizer, path, {"test": "gpu"})
    return path


@needs_flash_attn
def test_sentence_transformers_packed_batches_equal_padded_batches(medeir_tokenizer_model_dir):
    from sentence_transformers import SentenceTransformer

    texts = [" ".join(["fever"] * n) + " and cough" for n in (1, 5, 40, 200)]
    kwargs = dict(trust_remote_code=True, device=DEVICE)
    model_kwargs = {"attn_implementation": "flash_attention_2", "dtype": torch.bfloat16}
    packed = SentenceTransformer(str(medeir_tokenizer_model_dir), model_kwargs=model_kwargs, **kwargs)
    assert packed[0].can_flatten_inputs, "sentence-transformers did not choose the packed (unpadded) path"
    padded = SentenceTransformer(str(medeir_tokenizer_model_dir), model_kwargs=model_kwargs, **kwargs)
    padded[0].unpad_inputs = False
    a = packed.encode(texts, convert_to_tensor=True).float()
    b = padded.encode(texts, convert_to_tensor=True).float()
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
