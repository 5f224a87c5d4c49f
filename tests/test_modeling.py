"""MedEIR modeling on CPU: ALiBi, every CPU attention backend against eager, padding, packing, bad input, heads."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F

import modeling_medeir as mm
from configuration_medeir import MedEIRConfig
from modeling_medeir import (
    MedEIRForMaskedLM,
    MedEIRForSequenceClassification,
    MedEIRModel,
    alibi_slopes,
)

from .conftest import REPO, tiny_config

LENGTHS = [37, 20, 5]  # a mixed-length batch: full, partly padded, mostly padded


def padded_batch(lengths=LENGTHS, left=False, vocab=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seq_len = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), seq_len), generator=gen)
    mask = (torch.arange(seq_len)[None] < torch.tensor(lengths)[:, None]).long()
    if left:
        mask = mask.flip(-1)
    return ids * mask, mask


def real_tokens(hidden, mask):
    """The rows' real-token states, concatenated: comparable across padded and packed layouts."""
    return hidden[mask.bool()]


def run(model, implementation, **inputs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def layout_of(model, ids, mask):
    """The attention layout the model builds for a padded batch under its current implementation."""
    return mm.AttentionLayout.for_padded_batch(
        model.config._attn_implementation, model._alibi_slopes(ids.device), tuple(ids.shape), mask
    ).prepared(torch.float32, mm.ALIBI_WINDOW_TAU)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MedEIRModel(tiny_config()).eval()


# ---- ALiBi ---------------------------------------------------------------------------------------------------


def test_alibi_slopes_power_of_two_heads():
    assert alibi_slopes(8) == [2.0**-i for i in range(1, 9)]


def test_alibi_slopes_other_head_counts_interleave():
    # 12 heads: the 8-head sequence, then every other slope of the 16-head sequence (Press et al.'s reference code)
    assert alibi_slopes(12) == pytest.approx([2.0**-i for i in range(1, 9)] + [2.0**-x for x in (0.5, 1.5, 2.5, 3.5)])
    assert alibi_slopes(6) == pytest.approx([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3])


def test_eager_attention_is_alibi_by_hand():
    """One head, two tokens: the attention weights must be softmax(q.k/sqrt(d) - slope*|i-j|)."""
    config = tiny_config(num_hidden_layers=1, num_attention_heads=1, hidden_size=8, intermediate_size=8)
    layout = mm.AttentionLayout("eager", torch.tensor([0.5]), shape=(1, 2)).prepared(torch.float32, None)
    assert torch.equal(layout.state.bias, torch.tensor([[[[0.0, -0.5], [-0.5, 0.0]]]]))
    q = torch.tensor([[[[1.0] * 8], [[0.0] * 8]]])  # (B=1, S=2, H=1, d=8)
    k = torch.tensor([[[[1.0] * 8], [[1.0] * 8]]])
    v = torch.tensor([[[[1.0] * 8], [[3.0] * 8]]])
    out = mm.eager_attention(q, k, v, layout, dropout=0.0, scaling=8**-0.5)
    s = 8 / 8**0.5
    w = torch.softmax(torch.tensor([s, s - 0.5]), 0)  # query 0: same scores, key 1 is one step away
    assert out[0, 0, 0, 0].item() == pytest.approx((w[0] + 3 * w[1]).item(), rel=1e-6)
    assert config.num_attention_heads == 1


def test_no_position_parameters_and_no_slope_buffers(model):
    names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    assert not any("position" in name or "slope" in name or "alibi" in name for name in names)


def test_fresh_weights_follow_the_stated_initialisation():
    config = tiny_config(initializer_range=0.05, hidden_size=96, intermediate_size=192)
    torch.manual_seed(0)
    model = MedEIRForMaskedLM(config)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            weight = module.weight.detach()
            if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                assert not weight[module.padding_idx].any(), name
                weight = torch.cat([weight[: module.padding_idx], weight[module.padding_idx + 1 :]])
            assert abs(weight.mean().item()) < 0.01 and 0.045 < weight.std().item() < 0.055, name
            if getattr(module, "bias", None) is not None:
                assert not module.bias.any(), name
        elif isinstance(module, torch.nn.LayerNorm):
            assert bool((module.weight == 1).all()) and not module.bias.any(), name


def test_a_padded_forward_reads_the_device_once():
    """Every input check and every scalar the layout needs come back in one transfer (eager: nothing is unpadded)."""
    from torch.overrides import TorchFunctionMode

    class HostReads(TorchFunctionMode):
        reads = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("__bool__", "__int__", "__float__", "item", "tolist", "equal"):
                HostReads.reads += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = MedEIRModel(tiny_config(attn_implementation="eager")).eval()
    ids, mask = padded_batch()
    with torch.no_grad(), HostReads():
        model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    assert HostReads.reads == 1


# ---- backends agree with eager -------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [LENGTHS, [37, 36, 33]], ids=["heavy-padding-unpadded", "light-padding-padded"])
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_sdpa_matches_eager_on_padded_batch(model, left, lengths):
    """Heavily padded batches run unpadded (q, k, v re-padded around the kernel); lightly padded ones stay padded."""
    ids, mask = padded_batch(lengths=lengths, left=left)
    ref = run(model, "eager", input_ids=ids, attention_mask=mask)
    out = run(model, "sdpa", input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    layout = layout_of(model, ids, mask)
    unpadded = layout.unpadding is not None
    assert unpadded == (mask.float().mean() < mm.SDPA_MIN_REAL_TOKENS) and isinstance(layout.state, mm.FullBias)


@pytest.mark.parametrize("strided", [True, False], ids=["strided-bias", "materialised-chunks"])
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_sdpa_long_input_chunks_match_eager(model, monkeypatch, left, strided):
    """Force the long-input path (per-sequence segments; the bias a strided view as on CPU, or materialised in query
    chunks as on other devices) on a small batch."""
    ids, mask = padded_batch(lengths=[150, 100, 7], left=left)
    ref = run(model, "eager", input_ids=ids, attention_mask=mask)
    monkeypatch.setattr(mm, "sdpa_reads_strided_bias", lambda device: strided)
    monkeypatch.setattr(mm, "SDPA_BIAS_ELEMENTS", 0)
    monkeypatch.setattr(mm, "SDPA_CHUNK_ELEMENTS", 6 * 150 * 64)  # 64-query chunks
    out = run(model, "sdpa", input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    no_pad = run(model, "sdpa", input_ids=ids)  # one segment over all rows
    monkeypatch.undo()
    torch.testing.assert_close(no_pad, run(model, "eager", input_ids=ids), atol=2e-5, rtol=1e-4)


def assert_flex_attention_matches_eager(model) -> None:
    """flex_attention against eager on a padded batch, and on the same batch packed into one row."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    ids, mask = padded_batch()
    ref = run(model, "eager", input_ids=ids, attention_mask=mask)
    out = run(model, "flex_attention", input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    packed, cu = pack(ids, mask)
    out = run(model, "flex_attention", input_ids=packed, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    torch.testing.assert_close(out[0], real_tokens(ref, mask), atol=2e-5, rtol=1e-4)


def test_flex_attention_forward_matches_eager(model):
    assert_flex_attention_matches_eager(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_half_precision_close_to_fp32_eager(dtype):
    torch.manual_seed(0)
    model = MedEIRModel(tiny_config()).eval()
    ids, mask = padded_batch()
    ref = run(model, "eager", input_ids=ids, attention_mask=mask)
    model.to(dtype)
    out = run(model, "sdpa", input_ids=ids, attention_mask=mask)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


# ---- padding and packing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_padding_never_changes_a_sequence(model, implementation):
    ids, mask = padded_batch()
    batch = run(model, implementation, input_ids=ids, attention_mask=mask)
    for row, length in enumerate(LENGTHS):
        alone = run(model, implementation, input_ids=ids[row : row + 1, :length])
        torch.testing.assert_close(batch[row, :length], alone[0], atol=2e-5, rtol=1e-4)
        assert torch.count_nonzero(batch[row, length:]) == 0, "padding positions must be zero"


def pack(ids, mask):
    lengths = mask.sum(-1)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return ids[mask.bool()][None], cu


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_packed_batch_equals_padded_batch(model, implementation, monkeypatch):
    ids, mask = padded_batch()
    padded = run(model, implementation, input_ids=ids, attention_mask=mask)
    packed, cu = pack(ids, mask)
    max_len = max(LENGTHS)
    out = run(model, implementation, input_ids=packed, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len)
    torch.testing.assert_close(out[0], real_tokens(padded, mask), atol=2e-5, rtol=1e-4)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]  # DataCollatorWithFlattening without cu_seq_lens
    out = run(model, implementation, input_ids=packed, position_ids=positions)
    torch.testing.assert_close(out[0], real_tokens(padded, mask), atol=2e-5, rtol=1e-4)
    if implementation == "sdpa":
        monkeypatch.setattr(mm, "SDPA_BIAS_ELEMENTS", 0)
        out = run(model, implementation, input_ids=packed, cu_seq_lens_q=cu)
        torch.testing.assert_close(out[0], real_tokens(padded, mask), atol=2e-5, rtol=1e-4)


def test_packed_batch_rejects_inconsistent_metadata(model):
    ids, mask = padded_batch()
    packed, cu = pack(ids, mask)
    with pytest.raises(ValueError, match="batch size 1"):
        model(input_ids=packed.expand(2, -1), cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="ends at"):
        model(input_ids=packed[:, :-1], cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="cu_seq_lens_k must equal"):
        model(input_ids=packed, cu_seq_lens_q=cu, cu_seq_lens_k=cu.flip(0))


# ---- bad input -----------------------------------------------------------------------------------------------


def test_token_ids_outside_vocabulary_raise(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(input_ids=torch.tensor([[1, 2, 1000]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(input_ids=torch.tensor([[-1, 2]]))


def test_wrong_input_types_and_shapes_raise(model):
    with pytest.raises(TypeError, match="integer"):
        model(input_ids=torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match=r"\(batch, sequence\)"):
        model(input_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 1]]))
    with pytest.raises(TypeError, match="cast it"):
        model(inputs_embeds=torch.zeros(1, 3, 48, dtype=torch.float64))


def test_inputs_on_another_device_raise(model):
    with pytest.raises(ValueError, match="move the inputs"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long, device="meta"))


def test_holes_in_attention_mask_raise(model):
    with pytest.raises(ValueError, match="contiguous"):
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), attention_mask=torch.tensor([[1, 0, 1, 1]]))


def test_empty_batch_is_a_defined_no_op(model):
    out = model(input_ids=torch.zeros(0, 7, dtype=torch.long)).last_hidden_state
    assert out.shape == (0, 7, 48)
    out = model(input_ids=torch.zeros(2, 0, dtype=torch.long), attention_mask=torch.zeros(2, 0)).last_hidden_state
    assert out.shape == (2, 0, 48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_all_zero_attention_row_gives_zeros_not_nan(implementation, dtype):
    torch.manual_seed(0)
    model = MedEIRModel(tiny_config()).eval().to(dtype)
    ids, mask = padded_batch()
    mask[1] = 0
    out = run(model, implementation, input_ids=ids, attention_mask=mask)
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[1]) == 0
    pooled = (out * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    assert torch.isfinite(pooled).all()


def test_input_longer_than_max_position_embeddings_runs_and_warns_once(caplog):
    from transformers.utils import logging as hf_logging

    model = MedEIRModel(tiny_config(max_position_embeddings=16)).eval()
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                out = model(input_ids=torch.ones(1, 40, dtype=torch.long)).last_hidden_state
    finally:
        hf_logging.disable_propagation()
    assert torch.isfinite(out).all()
    assert sum("longer than the 16 tokens" in r.getMessage() for r in caplog.records) == 1


# ---- attention implementation choice -------------------------------------------------------------------------


def test_default_is_sdpa_and_switching_works():
    model = MedEIRModel(tiny_config())
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("name", ["flash_attention_3", "paged|sdpa", "kernels-community/flash-attn2"])
def test_implementations_without_alibi_are_refused(name):
    with pytest.raises(ValueError, match="cannot apply MedEIR's ALiBi"):
        MedEIRModel._from_config(tiny_config(), attn_implementation=name)


def test_a_config_switched_behind_the_models_back_is_refused(model):
    model.config._attn_implementation_internal = "kernels-community/flash-attn2"  # what a kernels fallback sets
    try:
        with pytest.raises(ValueError, match="cannot apply MedEIR's ALiBi"):
            model(input_ids=torch.ones(1, 3, dtype=torch.long))
    finally:
        model.config._attn_implementation_internal = "sdpa"


def test_flash_attention_2_without_flash_attn_says_how_to_install():
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed")
    except Exception:
        pass
    with pytest.raises(ImportError, match="pip install flash-attn --no-build-isolation"):
        MedEIRModel._from_config(tiny_config(), attn_implementation="flash_attention_2")


# ---- training signal -----------------------------------------------------------------------------------------


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = MedEIRForMaskedLM(tiny_config())
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        if "token_type" not in name:  # only type 0 is used here; its row gets gradient
            assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_few_mlm_steps_lower_the_loss(implementation):
    torch.manual_seed(0)
    model = MedEIRForMaskedLM(tiny_config(attn_implementation=implementation))
    ids, mask = padded_batch(lengths=[24, 24, 16, 8])
    labels = ids.masked_fill(mask == 0, -100)
    inputs = ids.clone()
    inputs[:, ::3] = 103 % 1000  # mask every third token; the labels keep the originals
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(input_ids=inputs, attention_mask=mask, labels=labels).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 1.0, losses  # more than a nat in 12 steps


def test_sparse_prediction_gives_the_same_loss():
    torch.manual_seed(0)
    model = MedEIRForMaskedLM(tiny_config()).eval()
    ids, mask = padded_batch()
    labels = torch.full_like(ids, -100)
    labels[:, 1:4] = ids[:, 1:4]
    dense = model(input_ids=ids, attention_mask=mask, labels=labels)
    sparse = model(input_ids=ids, attention_mask=mask, labels=labels, sparse_prediction=True)
    assert sparse.logits.shape == (int((labels != -100).sum()), 1000)
    torch.testing.assert_close(sparse.loss, dense.loss)


def test_mlm_decoder_is_tied_to_the_word_embeddings():
    model = MedEIRForMaskedLM(tiny_config())
    assert model.decoder.weight.data_ptr() == model.model.embeddings.word_embeddings.weight.data_ptr()


def test_sequence_classification_pools_real_tokens_only():
    torch.manual_seed(0)
    model = MedEIRForSequenceClassification(tiny_config(num_labels=3)).eval()
    ids, mask = padded_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    assert out.logits.shape == (3, 3) and out.loss.ndim == 0
    alone = model(input_ids=ids[2:3, : LENGTHS[2]]).logits
    torch.testing.assert_close(out.logits[2:3], alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("packing", ["cu_seq_lens", "position_ids"])
def test_sequence_classification_of_a_packed_batch_equals_the_padded_batch(packing):
    """The packing kwargs reach the encoder and pooling is per document: one row of logits per packed document."""
    torch.manual_seed(0)
    model = MedEIRForSequenceClassification(tiny_config(num_labels=3)).eval()
    ids, mask = padded_batch()
    padded = model(input_ids=ids, attention_mask=mask).logits
    packed, cu = pack(ids, mask)
    if packing == "cu_seq_lens":
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    else:
        kwargs = dict(position_ids=torch.cat([torch.arange(n) for n in LENGTHS])[None])
    out = model(input_ids=packed, labels=torch.tensor([0, 2, 1]), **kwargs)
    assert out.logits.shape == (3, 3) and out.loss.ndim == 0
    torch.testing.assert_close(out.logits, padded, atol=2e-5, rtol=1e-4)


def test_glu_feed_forward_preset_runs():
    model = MedEIRModel(tiny_config(feed_forward_type="glu")).eval()
    assert model.layers[0].feed_forward.up.out_features == 2 * 96
    assert torch.isfinite(run(model, "sdpa", input_ids=torch.ones(2, 5, dtype=torch.long))).all()


# ---- the config's ALiBi slopes ---------------------------------------------------------------------------------
# Slopes are part of the model (`config.alibi_slopes`): every backend must attend with the config's, never recompute
# the standard ones. Two sets: the standard slopes scaled down (what the MiniLM conversion writes), and a non-monotone
# set with one head that has no position bias at all (slope 0) and steep heads that window on long inputs.
SLOPES = {
    "standard-x0.05": [0.05 * slope for slope in alibi_slopes(6)],
    "non-monotone": [0.3, 0.0, 0.02, 0.7, 0.001, 0.1],
}


@pytest.fixture(scope="module", params=list(SLOPES))
def sloped(request):
    torch.manual_seed(0)
    return MedEIRModel(tiny_config(alibi_slopes=SLOPES[request.param])).eval()


def test_the_configs_slopes_are_the_models(sloped):
    """The eager bias is -slope_h * |i - j| with the config's slopes; the standard slopes give other states."""
    slopes = torch.tensor(sloped.config.alibi_slopes)
    assert torch.equal(sloped._alibi_slopes(torch.device("cpu")), slopes)
    ids, mask = padded_batch()
    sloped.set_attn_implementation("eager")
    bias = layout_of(sloped, ids, mask).state.bias[0]  # the first row has no padding
    distance = (torch.arange(37)[:, None] - torch.arange(37)[None]).abs()
    torch.testing.assert_close(bias, -slopes[:, None, None] * distance, atol=0, rtol=0)
    standard = MedEIRModel(tiny_config()).eval()
    standard.load_state_dict(sloped.state_dict())  # same keys: slopes are config, not weights
    batch = dict(input_ids=ids, attention_mask=mask)
    assert (run(standard, "eager", **batch) - run(sloped, "eager", **batch)).abs().max() > 1e-2


@pytest.mark.parametrize("lengths", [LENGTHS, [37, 36, 33]], ids=["heavy-padding-unpadded", "light-padding-padded"])
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_sdpa_with_the_configs_slopes_matches_eager(sloped, left, lengths):
    ids, mask = padded_batch(lengths=lengths, left=left)
    ref = run(sloped, "eager", input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(run(sloped, "sdpa", input_ids=ids, attention_mask=mask), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("strided", [True, False], ids=["strided-bias", "materialised-chunks"])
def test_sdpa_per_sequence_with_the_configs_slopes_matches_eager(sloped, monkeypatch, strided):
    """The per-sequence path (the bias a strided Hankel view, or materialised per query chunk) on padded and packed
    inputs."""
    ids, mask = padded_batch(lengths=[150, 100, 7], left=True)
    ref = run(sloped, "eager", input_ids=ids, attention_mask=mask)
    monkeypatch.setattr(mm, "sdpa_reads_strided_bias", lambda device: strided)
    monkeypatch.setattr(mm, "SDPA_BIAS_ELEMENTS", 0)
    monkeypatch.setattr(mm, "SDPA_CHUNK_ELEMENTS", 6 * 150 * 64)  # 64-query chunks
    torch.testing.assert_close(run(sloped, "sdpa", input_ids=ids, attention_mask=mask), ref, atol=2e-5, rtol=1e-4)
    packed, cu = pack(ids, mask)
    out = run(sloped, "sdpa", input_ids=packed, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    torch.testing.assert_close(out[0], real_tokens(ref, mask), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_packed_batch_with_the_configs_slopes_equals_padded_eager(sloped, implementation):
    ids, mask = padded_batch()
    ref = run(sloped, "eager", input_ids=ids, attention_mask=mask)
    packed, cu = pack(ids, mask)
    out = run(sloped, implementation, input_ids=packed, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS))
    torch.testing.assert_close(out[0], real_tokens(ref, mask), atol=2e-5, rtol=1e-4)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    out = run(sloped, implementation, input_ids=packed, position_ids=positions)
    torch.testing.assert_close(out[0], real_tokens(ref, mask), atol=2e-5, rtol=1e-4)


def test_windowed_sdpa_with_the_configs_slopes_matches_eager(monkeypatch):
    """Long rows (padded, then packed): the exact-window bound reads the config's slopes, so the steep heads window
    and the head of slope 0 attends to every key."""
    torch.manual_seed(0)
    model = MedEIRModel(tiny_config(alibi_slopes=SLOPES["non-monotone"])).eval()
    ids, mask = padded_batch(lengths=[1100, 700], seed=1)
    ref = run(model, "eager", input_ids=ids, attention_mask=mask)
    calls = count_windowed_groups(monkeypatch)
    out = run(model, "sdpa", input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    packed, cu = pack(ids, mask)
    out = run(model, "sdpa", input_ids=packed, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    torch.testing.assert_close(out[0], real_tokens(ref, mask), atol=2e-5, rtol=1e-4)
    assert len(calls) == 2 * 2  # 2 layers, padded then packed: the 1,100-token row (700 is under the window minimum)
    for groups in calls:
        window = {head: w for heads, w in groups for head in heads}
        assert window[3] < 200 and window[1] == 1099, groups  # slope 0.7: narrow; slope 0: every key


def test_flex_attention_with_the_configs_slopes_matches_eager(sloped):
    assert_flex_attention_matches_eager(sloped)


def test_flex_attention_windowed_with_the_configs_slopes_matches_eager():
    assert_windowed_flex_attention_matches_eager(tiny_config(alibi_slopes=SLOPES["non-monotone"]))


def test_saved_slopes_come_back_and_give_the_same_states(sloped, tmp_path):
    from transformers import AutoModel

    sloped.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["alibi_slopes"] == sloped.config.alibi_slopes
    ids, mask = padded_batch()
    ref = run(sloped, "sdpa", input_ids=ids, attention_mask=mask)
    for loaded in (MedEIRModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path, trust_remote_code=True)):
        assert loaded.config.alibi_slopes == sloped.config.alibi_slopes  # exactly: JSON keeps every float
        assert torch.equal(run(loaded.eval(), "sdpa", input_ids=ids, attention_mask=mask), ref)


def test_slopes_edited_on_a_live_model_take_effect_and_are_checked():
    torch.manual_seed(0)
    model = MedEIRModel(tiny_config()).eval()
    ids = torch.randint(1, 1000, (2, 30), generator=torch.Generator().manual_seed(0))
    standard = run(model, "sdpa", input_ids=ids)
    model.config.alibi_slopes = SLOPES["non-monotone"]
    try:
        edited = run(model, "sdpa", input_ids=ids)
        fresh = MedEIRModel(tiny_config(alibi_slopes=SLOPES["non-monotone"])).eval()
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(edited, run(fresh, "sdpa", input_ids=ids)) and not torch.equal(edited, standard)
        model.config.alibi_slopes = [0.5] * 5
        with pytest.raises(ValueError, match="one slope per attention head: 6 values, got 5"):
            model(input_ids=ids)
    finally:
        model.config.alibi_slopes = None
    assert torch.equal(run(model, "sdpa", input_ids=ids), standard)


# ---- config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("preset", "layers", "hidden", "ffn"), [("small", 6, 384, "mlp"), ("base", 12, 768, "glu")])
def test_presets(preset, layers, hidden, ffn, tmp_path):
    config = MedEIRConfig.from_json_file(REPO / "presets" / f"{preset}.json")
    assert (config.num_hidden_layers, config.hidden_size, config.feed_forward_type) == (layers, hidden, ffn)
    assert config.vocab_size == 52543 and config.max_position_embeddings == 8192
    config.save_pretrained(tmp_path)
    again = MedEIRConfig.from_pretrained(tmp_path)
    assert type(again.num_hidden_layers) is int and again.to_dict() == config.to_dict()
    assert again.auto_map["AutoModelForMaskedLM"] == "modeling_medeir.MedEIRForMaskedLM"


def test_config_validation():
    with pytest.raises(Exception, match="multiple of num_attention_heads"):
        MedEIRConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(Exception, match="feed_forward_type"):
        MedEIRConfig(feed_forward_type="swiglu")


# ==== exact windowed ALiBi =================================================================================
# Real long documents (ICD-10-CM categories with their notes, rendered by corpus.sources.icd10cm from the
# simple-icd-10-cm package) through the shipped model: windowed attention must equal full attention.

SHIPPED = REPO / "models" / "medeir-small"


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoTokenizer

    return MedEIRModel.from_pretrained(SHIPPED).eval(), AutoTokenizer.from_pretrained(SHIPPED)


@pytest.fixture(scope="module")
def long_documents():
    from corpus.sources import icd10cm

    from .data_fixtures import parsed

    icd = parsed("icd10cm")
    return [
        "\n".join(line for _, line in icd10cm.render_category(icd, code, with_notes=True)) for code in ("S06", "L89")
    ]


def count_windowed_groups(monkeypatch) -> list:
    """Record the head groups of every `sdpa_by_head_group` call that windows a head (full attention runs through it
    too), so a test knows windowing really happened."""
    calls = []
    original = mm.sdpa_by_head_group

    def spy(q, k, v, slopes, groups, *args):
        if any(window < q.shape[2] - 1 for _, window in groups):
            calls.append(groups)
        return original(q, k, v, slopes, groups, *args)

    monkeypatch.setattr(mm, "sdpa_by_head_group", spy)
    return calls


def windowed_and_full(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """last_hidden_state with the default windowed ALiBi, then with full attention (alibi_window_tau None)."""
    with torch.no_grad():
        windowed = model(**batch).last_hidden_state
        model.config.alibi_window_tau = None
        try:
            full = model(**batch).last_hidden_state
        finally:
            del model.config.alibi_window_tau
    return windowed, full


def test_windowed_alibi_equals_full_attention_on_long_documents(shipped, long_documents, monkeypatch):
    model, tokenizer = shipped
    batch = tokenizer(long_documents, return_tensors="pt", padding=True, truncation=True, max_length=2048)
    batch["attention_mask"][1, 1500:] = 0  # a shorter second document: right padding, its own windows
    batch["input_ids"] = batch["input_ids"] * batch["attention_mask"]
    calls = count_windowed_groups(monkeypatch)
    windowed, full = windowed_and_full(model, batch)
    # 6 layers x 2 sequences, and some heads attend to far fewer keys than the sequence has
    assert len(calls) == 12 and all(min(w for _, w in groups) < 200 for groups in calls), calls[0]
    torch.testing.assert_close(windowed, full, atol=1e-5, rtol=0)


def test_windowed_alibi_runs_on_an_unpadded_batch_whose_bias_would_fit(shipped, long_documents, monkeypatch):
    """2 x 1,100 tokens, no padding: the whole bias fits SDPA_BIAS_ELEMENTS, yet sdpa windows (it is faster there)."""
    model, tokenizer = shipped
    batch = tokenizer(long_documents, return_tensors="pt", truncation=True, max_length=1100)
    assert batch["attention_mask"].all() and mm.SDPA_BIAS_ELEMENTS > 2 * 12 * 1100**2
    calls = count_windowed_groups(monkeypatch)
    windowed, full = windowed_and_full(model, batch)
    assert len(calls) == 12
    torch.testing.assert_close(windowed, full, atol=1e-5, rtol=0)


def test_sdpa_attends_in_full_where_a_window_would_span_half_the_sequence(monkeypatch):
    """A 700-token window in 1,100 tokens: chunk + 2 windows cover the sequence, so that head attends in full; a
    narrow head still windows. The groups are those of `group_heads_by_window` after sdpa's span rule."""
    torch.manual_seed(0)
    slopes = torch.tensor(alibi_slopes(2))
    layout = mm.AttentionLayout.for_padded_batch("sdpa", slopes, (1, 1100), None).prepared(torch.float32, 20.0)
    monkeypatch.setattr(mm, "alibi_windows", lambda *args: [60, 700])
    calls = count_windowed_groups(monkeypatch)
    q = k = v = torch.randn(1100, 2, 8)
    mm.sdpa_attention(q, k, v, layout, 0.0, 8**-0.5)
    assert calls == [[([0], 60), ([1], 1099)]]


@pytest.mark.parametrize("strided", [True, False], ids=["strided-bias", "materialised-chunks"])
def test_windowed_sdpa_equals_full_bias_attention(monkeypatch, strided):
    """Head groups with windows from `alibi_windows`, one of them attending in full, read the bias as a strided view
    of one vector (CPU) or materialised per query chunk (other devices): both equal one call on the whole bias."""
    monkeypatch.setattr(mm, "sdpa_reads_strided_bias", lambda device: strided)
    monkeypatch.setattr(mm, "SDPA_CHUNK_ELEMENTS", 4 * 400 * 64)  # materialised: several chunks per group
    torch.manual_seed(0)
    heads, length, dim = 4, 400, 16
    slopes = torch.tensor([1.0, 0.5, 0.25, 1 / 512])
    q, k, v = (torch.randn(1, heads, length, dim) * 0.3 for _ in range(3))
    windows = mm.alibi_windows(q[0], k[0], slopes, dim**-0.5, mm.ALIBI_WINDOW_TAU, length)
    groups = mm.group_heads_by_window(windows, length)
    assert groups is not None and groups[0][1] < 100 and groups[-1] == ([3], length - 1), groups
    layout = mm.AttentionLayout("sdpa", slopes)
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.alibi_bias(length, torch.float32), scale=dim**-0.5)
    out = mm.sdpa_by_head_group(q, k, v, slopes, groups, 0.0, dim**-0.5)
    torch.testing.assert_close(out, full, atol=1e-6, rtol=0)


def test_windowed_alibi_gradients_equal_full_attention(shipped, long_documents, monkeypatch):
    model, tokenizer = shipped
    batch = tokenizer(long_documents[:1], return_tensors="pt", truncation=True, max_length=1100)
    monkeypatch.setattr(mm, "SDPA_BIAS_ELEMENTS", 0)  # the chunked path, where windowing runs, on a 1,100-token input
    calls = count_windowed_groups(monkeypatch)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def gradients():
        model.zero_grad()
        (model(**batch).last_hidden_state.mean(1) @ direction).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    windowed = gradients()
    model.config.alibi_window_tau = None
    try:
        full = gradients()
    finally:
        del model.config.alibi_window_tau
        model.zero_grad()
    assert len(calls) == 6 and windowed.keys() == full.keys()
    for name in full:
        scale = full[name].abs().max().item()
        torch.testing.assert_close(windowed[name], full[name], atol=1e-5 * max(scale, 1.0), rtol=0, msg=name)


def test_windowed_alibi_leaves_the_model_unchanged_where_windows_cover_the_sequence(shipped, long_documents):
    """A tolerance so strict that every window covers the sequence runs exactly today's code: bit-identical."""
    model, tokenizer = shipped
    batch = tokenizer(long_documents[:1], return_tensors="pt", truncation=True, max_length=2500)
    with torch.no_grad():
        model.config.alibi_window_tau = 1e9
        try:
            covered = model(**batch).last_hidden_state
            model.config.alibi_window_tau = None
            full = model(**batch).last_hidden_state
        finally:
            del model.config.alibi_window_tau
    assert torch.equal(covered, full)


def test_windowed_alibi_widens_for_extreme_scores():
    """A far key whose score dwarfs ALiBi's penalty: the bound must widen the window to keep it, and stays exact."""
    torch.manual_seed(0)
    heads, length, dim = 8, 1536, 32
    slopes = torch.tensor(alibi_slopes(heads))  # 1/2, 1/4, ..., 1/256
    q, k, v = (torch.randn(1, heads, length, dim) * 0.3 for _ in range(3))
    scaling = dim**-0.5

    def windows_of(q, k):
        return mm.alibi_windows(q[0], k[0], slopes, scaling, mm.ALIBI_WINDOW_TAU, length)

    calm = windows_of(q, k)
    q[:, :, 0] = torch.randn(dim) * 2
    k[:, :2, 1400] = q[0, :2, 0] * 60  # on the two steepest heads query 0's score for key 1,400 beats -slope * 1400
    extreme = windows_of(q, k)
    assert max(calm[:3]) < 1400 <= min(extreme[:2]) and extreme[2] < 1400, (calm, extreme)

    layout = mm.AttentionLayout("eager", slopes, shape=(1, length)).prepared(torch.float32, None)
    reference = mm.eager_attention(*(x.transpose(1, 2) for x in (q, k, v)), layout, 0.0, scaling).transpose(1, 2)
    out = mm.sdpa_by_head_group(q, k, v, slopes, mm.group_heads_by_window(extreme, length), 0.0, scaling)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    # the window of the calm input would have dropped the far key: that output is wrong for query 0
    stale = mm.sdpa_by_head_group(q, k, v, slopes, mm.group_heads_by_window(calm, length), 0.0, scaling)
    assert (stale[:, :, 0] - reference[:, :, 0]).abs().max() > 0.1


def test_windowed_alibi_groups_heads_and_keeps_full_heads_full():
    groups = mm.group_heads_by_window([50, 90, 300, 5000, 40], 1000)
    assert groups == [([4, 0], 50), ([1], 90), ([2], 300), ([3], 999)]
    assert mm.group_heads_by_window([1000, 2000], 1000) is None


def test_flex_attention_windowed_matches_eager():
    """CPU FlexAttention with the per-head windowed block mask (padded batch of 1,100 positions)."""
    assert_windowed_flex_attention_matches_eager(tiny_config())


def assert_windowed_flex_attention_matches_eager(config) -> None:
    """flex_attention with windowing engaged against eager, on a padded batch of 1,100 positions."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    model = MedEIRModel(config).eval()
    ids, mask = padded_batch(lengths=[1100, 700], seed=1)
    ref = run(model, "eager", input_ids=ids, attention_mask=mask)
    model.set_attn_implementation("flex_attention")
    layout = layout_of(model, ids, mask)
    q = k = torch.randn(2, 6, 1100, 8)
    assert mm.flex_windowed_block_mask(q, k, layout, 8**-0.5) is not layout.state.block_mask  # windowing engages here
    out = run(model, "flex_attention", input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


# ==== bf16 on CPU =========================================================================================


@pytest.mark.parametrize("long_input", [False, True], ids=["batched-bias", "chunked-windowed"])
def test_cpu_autocast_bf16_runs_and_agrees(monkeypatch, long_input):
    """torch.autocast('cpu', bfloat16): q, k, v come out of the linear layers in bf16 while the bias was built in fp32."""
    torch.manual_seed(0)
    model = MedEIRModel(tiny_config()).eval()
    ids, mask = padded_batch(lengths=[1100, 900] if long_input else LENGTHS)
    if long_input:
        monkeypatch.setattr(mm, "SDPA_BIAS_ELEMENTS", 0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    cosine = torch.nn.functional.cosine_similarity(out.float()[real], ref[real], dim=-1)
    assert cosine.min() > 0.99
