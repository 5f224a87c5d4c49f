"""GPU parity: flash_attention_2, flex_attention and sdpa against eager in bf16/fp16, forward and backward,
padded and packed batches, and sentence-transformers' packed (unpadded) encode. Skipped without CUDA;
`gpu/run_tests.sh` runs them on a GPU machine after `gpu/setup.sh` has built flash-attn."""

import pytest
import torch

from modeling_medeir import MedEIRModel

from .conftest import tiny_config
from .test_modeling import pack, padded_batch, real_tokens

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


IMPLEMENTATIONS = [
    "sdpa",
    "flex_attention",
    pytest.param(
        "flash_attention_2", marks=pytest.mark.skipif(not has_flash_attn(), reason="flash-attn is not installed")
    ),
]
DTYPES = [torch.bfloat16, torch.float16]
# head_dim 64 (flash-attn needs a multiple of 8), 12 heads: the interleaved slopes of the real presets
CONFIG = dict(hidden_size=768, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=2, vocab_size=1000)
LENGTHS = [300, 173, 64, 9]


def gpu_model(implementation: str, dtype: torch.dtype) -> MedEIRModel:
    torch.manual_seed(0)
    model = MedEIRModel(tiny_config(**CONFIG)).to("cuda", dtype)
    model.set_attn_implementation(implementation)
    return model


def forward_backward(model, **inputs):
    model.zero_grad()
    out = model(**inputs).last_hidden_state
    mask = inputs.get("attention_mask")
    states = real_tokens(out, mask) if mask is not None else out[0]
    (states.float().square().mean()).backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return states.detach().float(), grads


def assert_close_relative(actual, expected, tolerance):
    error = (actual - expected).norm() / expected.norm().clamp(min=1e-6)
    assert error < tolerance, f"relative error {error:.4f} >= {tolerance}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_forward_and_backward_match_eager_on_a_padded_batch(implementation, dtype):
    ids, mask = padded_batch(LENGTHS, vocab=1000)
    ids, mask = ids.cuda(), mask.cuda()
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
    padded_states, _ = forward_backward(model, input_ids=ids.cuda(), attention_mask=mask.cuda())
    cu = cu.cuda()
    packed_states, _ = forward_backward(
        model, input_ids=packed.cuda(), cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS)
    )
    assert_close_relative(packed_states, padded_states, 0.02 if dtype == torch.bfloat16 else 0.005)


@pytest.mark.skipif(not has_flash_attn(), reason="flash-attn is not installed")
def test_sentence_transformers_packed_batches_equal_padded_batches(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    texts = [" ".join(["fever"] * n) + " and cough" for n in (1, 5, 40, 200)]
    kwargs = dict(trust_remote_code=True, device="cuda")
    model_kwargs = {"attn_implementation": "flash_attention_2", "dtype": torch.bfloat16}
    packed = SentenceTransformer(str(tiny_model_dir), model_kwargs=model_kwargs, **kwargs)
    assert packed[0].can_flatten_inputs, "sentence-transformers did not choose the packed (unpadded) path"
    padded = SentenceTransformer(str(tiny_model_dir), model_kwargs=model_kwargs, **kwargs)
    padded[0].unpad_inputs = False
    a = packed.encode(texts, convert_to_tensor=True).float()
    b = padded.encode(texts, convert_to_tensor=True).float()
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
