"""MedEIR: a bidirectional BERT-style encoder with ALiBi position biases (no position embeddings).

Attention adds the symmetric ALiBi bias `-slope_h * |i - j|` to the scaled scores of head `h`, with the slopes of
the config (`config.alibi_slopes`; None: the standard geometric sequence, `alibi_slopes`). Every backend
applies it itself, because transformers' own sdpa / flash_attention_2 integrations drop it. The backends, by
transformers' names for them, are in ATTENTION_BACKENDS; each is a `prepare` that runs once per forward and returns
the backend's own state, and an `attend` that every layer calls:

    eager              the reference: padded tokens, fp32 scores and softmax over a full bias
    sdpa (default)     torch SDPA with the bias as a float mask, built once per forward and shared by all
                       layers; long inputs attend per sequence so memory grows about linearly
    flex_attention     ALiBi as a score_mod, padding or packed documents as a block mask
    flash_attention_2  flash_attn_varlen_func(alibi_slopes=...) on unpadded tokens (unpadded once per forward)

Any other implementation raises instead of running without the bias. Padded batches (any padding side) and
packed batches (sentence-transformers' `cu_seq_lens_q` / `max_length_q`) are both supported by every backend.
Padding positions of `last_hidden_state` are zero. On sequences of ALIBI_WINDOW_MIN_LENGTH tokens or more, sdpa,
flex_attention and flash_attention_2 skip the keys that provably carry no attention (exact windowed ALiBi).

The file reads top to bottom: ALiBi slopes; the inputs (host checks, one device read, the statistics); the
attention layout shared by every layer; exact windowed ALiBi; the attention backends and their registry; the
modules; the tokenizer check of loading; the models; the heads.

This file is Hub remote code: it imports only torch and transformers at top level and stays self-contained.
"""

import json
import math
import os
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field, replace
from functools import cache
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput
from transformers.utils import logging

try:  # loaded as Hub remote code (a package): the config sits next to this file
    from .configuration_medeir import ALIBI_WINDOW_TAU, MedEIRConfig
except ImportError:  # imported from a checkout of the repository
    from configuration_medeir import ALIBI_WINDOW_TAU, MedEIRConfig

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# ALiBi slopes
# ----------------------------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes (Press et al., 2022): a geometric sequence, interleaved when heads are not a power of 2."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two_slopes(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two_slopes(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def config_alibi_slopes(config: MedEIRConfig) -> list[float]:
    """The slopes a model of `config` attends with: `config.alibi_slopes`, or the standard sequence when it is None."""
    return list(config.alibi_slopes) if config.alibi_slopes is not None else alibi_slopes(config.num_attention_heads)


# ----------------------------------------------------------------------------------------------------------------
# Inputs: host-side checks, then every value the host needs reduced on the device and read in one transfer
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderInputs:
    """The tensors one forward is given: token ids or embeddings, their mask and token types, and how documents are
    packed in one row (`cu_seq_lens_q` / `max_length_q` from sentence-transformers or DataCollatorWithFlattening, or
    position_ids restarting at 0)."""

    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    cu_seq_lens_q: torch.Tensor | None = None
    cu_seq_lens_k: torch.Tensor | None = None
    max_length_q: int | None = None
    max_length_k: int | None = None


# The keyword arguments of `forward` that say how documents are packed (the last four fields of EncoderInputs).
PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass(frozen=True)
class InputStatistics:
    """What one forward needs to know about its input values, read from the device in one transfer
    (`read_input_statistics`). The defaults describe an input without that part: no attention_mask means every
    position is a real token; a range not read (under torch.compile) is None."""

    mask_any: bool = True  # some position is a real token
    mask_all: bool = True  # no position is padding
    mask_holes: bool = False  # a row whose real tokens are not one contiguous run
    real_tokens: int = 0  # real tokens in the batch (read only with an attention_mask)
    longest_row: int = 0  # real tokens of the longest row (read only with an attention_mask)
    token_ids: tuple[int, int] | None = None  # (min, max) of input_ids
    token_types: tuple[int, int] | None = None  # (min, max) of token_type_ids
    cu_valid: bool = True  # cu_seq_lens_q starts at 0 and strictly increases
    cu_last: int = 0  # cu_seq_lens_q[-1]: where the packed documents end
    longest_document: int = 0  # the longest packed document
    cu_k_matches: bool = False  # cu_seq_lens_k equals cu_seq_lens_q
    positions_restart: bool = False  # one row's position_ids restart at 0: documents packed without cu_seq_lens


def _check_integer(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {tensor.dtype}.")


def _check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(
            f"{name} is on {tensor.device} but the model is on {device}: move the inputs with .to(model.device)."
        )


def check_input_tensors(config: MedEIRConfig, weight: torch.Tensor, inputs: EncoderInputs) -> tuple[int, int]:
    """Raise on inputs of the wrong type, shape or device, saying what to do; return the (batch, sequence) shape.

    Host-side only: nothing here reads a value from the device (`weight`: the word embeddings, for device and dtype).
    """
    input_ids, inputs_embeds, attention_mask = inputs.input_ids, inputs.inputs_embeds, inputs.attention_mask
    token_type_ids, cu_seq_lens_q = inputs.token_type_ids, inputs.cu_seq_lens_q
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    for name, value in (
        ("input_ids", input_ids),
        ("inputs_embeds", inputs_embeds),
        ("attention_mask", attention_mask),
        ("token_type_ids", token_type_ids),
        ("cu_seq_lens_q", cu_seq_lens_q),
    ):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(value).__name__}: tokenize with return_tensors='pt' "
                "or wrap it with torch.tensor(...)."
            )
    if input_ids is not None:
        _check_integer("input_ids", input_ids)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}.")
        _check_device("input_ids", input_ids, weight.device)
        shape = input_ids.shape
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be (batch, sequence, {config.hidden_size}), "
                f"got shape {tuple(inputs_embeds.shape)}."
            )
        _check_device("inputs_embeds", inputs_embeds, weight.device)
        if inputs_embeds.dtype != weight.dtype:
            raise TypeError(
                f"inputs_embeds is {inputs_embeds.dtype} but the model runs in {weight.dtype}: cast it with "
                f".to({weight.dtype})."
            )
        shape = inputs_embeds.shape[:2]
    for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if tensor is not None:
            _check_device(name, tensor, weight.device)
            if tensor.shape != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)} but the input is {tuple(shape)}.")
    if token_type_ids is not None:
        _check_integer("token_type_ids", token_type_ids)
    if cu_seq_lens_q is not None:
        _check_integer("cu_seq_lens_q", cu_seq_lens_q)
        _check_device("cu_seq_lens_q", cu_seq_lens_q, weight.device)
        if cu_seq_lens_q.dim() != 1 or cu_seq_lens_q.numel() < 2:
            raise ValueError(
                f"cu_seq_lens_q must be 1-D [0, end_1, ..., total], got shape {tuple(cu_seq_lens_q.shape)}."
            )
    return tuple(shape)


def read_input_statistics(
    inputs: EncoderInputs, shape: tuple[int, int], device: torch.device, check_values: bool = True
) -> InputStatistics:
    """Every reduction of the inputs the host needs, computed on the device and read in one transfer: one host sync
    per forward, not one per check. `check_values=False` (under torch.compile) leaves out the value ranges."""
    attention_mask, cu_seq_lens_q, cu_seq_lens_k = inputs.attention_mask, inputs.cu_seq_lens_q, inputs.cu_seq_lens_k
    input_ids, token_type_ids, position_ids = inputs.input_ids, inputs.token_type_ids, inputs.position_ids
    reductions: dict[str, torch.Tensor] = {}
    if attention_mask is not None and attention_mask.numel():
        key_mask = attention_mask.bool()
        lengths = key_mask.sum(-1)
        runs = key_mask[:, 0].int() + (key_mask[:, 1:] & ~key_mask[:, :-1]).sum(-1)  # runs of real tokens per row
        reductions.update(
            mask_any=key_mask.any(),
            mask_all=key_mask.all(),
            mask_holes=(runs > 1).any(),
            real_tokens=lengths.sum(),
            longest_row=lengths.max(),
        )
    if cu_seq_lens_q is not None:
        reductions.update(cu_last=cu_seq_lens_q[-1], longest_document=cu_seq_lens_q.diff().max())
        if cu_seq_lens_k is not None and cu_seq_lens_k.shape == cu_seq_lens_q.shape:
            reductions["cu_k_matches"] = (cu_seq_lens_q == cu_seq_lens_k).all()
        if check_values:
            reductions["cu_valid"] = (cu_seq_lens_q[0] == 0) & (cu_seq_lens_q.diff() > 0).all()
    elif position_ids is not None and shape[0] == 1 and shape[1] > 1:
        reductions["positions_restart"] = (position_ids[0, 1:] == 0).any()
    if check_values and input_ids is not None and input_ids.numel():
        reductions.update(ids_min=input_ids.min(), ids_max=input_ids.max())
    if check_values and token_type_ids is not None and token_type_ids.numel():
        reductions.update(types_min=token_type_ids.min(), types_max=token_type_ids.max())
    if not reductions:
        return InputStatistics()
    read = torch.stack([value.to(device, torch.int64) for value in reductions.values()]).tolist()  # the one sync
    values = dict(zip(reductions, read, strict=True))
    return InputStatistics(
        mask_any=bool(values.get("mask_any", True)),
        mask_all=bool(values.get("mask_all", True)),
        mask_holes=bool(values.get("mask_holes", False)),
        real_tokens=values.get("real_tokens", 0),
        longest_row=values.get("longest_row", 0),
        token_ids=(values["ids_min"], values["ids_max"]) if "ids_min" in values else None,
        token_types=(values["types_min"], values["types_max"]) if "types_min" in values else None,
        cu_valid=bool(values.get("cu_valid", True)),
        cu_last=values.get("cu_last", 0),
        longest_document=values.get("longest_document", 0),
        cu_k_matches=bool(values.get("cu_k_matches", False)),
        positions_restart=bool(values.get("positions_restart", False)),
    )


def check_input_values(
    config: MedEIRConfig, stats: InputStatistics, shape: tuple[int, int], cu_seq_lens_q: torch.Tensor | None
) -> None:
    """Raise on input values the model cannot read (token ids and types out of range, bad cu_seq_lens_q), from
    statistics already read; warn once about inputs longer than the model was trained for."""
    if stats.token_ids is not None:
        low, high = stats.token_ids
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"input_ids contains token id {low if low < 0 else high}, outside the vocabulary "
                f"[0, {config.vocab_size}): was the text tokenized with this model's tokenizer?"
            )
    if stats.token_types is not None:
        types = config.type_vocab_size
        low, high = stats.token_types
        if low < 0 or high >= max(types, 1):  # without token-type embeddings only 0 (ignored) is allowed
            raise ValueError(
                f"token_type_ids contains {low if low < 0 else high}, outside [0, {max(types, 1)}) "
                f"(type_vocab_size is {types})."
            )
    if not stats.cu_valid:
        raise ValueError(
            "cu_seq_lens_q must start at 0 and strictly increase (one boundary per packed document), "
            f"got {cu_seq_lens_q.tolist()[:16]}."
        )
    if shape[1] > config.max_position_embeddings:
        logger.warning_once(
            f"Input of {shape[1]} tokens is longer than the {config.max_position_embeddings} tokens MedEIR "
            "was trained for; ALiBi extrapolates, but quality beyond that length was not measured."
        )


def _document_bounds(position_ids: torch.Tensor, seq_len: int) -> list[int]:
    """[0, ..., seq_len]: where the documents of a packed row start, from its position_ids restarting at 0."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    return ([] if starts and starts[0] == 0 else [0]) + starts + [seq_len]


def _document_ids(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(S,) the document of every token of a packed row with boundaries `cu_seqlens` (no host sync)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    documents = torch.arange(len(lengths), device=cu_seqlens.device)
    return torch.repeat_interleave(documents, lengths, output_size=seq_len)


# ----------------------------------------------------------------------------------------------------------------
# Attention layout: how the tokens of one forward attend, built once and shared by every layer
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unpadding:
    """The real tokens of a forward back to back, (T, ...), as every layer sees them when a backend drops the
    padding once per forward. `indices`: their positions in the flattened (B * S) batch (None: nothing to drop);
    `cu_seqlens`: int32 [0, ..., T], where each sequence (a row, or a packed document) starts."""

    shape: tuple[int, int]
    indices: torch.Tensor | None
    cu_seqlens: torch.Tensor

    @classmethod
    def of(cls, layout: "AttentionLayout") -> "Unpadding":
        """A packed row is unpadded already (its documents' boundaries are `cu_seqlens`); a padded batch is not."""
        if layout.cu_seqlens is not None:
            return cls(layout.shape, None, layout.cu_seqlens)
        batch, seq_len = layout.shape
        if layout.key_mask is None:
            lengths = torch.full((batch,), seq_len, dtype=torch.int32, device=layout.slopes.device)
            indices = None
        else:
            lengths = layout.key_mask.sum(-1, dtype=torch.int32)
            indices = layout.key_mask.flatten().nonzero().flatten()
        return cls(layout.shape, indices, F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)))

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (T, ...) real tokens."""
        tokens = padded.flatten(0, 1)
        return tokens if self.indices is None else tokens.index_select(0, self.indices)

    def pad(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, ...) real tokens -> (B, S, ...), zeros at padding."""
        batch, seq_len = self.shape
        if self.indices is None:
            return tokens.view(batch, seq_len, *tokens.shape[1:])
        padded = tokens.new_zeros(batch * seq_len, *tokens.shape[1:])
        return padded.index_copy(0, self.indices, tokens).view(batch, seq_len, *tokens.shape[1:])


@dataclass(frozen=True, kw_only=True)
class BackendState:
    """What a backend's `prepare` hands to its `attend` for one forward (each backend has its own kind).
    `unpadding` is set when every layer runs on the real tokens only."""

    unpadding: Unpadding | None = None


@dataclass(frozen=True, kw_only=True)
class FullBias(BackendState):
    """eager, and sdpa on inputs whose bias fits SDPA_BIAS_ELEMENTS: the whole additive bias (B or 1, H, S, S)."""

    bias: torch.Tensor


@dataclass(frozen=True)
class AttentionLayout:
    """How the tokens of one forward attend: the backend (by transformers' name), the ALiBi slopes, where the
    tokens are, and the backend's own `state`, made by its `prepare` (`prepared`).

    Where the tokens are is all that every backend shares: a padded batch (B, S) whose `key_mask` marks the real
    tokens (None: no padding), or documents packed back to back in one row (`cu_seqlens`, `doc_ids`) that never
    attend to one another. `bias` builds an eager layout around a ready bias (a graph export).
    """

    implementation: str
    slopes: torch.Tensor  # (H,) fp32, on the compute device
    shape: tuple[int, int] = (0, 0)  # (B, S) of the input
    key_mask: torch.Tensor | None = None  # (B, S) bool: the real tokens of a padded batch
    cu_seqlens: torch.Tensor | None = None  # int32 [0, ..., S]: the documents of a packed row
    doc_ids: torch.Tensor | None = None  # (S,): the document of every token of a packed row
    max_seqlen: int = 0  # the longest row or packed document
    real_tokens: int = 0  # tokens that are not padding
    state: BackendState | None = None
    bias: InitVar[torch.Tensor | None] = None  # a ready eager bias (a static export graph): state=FullBias(bias)

    def __post_init__(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            object.__setattr__(self, "state", FullBias(bias=bias))

    @classmethod
    def for_padded_batch(
        cls,
        implementation: str,
        slopes: torch.Tensor,
        shape: tuple[int, int],
        attention_mask: torch.Tensor | None,
        stats: InputStatistics | None = None,
    ) -> "AttentionLayout":
        """A padded batch, left or right padding (or none: `attention_mask` None or all ones). `stats`: the inputs'
        statistics (`read_input_statistics`), read here when not given."""
        if stats is None:
            stats = read_input_statistics(EncoderInputs(attention_mask=attention_mask), shape, slopes.device)
        batch, seq_len = shape
        if attention_mask is None or stats.mask_all:
            return cls(implementation, slopes, shape, max_seqlen=seq_len, real_tokens=batch * seq_len)
        # One contiguous run per row (left or right padding): then ALiBi distances are the same whether a backend
        # keeps the padded positions (sdpa, eager, flex) or drops them (flash-attn).
        if stats.mask_holes:
            raise ValueError(
                "attention_mask must mark one contiguous run of tokens per row (left or right padding); "
                "a row with holes would get different ALiBi distances on different attention backends."
            )
        return cls(
            implementation,
            slopes,
            shape,
            key_mask=attention_mask.bool(),
            max_seqlen=stats.longest_row,
            real_tokens=stats.real_tokens,
        )

    @classmethod
    def for_packed_row(
        cls, implementation: str, slopes: torch.Tensor, seq_len: int, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> "AttentionLayout":
        """Documents packed back to back in one row of `seq_len` tokens, boundaries `cu_seqlens` (int32, [0, ...,
        seq_len]), the longest `max_seqlen` tokens."""
        return cls(
            implementation,
            slopes,
            (1, seq_len),
            cu_seqlens=cu_seqlens,
            doc_ids=_document_ids(cu_seqlens, seq_len),
            max_seqlen=max_seqlen,
            real_tokens=seq_len,
        )

    def prepared(self, dtype: torch.dtype, tau: float | None) -> "AttentionLayout":
        """This layout with its backend's state for one forward; `tau`: exact windowed ALiBi (None: off)."""
        return replace(self, state=ATTENTION_BACKENDS[self.implementation].prepare(self, dtype, tau))

    @property
    def unpadding(self) -> Unpadding | None:
        """Set when every layer runs on the real tokens only, (T, ...); None: on (B, S, ...)."""
        return None if self.state is None else self.state.unpadding

    def output_states(self, states: torch.Tensor) -> torch.Tensor:
        """A layer's output in the model's output form: (B, S, hidden), zeros at padding."""
        if self.unpadding is not None:
            return self.unpadding.pad(states)
        if self.key_mask is not None:
            return states * self.key_mask[..., None].to(states.dtype)
        return states

    def alibi_bias(self, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive (B or 1, H, S, S) bias: ALiBi where a query may attend, dtype-min elsewhere.

        `masked_fill` (not addition) keeps fully masked rows finite: softmax over equal minima is uniform, not NaN.
        """
        pos = torch.arange(seq_len, device=self.slopes.device)
        bias = (-self.slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs()).to(dtype)[None]
        if self.key_mask is not None:
            allowed = self.key_mask[:, None, None, :]
        elif self.doc_ids is not None:
            allowed = (self.doc_ids[:, None] == self.doc_ids[None, :])[None, None]
        else:
            return bias
        return bias.masked_fill(~allowed, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------------------------
# Exact windowed ALiBi: the keys a head can skip on long sequences, and the head-group kernels that skip them
# ----------------------------------------------------------------------------------------------------------------
# On sequences of at least ALIBI_WINDOW_MIN_LENGTH tokens (sdpa per sequence, flex_attention, flash_attention_2), a
# head skips the keys that `alibi_windows` proves carry less than exp(-tau) of any query's attention mass in this
# forward (`config.alibi_window_tau`, default ALIBI_WINDOW_TAU; None turns it off). The output then differs from
# full attention by at most 2 exp(-tau) max|v|: at tau = 20 that is 4e-9 of |v|, below fp32 rounding.
ALIBI_WINDOW_MIN_LENGTH = 1024
# sdpa attends a head group in query chunks of about its window, each chunk's score blocks at most this many elements
# where its bias is materialised (off CPU); a group whose chunk + 2 windows reach SDPA_WINDOW_MAX_SPAN of the sequence
# attends to every key instead: chunking it would save less than the extra kernel calls cost.
SDPA_CHUNK_ELEMENTS = 1 << 24
SDPA_WINDOW_MAX_SPAN = 0.5


def alibi_windows(
    q: torch.Tensor, k: torch.Tensor, slopes: torch.Tensor, scaling: float, tau: float, keys: int
) -> list[int]:
    """Per head, the distance beyond which keys together carry less than exp(-tau) of any query's attention mass.

    q, k: (H, N, d), every query and key of this forward; `keys`: the most keys one query sees. Relative to its own
    (diagonal) key, key j has weight exp(scaling * q_i.(k_j - k_i) - s_h |i - j|) <= exp(B_h - s_h |i - j|) with
    B_h = scaling * max_i |q_i| (|k_i - c| + max_j |k_j - c|) for any c (Cauchy-Schwarz; c = the mean key, which
    tightens it), and the diagonal's weight is at most the row's total. The keys beyond w_h, at most two per
    distance and fewer than `keys` in all, carry at most exp(B_h - s_h w_h) * min(keys, 2 / (1 - exp(-s_h))), which
    is below exp(-tau) at w_h = (B_h + tau + ln min(keys, 2 / (1 - exp(-s_h)))) / s_h. The bound comes from this
    forward's q and k, never assumed; a window is at most `keys` (full attention), which is every window of a head
    whose slope is 0.
    """
    with torch.no_grad():
        q, k = q.detach().float(), k.detach().float()
        q_norm, k_norm = q.norm(dim=-1), (k - k.mean(dim=1, keepdim=True)).norm(dim=-1)  # (H, N)
        bound = scaling * (q_norm * (k_norm + k_norm.amax(-1, keepdim=True))).amax(-1)
        tail = torch.log(torch.clamp(2 / -torch.expm1(-slopes), max=max(keys, 1)))
        width = ((bound + tau + tail) / slopes).clamp(max=keys)
    return [math.ceil(w) if math.isfinite(w) else keys for w in width.tolist()]  # NaN or inf: attend in full


HeadGroups = list[tuple[list[int], int]]  # (heads, window): heads attending to the keys within `window` of a query


def group_heads_by_window(windows: list[int], length: int) -> HeadGroups | None:
    """Heads grouped by window (within a factor 2 of the group's narrowest), as (heads, window) with window <= L - 1;
    None when every head's window covers the sequence (full attention, unchanged)."""
    full = length - 1
    if min(windows) >= full:
        return None
    groups: list[tuple[list[int], int, int]] = []  # heads, narrowest, widest
    for head in sorted(range(len(windows)), key=windows.__getitem__):
        window = min(windows[head], full)
        if groups and window <= 2 * groups[-1][1]:
            groups[-1][0].append(head)
            groups[-1] = (groups[-1][0], groups[-1][1], window)
        else:
            groups.append(([head], window, window))
    return [(heads, widest) for heads, _, widest in groups]


def attend_by_head_group(groups: HeadGroups, attend_group: Callable, device: torch.device) -> torch.Tensor:
    """`attend_group(heads, window)` for each group (`heads` a tensor of head indices), the heads of the outputs
    (dimension 1) put back in order."""
    outs, order = [], []
    for heads, window in groups:
        outs.append(attend_group(torch.tensor(heads, device=device), window))
        order += heads
    return torch.cat(outs, dim=1).index_select(1, torch.tensor(order, device=device).argsort())


def sdpa_query_chunk(heads: int, window: int, length: int) -> int:
    """Query chunk of a windowed head group: about the window (64 at least), its scores at most SDPA_CHUNK_ELEMENTS."""
    chunk = max(64, -(-window // 64) * 64)
    cap = SDPA_CHUNK_ELEMENTS // (heads * (chunk + 2 * window)) // 64 * 64
    return min(length, max(64, min(chunk, cap)))


def sdpa_window_groups(q: torch.Tensor, k: torch.Tensor, slopes: torch.Tensor, scaling: float, tau: float):
    """sdpa's head groups for one sequence, q and k (H, L, d): `alibi_windows`, except that a head whose query chunk
    and two windows would reach SDPA_WINDOW_MAX_SPAN of the sequence attends to every key. None: none windows."""
    length = q.shape[1]
    windows = alibi_windows(q, k, slopes, scaling, tau, length)
    span_limit = SDPA_WINDOW_MAX_SPAN * length
    windows = [w if sdpa_query_chunk(1, w, length) + 2 * w < span_limit else length for w in windows]
    return group_heads_by_window(windows, length)


def sdpa_reads_strided_bias(device: torch.device) -> bool:
    """Whether sdpa on `device` reads the ALiBi bias as a strided view of one vector (`sdpa_by_head_group`).

    Checked on CPU (torch's flash kernel reads any strides, as fast as a contiguous bias or faster). Elsewhere each
    chunk's bias is materialised, as the fused CUDA kernels expect aligned strides.
    """
    return device.type == "cpu"


def sdpa_by_head_group(q, k, v, slopes: torch.Tensor, groups: HeadGroups, dropout: float, scaling: float):
    """(1, H, L, d) one sequence: each head group attends to the keys within its window only (all keys when its
    window is L - 1), in query chunks of about the window.

    ALiBi depends on i - j only, so with the queries in reverse order, r = L - 1 - i, the bias is a Hankel matrix:
    bias[r, j] = -slope * |L - 1 - r - j| = u[r + j] for the (h, 2L - 1) vector u, and the block of queries
    [r0, r1) against keys [k0, k1) is the strided view of u at offset r0 + k0, rows one element apart. No bias is
    built: memory stays linear in L however long the sequence, and a group that attends in full is one call.
    """
    length = q.shape[2]
    strided = sdpa_reads_strided_bias(q.device)
    distance = (length - 1 - torch.arange(2 * length - 1, device=q.device)).abs()

    def attend_group(index: torch.Tensor, window: int) -> torch.Tensor:
        heads = len(index)
        qg = q.index_select(1, index).flip(2)  # reversed queries
        kg, vg = (x.index_select(1, index) for x in (k, v))
        u = (-slopes[index, None] * distance).to(q.dtype)  # (h, 2L - 1)
        full = window >= length - 1
        chunk = length if full and strided else sdpa_query_chunk(heads, window, length)
        pieces = []
        for r0 in range(0, length, chunk):
            r1 = min(r0 + chunk, length)
            k0, k1 = (0, length) if full else (max(0, length - r1 - window), min(length, length - r0 + window))
            bias = u.as_strided(
                (1, heads, r1 - r0, k1 - k0), (u.numel(), u.stride(0), 1, 1), u.storage_offset() + r0 + k0
            )
            pieces.append(
                F.scaled_dot_product_attention(
                    qg[:, :, r0:r1],
                    kg[:, :, k0:k1],
                    vg[:, :, k0:k1],
                    attn_mask=bias if strided else bias.contiguous(),
                    dropout_p=dropout,
                    scale=scaling,
                )
            )
        return torch.cat(pieces, dim=2).flip(2)

    return attend_by_head_group(groups, attend_group, q.device)


FLEX_BLOCK_SIZE = 128  # create_block_mask's default block size


def flex_windowed_block_mask(q: torch.Tensor, k: torch.Tensor, layout: AttentionLayout, scaling: float):
    """The block mask of exact windowed ALiBi for this layer's q, k (B, H, S, d): per head, keys within its window.

    Windows are rounded up to a power of two times the block size (a superset of each, so still exact), which
    keeps the distinct masks of a forward few: they are built once and cached in the layout's state. None of the heads
    windowed (every window covers the sequence): the layout's own mask.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    state, block = layout.state, FLEX_BLOCK_SIZE
    batch, heads, seq_len, _ = q.shape
    windows = alibi_windows(
        q.transpose(0, 1).flatten(1, 2), k.transpose(0, 1).flatten(1, 2), layout.slopes, scaling, state.tau, seq_len
    )
    reach = tuple(min(seq_len, block << max(0, math.ceil(math.log2(max(w, 1) / block)))) for w in windows)
    if min(reach) + block >= seq_len:  # no head can skip a whole block of keys
        return state.block_mask
    if reach not in state.windowed_masks:
        limit, base = torch.tensor(reach, device=q.device), state.mask_mod

        def mask_mod(b, h, q_idx, kv_idx):
            near = (q_idx - kv_idx).abs() <= limit[h]
            return near if base is None else near & base(b, h, q_idx, kv_idx)

        rows = batch if layout.key_mask is not None else None
        state.windowed_masks[reach] = create_block_mask(mask_mod, rows, heads, seq_len, seq_len, device=q.device)
    return state.windowed_masks[reach]


def flash_by_head_group(kernel: Callable, q, k, v, slopes: torch.Tensor, groups: HeadGroups, **options):
    """flash-attn's varlen kernel on (T, H, d) per head group, with its `window_size` as the group's window."""

    def attend_group(index: torch.Tensor, window: int) -> torch.Tensor:
        size = -1 if window >= options["max_seqlen_q"] - 1 else window  # -1: no window
        qg, kg, vg = (x.index_select(1, index) for x in (q, k, v))
        return kernel(qg, kg, vg, **options, alibi_slopes=slopes.index_select(0, index), window_size=(size, size))

    return attend_by_head_group(groups, attend_group, q.device)


# ----------------------------------------------------------------------------------------------------------------
# Attention backends: one unit each, `prepare(layout, dtype, tau) -> its state` once per forward, and
# `attend(q, k, v, layout, dropout, scaling)` in every layer; q, k, v are (B, S, H, d) padded, or (T, H, d) when
# the layout's state has an `unpadding`, and so is the output.
# ----------------------------------------------------------------------------------------------------------------

# -- eager: the reference ----------------------------------------------------------------------------------------


def prepare_eager(layout: AttentionLayout, dtype: torch.dtype, tau: float | None) -> FullBias:
    return FullBias(bias=layout.alibi_bias(layout.shape[1], torch.float32))


def eager_attention(q, k, v, layout: AttentionLayout, dropout: float, scaling: float) -> torch.Tensor:
    """Padded tokens, the full fp32 bias (B or 1, H, S, S), fp32 scores and softmax."""
    dtype = q.dtype
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling + layout.state.bias
    probs = F.dropout(scores.softmax(dim=-1), p=dropout, training=dropout > 0)
    return torch.matmul(probs, v).transpose(1, 2).to(dtype)


# -- sdpa --------------------------------------------------------------------------------------------------------
# sdpa builds the whole (batch, heads, S, S) bias once per forward when it has at most SDPA_BIAS_ELEMENTS (256 MB in
# fp32); longer inputs attend per sequence on a strided view of the bias (`sdpa_by_head_group`). A batch whose real
# tokens are fewer than SDPA_MIN_REAL_TOKENS of its positions is unpadded: the linear layers (most of the compute at
# short lengths) then skip the padding, and q, k, v are padded back only around the attention kernel.
SDPA_BIAS_ELEMENTS = 1 << 26
SDPA_MIN_REAL_TOKENS = 0.75


@dataclass(frozen=True, kw_only=True)
class SdpaSequences(BackendState):
    """sdpa on long inputs: each sequence [start, end) of the unpadded tokens attends alone; those of
    ALIBI_WINDOW_MIN_LENGTH tokens or more with exact windowed ALiBi at `tau` (None: full attention)."""

    segments: tuple[tuple[int, int], ...]
    tau: float | None


def prepare_sdpa(layout: AttentionLayout, dtype: torch.dtype, tau: float | None) -> FullBias | SdpaSequences:
    """Per sequence when windowing applies or the full bias would exceed SDPA_BIAS_ELEMENTS; otherwise one call on
    the full bias, around which a batch of few real tokens is padded back."""
    (batch, seq_len), heads = layout.shape, len(layout.slopes)
    windowed = tau is not None and layout.max_seqlen >= ALIBI_WINDOW_MIN_LENGTH
    if windowed or (batch if layout.key_mask is not None else 1) * heads * seq_len * seq_len > SDPA_BIAS_ELEMENTS:
        unpadding = Unpadding.of(layout)
        segments = tuple((a, b) for a, b in pairwise(unpadding.cu_seqlens.tolist()) if b > a)
        return SdpaSequences(unpadding=unpadding, segments=segments, tau=tau)
    bias = layout.alibi_bias(seq_len, dtype)
    few_real = layout.key_mask is not None and layout.real_tokens < SDPA_MIN_REAL_TOKENS * batch * seq_len
    return FullBias(bias=bias, unpadding=Unpadding.of(layout) if few_real else None)


def sdpa_attention(q, k, v, layout: AttentionLayout, dropout: float, scaling: float) -> torch.Tensor:
    state = layout.state
    if isinstance(state, SdpaSequences):
        return sdpa_per_sequence(q, k, v, layout, dropout, scaling)
    unpadding = state.unpadding
    if unpadding is not None:  # the kernel reads the bias padded: pad q, k, v around it
        q, k, v = unpadding.pad(q), unpadding.pad(k), unpadding.pad(v)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    bias = state.bias if state.bias.dtype == q.dtype else state.bias.to(q.dtype)  # autocast: bf16 q, fp32 bias
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scaling).transpose(1, 2)
    return out if unpadding is None else unpadding.unpad(out)


def sdpa_per_sequence(q, k, v, layout: AttentionLayout, dropout: float, scaling: float) -> torch.Tensor:
    """(T, H, d): each sequence alone, its heads in groups by window (one group when all attend in full)."""
    state, heads = layout.state, len(layout.slopes)
    pieces = []
    for start, end in state.segments:
        length = end - start
        qs, ks, vs = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))  # (1, H, L, d)
        groups = None
        if state.tau is not None and length >= ALIBI_WINDOW_MIN_LENGTH:
            groups = sdpa_window_groups(qs[0], ks[0], layout.slopes, scaling, state.tau)
        groups = groups or [(list(range(heads)), max(length - 1, 0))]
        out = sdpa_by_head_group(qs, ks, vs, layout.slopes, groups, dropout, scaling)
        pieces.append(out[0].transpose(0, 1))
    return torch.cat(pieces)


# -- flex_attention ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FlexMasks(BackendState):
    """flex_attention: the block mask of the padding or document boundaries (None: every key), the `mask_mod`
    behind it, and exact windowed ALiBi at `tau` from ALIBI_WINDOW_MIN_LENGTH tokens on (`flex_windowed_block_mask`,
    whose masks `windowed_masks` caches for the forward)."""

    block_mask: object = None
    mask_mod: Callable | None = None
    tau: float | None = None
    windowed_masks: dict = field(default_factory=dict)


@cache
def _compiled_flex_attention(device_type: str) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled flex_attention materialises the full score matrix; compiled it is a fused kernel. Inductor's CPU
    # template miscompiles dynamic shapes (torch 2.13: undeclared `cur_kvSplitSize` symbols), so on CPU every new
    # input shape compiles anew (~15 s); CUDA (Triton) keeps automatic dynamic shapes.
    return torch.compile(flex_attention, dynamic=None if device_type == "cuda" else False)


def prepare_flex(layout: AttentionLayout, dtype: torch.dtype, tau: float | None) -> FlexMasks:
    from torch.nn.attention.flex_attention import create_block_mask

    batch, seq_len = layout.shape
    tau = tau if seq_len >= ALIBI_WINDOW_MIN_LENGTH else None
    if layout.key_mask is not None:
        key_mask = layout.key_mask

        def mask_mod(b, h, q_idx, kv_idx):
            return key_mask[b, kv_idx]

    elif layout.doc_ids is not None:
        doc_ids = layout.doc_ids

        def mask_mod(b, h, q_idx, kv_idx):
            return doc_ids[q_idx] == doc_ids[kv_idx]

    else:
        return FlexMasks(tau=tau)
    rows = batch if layout.key_mask is not None else None
    block_mask = create_block_mask(mask_mod, rows, None, seq_len, seq_len, device=layout.slopes.device)
    return FlexMasks(block_mask=block_mask, mask_mod=mask_mod, tau=tau)


def flex_attention_alibi(q, k, v, layout: AttentionLayout, dropout: float, scaling: float) -> torch.Tensor:
    """Padded tokens: ALiBi as a score_mod, padding / document boundaries (and windows) as the block mask."""
    if dropout > 0:
        raise ValueError("flex_attention has no attention dropout: set attention_probs_dropout_prob=0.0")
    slopes, state = layout.slopes, layout.state

    def alibi(score, batch, head, q_idx, kv_idx):
        return score - slopes[head] * (q_idx - kv_idx).abs()

    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    block_mask = state.block_mask if state.tau is None else flex_windowed_block_mask(q, k, layout, scaling)
    kernel = _compiled_flex_attention(q.device.type)
    return kernel(q, k, v, score_mod=alibi, block_mask=block_mask, scale=scaling).transpose(1, 2)


# -- flash_attention_2 -------------------------------------------------------------------------------------------

FLASH_ATTN_HELP = (
    "attn_implementation='flash_attention_2' needs the flash-attn package (FlashAttention-2, which has ALiBi; "
    "FlashAttention-3 and the `kernels` Hub kernels do not). Install it on a CUDA machine with "
    "`pip install flash-attn --no-build-isolation` (or `pip install 'medeir[flash]'`), or use "
    "attn_implementation='sdpa' (the default) or 'flex_attention'."
)


@dataclass(frozen=True, kw_only=True)
class FlashVarlen(BackendState):
    """flash_attention_2: always unpadded; exact windowed ALiBi at `tau` from ALIBI_WINDOW_MIN_LENGTH tokens on."""

    tau: float | None


def flash_attn_varlen_kernel() -> Callable:
    """flash-attn 2's `flash_attn_varlen_func`, or ImportError saying how to install it."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception as error:  # a broken build (ABI mismatch) raises more than ModuleNotFoundError
        raise ImportError(FLASH_ATTN_HELP) from error
    return flash_attn_varlen_func


def prepare_flash(layout: AttentionLayout, dtype: torch.dtype, tau: float | None) -> FlashVarlen:
    windowed = tau is not None and layout.max_seqlen >= ALIBI_WINDOW_MIN_LENGTH
    return FlashVarlen(unpadding=Unpadding.of(layout), tau=tau if windowed else None)


def flash_attention_alibi(q, k, v, layout: AttentionLayout, dropout: float, scaling: float) -> torch.Tensor:
    """flash-attn's varlen kernel on (T, H, d): it adds -slope*|i-j| in fp32 with positions restarting at every
    sequence of `cu_seqlens`; windowed, through its `window_size`, per head group."""
    if q.dtype not in (torch.float16, torch.bfloat16) or q.device.type != "cuda":
        raise TypeError(
            f"flash_attention_2 runs in float16/bfloat16 on CUDA, got {q.dtype} on {q.device}: load the model "
            "with dtype=torch.bfloat16 and move it to a GPU, or use attn_implementation='sdpa'."
        )
    kernel, state, cu_seqlens = flash_attn_varlen_kernel(), layout.state, layout.unpadding.cu_seqlens
    options = dict(
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=layout.max_seqlen,
        max_seqlen_k=layout.max_seqlen,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=False,
    )
    groups = None
    if state.tau is not None:
        windows = alibi_windows(
            q.transpose(0, 1), k.transpose(0, 1), layout.slopes, scaling, state.tau, layout.max_seqlen
        )
        groups = group_heads_by_window(windows, layout.max_seqlen)
    if groups is None:
        return kernel(q, k, v, **options, alibi_slopes=layout.slopes)
    return flash_by_head_group(kernel, q, k, v, layout.slopes, groups, **options)


# -- the registry ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionBackend:
    """One attention implementation: `prepare(layout, dtype, tau)` once per forward returns its state;
    `attend(q, k, v, layout, dropout, scaling)` runs in every layer; `check_available()` raises, saying what to
    install, where it cannot run at all."""

    prepare: Callable[[AttentionLayout, torch.dtype, float | None], BackendState]
    attend: Callable[..., torch.Tensor]
    check_available: Callable[[], object] = lambda: None


# The only attention implementations MedEIR accepts: each one applies ALiBi. Names are transformers' own, so
# `attn_implementation=` and `set_attn_implementation()` select them.
ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "eager": AttentionBackend(prepare_eager, eager_attention),
    "sdpa": AttentionBackend(prepare_sdpa, sdpa_attention),
    "flex_attention": AttentionBackend(prepare_flex, flex_attention_alibi),
    "flash_attention_2": AttentionBackend(prepare_flash, flash_attention_alibi, flash_attn_varlen_kernel),
}


def registered_backend(name: str | None) -> AttentionBackend:
    """The backend of an attn_implementation name; any other name raises, as it would run without ALiBi."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attn_implementation={name!r} cannot apply MedEIR's ALiBi position bias, and without it the model "
            f"gives wrong embeddings. Choose one of {sorted(ATTENTION_BACKENDS)}."
        )
    return ATTENTION_BACKENDS[name]


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------


def _embedding_ids(ids: torch.Tensor) -> torch.Tensor:
    """`ids` as nn.Embedding takes them (int32 / int64): narrower integer ids (uint8, int16) widened, not refused."""
    return ids if ids.dtype in (torch.int32, torch.int64) else ids.long()


class MedEIREmbeddings(nn.Module):
    """Word + token-type embeddings, LayerNorm, dropout. No position embeddings: ALiBi is in attention."""

    def __init__(self, config: MedEIRConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size > 0 else None
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        hidden = self.word_embeddings(_embedding_ids(input_ids)) if inputs_embeds is None else inputs_embeds
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                hidden = hidden + self.token_type_embeddings.weight[0]
            else:
                hidden = hidden + self.token_type_embeddings(_embedding_ids(token_type_ids))
        return self.dropout(self.norm(hidden))


class MedEIRAttention(nn.Module):
    """Multi-head self-attention; the layout's backend (ATTENTION_BACKENDS) attends, whichever it is."""

    def __init__(self, config: MedEIRConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        tokens = hidden.shape[:-1]  # (B, S) padded, or (T,) unpadded
        q, k, v = self.qkv(hidden).view(*tokens, 3, self.num_heads, self.head_dim).unbind(dim=-3)
        attend = ATTENTION_BACKENDS[layout.implementation].attend
        out = attend(q, k, v, layout, self.dropout if self.training else 0.0, self.scaling)
        return self.out(out.reshape(*tokens, -1))


class MedEIRFeedForward(nn.Module):
    """BERT's Linear -> act -> Linear ("mlp"), or Jina v2's gated act(gate) * up -> Linear ("glu")."""

    def __init__(self, config: MedEIRConfig):
        super().__init__()
        self.gated = config.feed_forward_type == "glu"
        width = 2 * config.intermediate_size if self.gated else config.intermediate_size
        self.up = nn.Linear(config.hidden_size, width, bias=not self.gated)
        self.act = ACT2FN[config.hidden_act]
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.gated:
            up, gate = self.up(hidden).chunk(2, dim=-1)
            return self.down(self.act(gate) * up)
        return self.down(self.act(self.up(hidden)))


class MedEIRLayer(GradientCheckpointingLayer):
    """Post-LayerNorm encoder block, as in BERT: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, config: MedEIRConfig):
        super().__init__()
        self.attention = MedEIRAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = MedEIRFeedForward(config)
        self.feed_forward_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        hidden = self.attention_norm(hidden + self.dropout(self.attention(hidden, layout)))
        return self.feed_forward_norm(hidden + self.dropout(self.feed_forward(hidden)))


# ----------------------------------------------------------------------------------------------------------------
# Loading: the tokenizer next to the weights must be the model's own
# ----------------------------------------------------------------------------------------------------------------


def check_tokenizer_matches(
    config: MedEIRConfig,
    name_or_path: str | os.PathLike | None = None,
    tokenizer=None,
    *,
    where: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
) -> None:
    """Raise ValueError unless the tokenizer that goes with a MedEIR model is the one it was trained with.

    A missing tokenizer.json makes transformers build a 5-token tokenizer, and another model's tokenizer loads just
    as quietly: either way every embedding comes out wrong without an error. Checked: the tokenizer files of
    `name_or_path` (a folder, or a Hub id already in the local cache: never a download; no files at all, as in a
    training checkpoint, is fine), and a loaded `tokenizer` object when given (`where` names it). Size and [PAD] are
    what can be checked; the token ids themselves are checked at every forward (they must be < vocab_size).

    Every loader calls it: AutoModel and sentence-transformers through `MedEIRPreTrainedModel.from_pretrained`, the
    Endpoint handler and the demo through `MedEIRPreTrainedModel.check_tokenizer` on the tokenizer they loaded.
    """
    if name_or_path is not None:
        found = _tokenizer_vocabulary(Path(name_or_path), subfolder or "", cache_dir, revision)
        if found is not None:
            config.check_vocabulary(*found)
    if tokenizer is not None:
        config.check_tokenizer(tokenizer, where or "the tokenizer")


def _tokenizer_file(name_or_path: Path, filename: str, subfolder: str, cache_dir, revision) -> Path | None:
    """`filename` of a model folder, or of a Hub repository already in the local cache; None where it has none."""
    if name_or_path.is_file():  # a config.json given directly: no folder to look in
        return None
    if name_or_path.is_dir():
        path = name_or_path / subfolder / filename
        return path if path.is_file() else None
    try:
        from transformers.utils import cached_file

        found = cached_file(
            str(name_or_path),
            filename,
            cache_dir=cache_dir,
            revision=revision,
            subfolder=subfolder,
            local_files_only=True,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except Exception:
        return None
    return Path(found) if found else None


def _tokenizer_vocabulary(name_or_path: Path, subfolder: str, cache_dir, revision):
    """(size, pad_id, pad_token, file) of the tokenizer files of a model folder or cached Hub repository; None when
    it has none. Settings without a vocabulary raise: transformers would make every word [UNK]."""

    def find(filename: str) -> Path | None:
        return _tokenizer_file(name_or_path, filename, subfolder, cache_dir, revision)

    tokenizer_json, vocab_txt, tokenizer_config = (
        find("tokenizer.json"),
        find("vocab.txt"),
        find("tokenizer_config.json"),
    )
    where = str(name_or_path / subfolder)
    if tokenizer_json is None and vocab_txt is None:
        if tokenizer_config is not None or find("special_tokens_map.json") is not None:
            raise ValueError(
                f"{where} has tokenizer settings (tokenizer_config.json) but no vocabulary (tokenizer.json): "
                "transformers would build a tokenizer of special tokens only and every word would become [UNK]. "
                "Copy the tokenizer.json this model was trained with back into the folder."
            )
        return None  # no tokenizer here at all (a training checkpoint): the tokenizer comes from elsewhere
    if tokenizer_json is not None:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        vocab = spec.get("model", {}).get("vocab", {})
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
        ids = {**vocab, **{token["content"]: token["id"] for token in spec.get("added_tokens", [])}}
        source = f"{where}{os.sep}tokenizer.json"
    else:
        ids = {token: i for i, token in enumerate(vocab_txt.read_text(encoding="utf-8").splitlines())}
        source = f"{where}{os.sep}vocab.txt"
    pad_token = None
    if tokenizer_config is not None:
        pad_token = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("pad_token")
        pad_token = pad_token.get("content") if isinstance(pad_token, dict) else pad_token
    return len(set(ids.values())), ids.get(pad_token) if pad_token else None, pad_token, source


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class MedEIRPreTrainedModel(PreTrainedModel):
    config_class = MedEIRConfig
    config: MedEIRConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MedEIREmbeddings", "MedEIRLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True
    # Packed batches (cu_seq_lens_q / max_length_q, or position_ids restarting at 0) work on every backend.
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation: Linear and Embedding weights ~ N(0, initializer_range) (the padding token's embedding
        zero), biases zero, LayerNorm weight one and bias zero. No parameter is stored outside these modules: the
        ALiBi slopes are computed from the config, never a buffer."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            # A loaded weight is marked initialised and left alone; its row, a view, would lose that mark: ask first.
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' loading, then `check_tokenizer_matches` on the tokenizer files beside the weights: a folder
        whose tokenizer does not belong to its weights fails at load time, naming the file. AutoModel loads no
        tokenizer: these files are all it can check."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        check_tokenizer_matches(
            model.config,
            pretrained_model_name_or_path,
            subfolder=kwargs.get("subfolder"),
            cache_dir=kwargs.get("cache_dir"),
            revision=kwargs.get("revision"),
        )
        return loaded

    def check_tokenizer(self, tokenizer, where: str = "the tokenizer") -> None:
        """`check_tokenizer_matches` on a tokenizer object loaded beside this model (the handler's, the demo's)."""
        check_tokenizer_matches(self.config, tokenizer=tokenizer, where=where)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # The backend is looked up by name at every forward, so switching is always safe.
        return True

    def _check_and_adjust_attn_implementation(
        self, attn_implementation: str | None, is_init_check: bool = False, allow_all_kernels: bool = False
    ) -> str:
        # Checked before transformers can swap a missing flash-attn for a Hub kernel that knows nothing of ALiBi.
        if attn_implementation is not None:
            registered_backend(attn_implementation).check_available()
        chosen = super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, allow_all_kernels)
        if chosen != attn_implementation:  # transformers' default, or a fallback it picked: must apply ALiBi too
            registered_backend(chosen)
        return chosen


class MedEIRModel(MedEIRPreTrainedModel):
    """The encoder: returns `last_hidden_state` (zeros at padding positions) and, on request, every layer's output."""

    def __init__(self, config: MedEIRConfig):
        super().__init__(config)
        self.embeddings = MedEIREmbeddings(config)
        self.layers = nn.ModuleList([MedEIRLayer(config) for _ in range(config.num_hidden_layers)])
        self._slopes: dict[tuple, torch.Tensor] = {}  # (device, *slopes) -> slopes on that device
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def _alibi_slopes(self, device: torch.device) -> torch.Tensor:
        """(H,) fp32 slopes of the config, cached per device and value: a config edited on a live model takes effect
        (checked first) at its next forward. Computed from the config, never stored as a buffer that meta-device
        loading could leave uninitialised."""
        key = (device, *config_alibi_slopes(self.config))
        if key not in self._slopes:
            self.config.validate_alibi_slopes()
            self._slopes[key] = torch.tensor(key[1:], dtype=torch.float32, device=device)
        return self._slopes[key]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        r"""
        position_ids: only used to find packed documents (positions restarting at 0) when `cu_seq_lens_q` is
            absent; ALiBi itself needs no positions.
        cu_seq_lens_q / cu_seq_lens_k / max_length_q / max_length_k: a packed batch (batch size 1) from
            sentence-transformers or transformers' DataCollatorWithFlattening: documents never attend across.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        inputs = EncoderInputs(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            cu_seq_lens_q,
            cu_seq_lens_k,
            max_length_q,
            max_length_k,
        )
        out, _ = self._encode(inputs, output_hidden_states)
        return out if return_dict else out.to_tuple()

    def _encode(
        self, inputs: EncoderInputs, output_hidden_states: bool | None
    ) -> tuple[BaseModelOutput, torch.Tensor | None]:
        """`forward`'s output, and the boundaries of the documents of a packed row (None for a padded batch): the
        heads that pool per document read them here rather than find them again."""
        output_hidden_states = bool(output_hidden_states or self.config.output_hidden_states)
        inputs, shape, stats = self._read_inputs(inputs)
        # An empty batch, or one whose rows are all padding, has no token to attend from: zeros, as at any padding.
        if shape[0] == 0 or shape[1] == 0 or (inputs.attention_mask is not None and not stats.mask_any):
            device = self.embeddings.word_embeddings.weight.device
            empty = torch.zeros(*shape, self.config.hidden_size, device=device, dtype=self.dtype)
            hidden_states = (empty,) * (self.config.num_hidden_layers + 1) if output_hidden_states else None
            return BaseModelOutput(last_hidden_state=empty, hidden_states=hidden_states), inputs.cu_seq_lens_q

        hidden = self.embeddings(inputs.input_ids, inputs.token_type_ids, inputs.inputs_embeds)
        layout = self._attention_layout(inputs, shape, stats).prepared(hidden.dtype, self.config.alibi_window_tau)
        if layout.unpadding is not None:  # unpad once per forward: every layer runs on real tokens only
            hidden = layout.unpadding.unpad(hidden)
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, layout)
            if all_hidden is not None:
                all_hidden.append(hidden)
        out = BaseModelOutput(
            last_hidden_state=layout.output_states(hidden),
            hidden_states=tuple(map(layout.output_states, all_hidden)) if all_hidden is not None else None,
        )
        return out, layout.cu_seqlens

    def _read_inputs(self, inputs: EncoderInputs) -> tuple[EncoderInputs, tuple[int, int], InputStatistics]:
        """Check the inputs (host-side, then their values from one device read) and return them with their shape and
        statistics; documents packed by position_ids restarting at 0 get their `cu_seq_lens_q` here."""
        weight = self.embeddings.word_embeddings.weight
        shape = check_input_tensors(self.config, weight, inputs)
        stats = read_input_statistics(inputs, shape, weight.device, check_values=not torch.compiler.is_compiling())
        check_input_values(self.config, stats, shape, inputs.cu_seq_lens_q)
        if inputs.cu_seq_lens_q is None and stats.positions_restart:  # DataCollatorWithFlattening's position_ids
            bounds = _document_bounds(inputs.position_ids, shape[1])  # a second sync, for this kind of input only
            cu_seq_lens_q = torch.tensor(bounds, dtype=torch.int32, device=weight.device)
            cu_seq_lens_k = inputs.cu_seq_lens_k
            matches_k = cu_seq_lens_k is not None and torch.equal(cu_seq_lens_q, cu_seq_lens_k)
            longest = max(b - a for a, b in pairwise(bounds))
            stats = replace(stats, cu_last=shape[1], longest_document=longest, cu_k_matches=matches_k)
            inputs = replace(inputs, cu_seq_lens_q=cu_seq_lens_q)
        return inputs, shape, stats

    def _attention_layout(self, inputs: EncoderInputs, shape, stats: InputStatistics) -> AttentionLayout:
        """The layout of one forward, before its backend's state: packed documents (`cu_seq_lens_q`) or a padded
        batch. Refuses a backend without ALiBi, a bad window tolerance and inconsistent packing metadata."""
        slopes = self._alibi_slopes(self.embeddings.word_embeddings.weight.device)
        self.config.validate_alibi_window_tau()  # a run-time setting: may have been edited on the live model
        implementation = self.config._attn_implementation
        registered_backend(implementation)  # refuse a kernel without ALiBi before building anything for it
        if inputs.cu_seq_lens_q is None:
            return AttentionLayout.for_padded_batch(implementation, slopes, shape, inputs.attention_mask, stats)
        if inputs.cu_seq_lens_k is not None and not stats.cu_k_matches:
            raise ValueError("MedEIR is an encoder: cu_seq_lens_k must equal cu_seq_lens_q.")
        if shape[0] != 1:
            raise ValueError(f"A packed batch (cu_seq_lens_q) must have batch size 1, got {shape[0]}.")
        if stats.cu_last != shape[1]:
            raise ValueError(f"cu_seq_lens_q ends at {stats.cu_last} but the packed input has {shape[1]} tokens.")
        if inputs.attention_mask is not None and not stats.mask_all:
            raise ValueError("A packed batch has no padding: drop attention_mask or pass a padded batch instead.")
        max_seqlen = int(inputs.max_length_q or inputs.max_length_k or stats.longest_document)
        cu_seqlens = inputs.cu_seq_lens_q.to(torch.int32)
        return AttentionLayout.for_packed_row(implementation, slopes, shape[1], cu_seqlens, max_seqlen)


# ----------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------


class MedEIRPredictionHead(nn.Module):
    def __init__(self, config: MedEIRConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden)))


class MedEIRForMaskedLM(MedEIRPreTrainedModel):
    """Masked language modelling head; the decoder is tied to the word embeddings.

    With `labels`, the vocabulary projection runs only on labelled positions when `sparse_prediction=True`
    is passed (the 52,543-token projection of every position dominates MLM cost); `logits` are then (N, V)
    for the N labelled tokens in row-major order.
    """

    _tied_weights_keys = {"decoder.weight": "model.embeddings.word_embeddings.weight"}

    def __init__(self, config: MedEIRConfig):
        super().__init__(config)
        self.model = MedEIRModel(config)
        self.head = MedEIRPredictionHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.decoder = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sparse_prediction: bool = False,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        inputs = (input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states)
        outputs = self.model(*inputs, return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state
        if labels is not None and sparse_prediction:
            labels = labels.flatten()
            keep = labels != -100
            hidden, labels = hidden.flatten(0, 1)[keep], labels[keep]
        logits = self.decoder(self.head(hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return out if return_dict else out.to_tuple()


class MedEIRForSequenceClassification(MedEIRPreTrainedModel):
    """Mean pooling over real tokens, dropout, a linear head (e.g. medical abstract classification)."""

    def __init__(self, config: MedEIRConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MedEIRModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        """A packed batch (cu_seq_lens_q, or position_ids restarting at 0) gives one row of logits per document."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        packing = {name: kwargs[name] for name in PACKING_KWARGS if name in kwargs}
        inputs = EncoderInputs(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, **packing)
        outputs, documents = self.model._encode(inputs, output_hidden_states)
        logits = self.classifier(self.dropout(mean_pool(outputs.last_hidden_state, attention_mask, documents)))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        out = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return out if return_dict else out.to_tuple()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, documents: torch.Tensor | None):
    """Mean of each sequence's real tokens: (B, hidden), or (documents, hidden) for a packed row whose documents have
    the boundaries `documents` ([0, ..., S])."""
    if documents is not None:
        lengths = documents.diff()[:, None].clamp(min=1).to(hidden.dtype)
        ids = _document_ids(documents, hidden.shape[1])
        return hidden.new_zeros(len(lengths), hidden.shape[-1]).index_add_(0, ids, hidden[0]) / lengths
    # zeros at padding, so a sum over positions sums the real tokens
    if attention_mask is None:
        counts = torch.full((hidden.shape[0], 1), hidden.shape[1], device=hidden.device, dtype=hidden.dtype)
    else:
        counts = attention_mask.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)
    return hidden.sum(dim=1) / counts


MedEIRModel.register_for_auto_class("AutoModel")
MedEIRForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
MedEIRForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "ALIBI_WINDOW_TAU",
    "MedEIRForMaskedLM",
    "MedEIRForSequenceClassification",
    "MedEIRModel",
    "MedEIRPreTrainedModel",
    "alibi_slopes",
    "check_tokenizer_matches",
    "config_alibi_slopes",
]
