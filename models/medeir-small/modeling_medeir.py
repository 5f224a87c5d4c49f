"""MedEIR: a bidirectional BERT-style encoder with ALiBi position biases (no position embeddings).

Attention adds the symmetric ALiBi bias `-slope_h * |i - j|` to the scaled scores of head `h`, with the slopes of
the config (`config.alibi_slopes`; None: the standard geometric sequence, `alibi_slopes`). Every backend
applies it itself, because transformers' own sdpa / flash_attention_2 integrations drop it. A backend is one small
unit (an `AttentionBackend`): `prepare` says how it lays out the tokens of a forward, `attend` runs its kernel.

    eager              the reference: padded tokens, fp32 scores and softmax over a full bias
    sdpa (default)     torch SDPA with the bias as a float mask, built once per forward and shared by all
                       layers; long inputs attend in query chunks so memory grows about linearly
    flex_attention     ALiBi as a score_mod, padding or packed documents as a block mask
    flash_attention_2  flash_attn_varlen_func(alibi_slopes=...) on unpadded tokens (unpadded once per forward)

Any other implementation raises instead of running without the bias. Padded batches (any padding side) and
packed batches (sentence-transformers' `cu_seq_lens_q` / `max_length_q`) are both supported by every backend.
Padding positions of `last_hidden_state` are zero.

This file is Hub remote code: it imports only torch and transformers at top level and stays self-contained.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise

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
    from .configuration_medeir import MedEIRConfig
except ImportError:  # imported from a checkout of the repository
    from configuration_medeir import MedEIRConfig

logger = logging.get_logger(__name__)

# sdpa builds the whole (batch, heads, S, S) bias once per forward when it has at most this many elements
# (256 MB in fp32). Longer inputs attend per sequence on a strided view of the bias (`_windowed_sdpa`); where a chunk's
# bias is materialised (off CPU), its score blocks hold about SDPA_CHUNK_ELEMENTS.
SDPA_BIAS_ELEMENTS = 1 << 26
SDPA_CHUNK_ELEMENTS = 1 << 24
# sdpa unpads a batch whose real tokens are fewer than this share of its positions: the linear layers (most of the
# compute at short lengths) then skip the padding, and q, k, v are padded back only around the attention kernel.
SDPA_MIN_REAL_TOKENS = 0.75
# Exact windowed ALiBi on sequences of at least ALIBI_WINDOW_MIN_LENGTH tokens (sdpa's chunked path, flex_attention,
# flash_attention_2): a head skips the keys that `alibi_windows` proves carry less than exp(-tau) of any query's
# attention mass in this forward. The output then differs from full attention by at most 2 exp(-tau) max|v|: at
# tau = 20 that is 4e-9 of |v|, below fp32 rounding. `config.alibi_window_tau` overrides tau; None turns it off.
ALIBI_WINDOW_TAU = 20.0
ALIBI_WINDOW_MIN_LENGTH = 1024
# sdpa attends a head group in query chunks of about its window against 2 windows of keys around them; a group whose
# chunk + 2 windows reach this share of the sequence attends to every key instead: chunking it would save less than
# the extra kernel calls cost.
SDPA_WINDOW_MAX_SPAN = 0.5
FLEX_BLOCK_SIZE = 128  # create_block_mask's default block size

FLASH_ATTN_HELP = (
    "attn_implementation='flash_attention_2' needs the flash-attn package (FlashAttention-2, which has ALiBi; "
    "FlashAttention-3 and the `kernels` Hub kernels do not). Install it on a CUDA machine with "
    "`pip install flash-attn --no-build-isolation` (or `pip install 'medeir[flash]'`), or use "
    "attn_implementation='sdpa' (the default) or 'flex_attention'."
)


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


def _window_groups(windows: list[int], length: int) -> list[tuple[list[int], int]] | None:
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


def _read_scalars(scalars: dict[str, torch.Tensor], device: torch.device) -> dict[str, int]:
    """Every 0-d tensor of `scalars` read in one device-to-host transfer: one sync per forward, not one per check."""
    if not scalars:
        return {}
    values = torch.stack([value.to(device, torch.int64) for value in scalars.values()]).tolist()
    return dict(zip(scalars, values, strict=True))


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
# Attention layout: how the tokens of one forward pass attend, built once and shared by every layer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class AttentionLayout:
    """Everything the attention kernels need besides q, k, v, and where the tokens are.

    Tokens are either padded, (B, S, ...), or flat: the real tokens of every sequence back to back, (T, ...),
    unpadded once per forward (`indices` are their positions in the flattened (B * S) batch, None when there is
    no padding to drop). `cu_seqlens` / `segments` give the sequence boundaries in the flat stream. Padded
    batches carry `key_mask` (B, S); packed batches (B == 1, padded layout) carry `doc_ids` (S,).

    `from_mask` (a padded batch) and `from_packed` (documents back to back in one row) say where the tokens are,
    then let the backend's `prepare` add what its kernel reads; `from_inputs` picks between them for a forward.
    """

    implementation: str
    slopes: torch.Tensor  # (H,) fp32, on the compute device
    shape: tuple[int, int] = (0, 0)  # (B, S) of the input
    flat: bool = False
    repad: bool = False  # flat tokens, but the kernel needs (B, S, H, d): pad q, k, v around it
    key_mask: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0  # the longest row or packed document
    real_tokens: int = 0  # tokens that are not padding
    segments: list[tuple[int, int]] | None = None  # sdpa on long inputs: [start, end) of each sequence
    bias: torch.Tensor | None = None  # eager / sdpa: full additive bias (B or 1, H, S, S)
    block_mask: object = None  # flex_attention: torch BlockMask
    mask_mod: Callable | None = None  # flex_attention: the padding / document mask behind `block_mask`
    window_tau: float | None = None  # exact windowed ALiBi with this tolerance (see `alibi_windows`), or full attention
    window_masks: dict = field(default_factory=dict)  # flex_attention: block masks per tuple of head windows

    @property
    def backend(self) -> type["AttentionBackend"]:
        return ATTENTION_BACKENDS[self.implementation]

    # -- building ------------------------------------------------------------------------------------------------

    @staticmethod
    def scalars(
        shape: tuple[int, int],
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The 0-d tensors the layout is built from, left on the device for the caller to read (`_read_scalars`)
        together with its own input checks: one host sync for all of them."""
        scalars = {}
        if attention_mask is not None and attention_mask.numel():
            key_mask = attention_mask.bool()
            lengths = key_mask.sum(-1)
            runs = key_mask[:, 0].int() + (key_mask[:, 1:] & ~key_mask[:, :-1]).sum(-1)  # runs of real tokens per row
            scalars.update(
                mask_any=key_mask.any(),
                mask_all=key_mask.all(),
                mask_holes=(runs > 1).any(),
                real_tokens=lengths.sum(),
                longest_row=lengths.max(),
            )
        if cu_seq_lens_q is not None:
            scalars.update(cu_last=cu_seq_lens_q[-1], longest_document=cu_seq_lens_q.diff().max())
            if cu_seq_lens_k is not None and cu_seq_lens_k.shape == cu_seq_lens_q.shape:
                scalars["cu_matches_k"] = (cu_seq_lens_q == cu_seq_lens_k).all()
        elif position_ids is not None and shape[0] == 1 and shape[1] > 1:
            scalars["positions_restart"] = (position_ids[0, 1:] == 0).any()  # packed documents
        return scalars

    @classmethod
    def from_inputs(
        cls,
        implementation: str,
        slopes: torch.Tensor,
        shape: tuple[int, int],
        scalars: dict[str, int],
        *,
        dtype: torch.dtype,
        window_tau: float | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
    ) -> "AttentionLayout":
        """The layout of one forward: packed documents (`cu_seq_lens_q`, or `position_ids` restarting at 0) or a
        padded batch. `scalars`: `AttentionLayout.scalars(...)` of these inputs, read (`_read_scalars`)."""
        attention_backend(implementation)  # refuse a kernel without ALiBi before building anything for it
        if cu_seq_lens_q is None and scalars.get("positions_restart"):  # DataCollatorWithFlattening's position_ids
            bounds = _document_bounds(position_ids, shape[1])  # a second sync, for this kind of input only
            cu_seq_lens_q = torch.tensor(bounds, dtype=torch.int32, device=slopes.device)
            scalars = {**scalars, "cu_last": shape[1], "longest_document": max(b - a for a, b in pairwise(bounds))}
            if cu_seq_lens_k is not None:
                scalars["cu_matches_k"] = torch.equal(cu_seq_lens_q, cu_seq_lens_k)
        if cu_seq_lens_q is None:
            return cls.from_mask(
                implementation, slopes, shape, attention_mask, scalars, dtype=dtype, window_tau=window_tau
            )

        if cu_seq_lens_k is not None and not scalars.get("cu_matches_k"):
            raise ValueError("MedEIR is an encoder: cu_seq_lens_k must equal cu_seq_lens_q.")
        if shape[0] != 1:
            raise ValueError(f"A packed batch (cu_seq_lens_q) must have batch size 1, got {shape[0]}.")
        if scalars["cu_last"] != shape[1]:
            raise ValueError(f"cu_seq_lens_q ends at {scalars['cu_last']} but the packed input has {shape[1]} tokens.")
        if attention_mask is not None and not scalars["mask_all"]:
            raise ValueError("A packed batch has no padding: drop attention_mask or pass a padded batch instead.")
        max_seqlen = int(max_length_q or max_length_k or scalars["longest_document"])
        cu_seqlens = cu_seq_lens_q.to(torch.int32)
        return cls.from_packed(
            implementation, slopes, shape[1], cu_seqlens, max_seqlen, dtype=dtype, window_tau=window_tau
        )

    @classmethod
    def from_mask(
        cls,
        implementation: str,
        slopes: torch.Tensor,
        shape: tuple[int, int],
        attention_mask: torch.Tensor | None,
        scalars: dict[str, int] | None = None,
        *,
        dtype: torch.dtype,
        window_tau: float | None,
    ) -> "AttentionLayout":
        """A padded batch, left or right padding (or none: `attention_mask` None or all ones).

        `scalars` are `AttentionLayout.scalars(shape, attention_mask)`, read; computed here when not given.
        """
        if scalars is None:
            scalars = _read_scalars(cls.scalars(shape, attention_mask), slopes.device)
        batch, seq_len = shape
        layout = cls(implementation, slopes, shape=(batch, seq_len), max_seqlen=seq_len, real_tokens=batch * seq_len)
        if attention_mask is not None and not scalars["mask_all"]:
            # One contiguous run per row (left or right padding): then ALiBi distances are the same whether a
            # backend keeps the padded positions (sdpa, eager, flex) or drops them (flash-attn).
            if scalars["mask_holes"]:
                raise ValueError(
                    "attention_mask must mark one contiguous run of tokens per row (left or right padding); "
                    "a row with holes would get different ALiBi distances on different attention backends."
                )
            layout.key_mask = attention_mask.bool()
            layout.max_seqlen, layout.real_tokens = scalars["longest_row"], scalars["real_tokens"]
        layout.backend.prepare(layout, dtype, window_tau)
        return layout

    @classmethod
    def from_packed(
        cls,
        implementation: str,
        slopes: torch.Tensor,
        seq_len: int,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        *,
        dtype: torch.dtype,
        window_tau: float | None,
    ) -> "AttentionLayout":
        """Documents packed back to back in one row of `seq_len` tokens, boundaries `cu_seqlens` (int32, [0, ...,
        seq_len]), the longest `max_seqlen` tokens: no document attends to another."""
        layout = cls(
            implementation,
            slopes,
            shape=(1, seq_len),
            doc_ids=_document_ids(cu_seqlens, seq_len),
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            real_tokens=seq_len,
        )
        layout.backend.prepare(layout, dtype, window_tau)
        return layout

    def flatten(self) -> None:
        """Flat tokens from here on: the model drops the padding once per forward and every layer runs on the real
        tokens only. A packed row is flat already (its `cu_seqlens` are the boundaries); a padded batch gets its
        `indices` and `cu_seqlens`."""
        self.flat = True
        if self.cu_seqlens is not None:
            return
        batch, seq_len = self.shape
        if self.key_mask is None:
            lengths = torch.full((batch,), seq_len, dtype=torch.int32, device=self.slopes.device)
        else:
            lengths = self.key_mask.sum(-1, dtype=torch.int32)
            self.indices = self.key_mask.flatten().nonzero().flatten()
        self.cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))

    # -- using -----------------------------------------------------------------------------------------------------

    def pad(self, flat: torch.Tensor) -> torch.Tensor:
        """(T, ...) real tokens -> (B, S, ...), zeros at padding."""
        batch, seq_len = self.shape
        if self.indices is None:
            return flat.view(batch, seq_len, *flat.shape[1:])
        padded = flat.new_zeros(batch * seq_len, *flat.shape[1:])
        return padded.index_copy(0, self.indices, flat).view(batch, seq_len, *flat.shape[1:])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (T, ...) real tokens."""
        flat = padded.flatten(0, 1)
        return flat if self.indices is None else flat.index_select(0, self.indices)

    def padded_output(self, states: torch.Tensor) -> torch.Tensor:
        """A layer's output in the model's output form: (B, S, hidden), zeros at padding."""
        if self.flat:
            return self.pad(states)
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
# Attention backends: one unit each, how it lays out the tokens (`prepare`) and how it attends (`attend`)
# ----------------------------------------------------------------------------------------------------------------


class AttentionBackend:
    """One attention implementation, registered in ATTENTION_BACKENDS under transformers' name for it.

    `prepare(layout, dtype, window_tau)` runs once per forward on a layout that knows where the tokens are
    (`AttentionLayout.from_mask` / `from_packed`) and adds what `attend` reads: flat or padded tokens, a bias, a
    block mask, cu_seqlens, windowed ALiBi. `attend(q, k, v, layout, dropout, scaling)` runs in every layer; q, k, v
    are (B, S, H, d) padded or (T, H, d) flat, as the layout says, and so is its output.
    """

    name: str

    @staticmethod
    def check_available() -> None:
        """Raise, saying what to install, where this backend cannot run at all."""

    @staticmethod
    def prepare(layout: AttentionLayout, dtype: torch.dtype, window_tau: float | None) -> None:
        raise NotImplementedError

    @staticmethod
    def attend(q, k, v, layout: AttentionLayout, dropout: float, scaling: float) -> torch.Tensor:
        raise NotImplementedError


class EagerAttention(AttentionBackend):
    """The reference: padded tokens, the full fp32 bias (B or 1, H, S, S), fp32 scores and softmax."""

    name = "eager"

    @staticmethod
    def prepare(layout: AttentionLayout, dtype: torch.dtype, window_tau: float | None) -> None:
        layout.bias = layout.alibi_bias(layout.shape[1], torch.float32)

    @staticmethod
    def attend(q, k, v, layout: AttentionLayout, dropout: float, scaling: float) -> torch.Tensor:
        dtype = q.dtype
        q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling + layout.bias
        probs = F.dropout(scores.softmax(dim=-1), p=dropout, training=dropout > 0)
        return torch.matmul(probs, v).transpose(1, 2).to(dtype)


class SdpaAttention(AttentionBackend):
    """torch SDPA with the ALiBi bias as a float mask, in one of three layouts:

    - padded (B, S, H, d): one call with the bias built once per forward;
    - flat, re-padded: a batch with under SDPA_MIN_REAL_TOKENS real tokens runs its linear layers on the real tokens
      only, and q, k, v are padded back just around that one call;
    - flat, per sequence, for inputs whose full bias would exceed SDPA_BIAS_ELEMENTS, and for every sequence of
      ALIBI_WINDOW_MIN_LENGTH tokens or more when windowing is on: each sequence attends alone on a strided view of
      its ALiBi bias (`_windowed_sdpa`), so memory grows linearly with length and no padding is computed; windowed,
      each head group skips the keys `alibi_windows` proves negligible (exact windowed ALiBi).
    """

    name = "sdpa"

    @staticmethod
    def prepare(layout: AttentionLayout, dtype: torch.dtype, window_tau: float | None) -> None:
        (batch, seq_len), heads = layout.shape, len(layout.slopes)
        windowed = window_tau is not None and layout.max_seqlen >= ALIBI_WINDOW_MIN_LENGTH
        if windowed or (batch if layout.key_mask is not None else 1) * heads * seq_len * seq_len > SDPA_BIAS_ELEMENTS:
            layout.flatten()
            layout.segments = [(a, b) for a, b in pairwise(layout.cu_seqlens.tolist()) if b > a]
            layout.window_tau = window_tau  # used on segments of ALIBI_WINDOW_MIN_LENGTH tokens or more
            return
        layout.bias = layout.alibi_bias(seq_len, dtype)
        if layout.key_mask is not None and layout.real_tokens < SDPA_MIN_REAL_TOKENS * batch * seq_len:
            layout.flatten()
            layout.repad = True

    @staticmethod
    def attend(q, k, v, layout: AttentionLayout, dropout: float, scaling: float) -> torch.Tensor:
        if layout.bias is None:
            return SdpaAttention.attend_per_sequence(q, k, v, layout, dropout, scaling)
        if layout.repad:
            q, k, v = layout.pad(q), layout.pad(k), layout.pad(v)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        bias = layout.bias if layout.bias.dtype == q.dtype else layout.bias.to(q.dtype)  # autocast: bf16 q, fp32 bias
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scaling).transpose(1, 2)
        return layout.unpad(out) if layout.repad else out

    @staticmethod
    def attend_per_sequence(q, k, v, layout: AttentionLayout, dropout: float, scaling: float) -> torch.Tensor:
        """Flat (T, H, d): each sequence alone, its heads in groups by window (one group when all attend in full)."""
        pieces, heads = [], len(layout.slopes)
        for start, end in layout.segments:
            length = end - start
            qs, ks, vs = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))  # (1, H, L, d)
            groups = None
            if layout.window_tau is not None and length >= ALIBI_WINDOW_MIN_LENGTH:
                windows = alibi_windows(qs[0], ks[0], layout.slopes, scaling, layout.window_tau, length)
                span_limit = SDPA_WINDOW_MAX_SPAN * length  # a wider group attends in full
                windows = [w if _window_chunk(1, w, length) + 2 * w < span_limit else length for w in windows]
                groups = _window_groups(windows, length)
            groups = groups or [(list(range(heads)), max(length - 1, 0))]
            out = _windowed_sdpa(qs, ks, vs, layout.slopes, groups, dropout, scaling)
            pieces.append(out[0].transpose(0, 1))
        return torch.cat(pieces)


def _window_chunk(heads: int, window: int, length: int) -> int:
    """Query chunk of a windowed head group: about the window (64 at least), its scores at most SDPA_CHUNK_ELEMENTS."""
    chunk = max(64, -(-window // 64) * 64)
    cap = SDPA_CHUNK_ELEMENTS // (heads * (chunk + 2 * window)) // 64 * 64
    return min(length, max(64, min(chunk, cap)))


def _strided_bias(device: torch.device) -> bool:
    """Whether sdpa on `device` reads the ALiBi bias as a strided view of one vector (`_windowed_sdpa`).

    Checked on CPU (torch's flash kernel reads any strides, as fast as a contiguous bias or faster). Elsewhere each
    chunk's bias is materialised, as the fused CUDA kernels expect aligned strides.
    """
    return device.type == "cpu"


def _windowed_sdpa(q, k, v, slopes: torch.Tensor, groups, dropout: float, scaling: float) -> torch.Tensor:
    """(1, H, L, d) one sequence: each head group attends to the keys within its window only (all keys when its
    window is L - 1), in query chunks of about the window.

    ALiBi depends on i - j only, so with the queries in reverse order, r = L - 1 - i, the bias is a Hankel matrix:
    bias[r, j] = -slope * |L - 1 - r - j| = u[r + j] for the (h, 2L - 1) vector u, and the block of queries
    [r0, r1) against keys [k0, k1) is the strided view of u at offset r0 + k0, rows one element apart. No bias is
    built: memory stays linear in L however long the sequence, and a group that attends in full is one call.
    """
    length = q.shape[2]
    strided = _strided_bias(q.device)
    distance = (length - 1 - torch.arange(2 * length - 1, device=q.device)).abs()
    outs, order = [], []
    for heads, window in groups:
        index = torch.tensor(heads, device=q.device)
        qg = q.index_select(1, index).flip(2)  # reversed queries
        kg, vg = (x.index_select(1, index) for x in (k, v))
        u = (-slopes[index, None] * distance).to(q.dtype)  # (h, 2L - 1)
        full = window >= length - 1
        chunk = length if full and strided else _window_chunk(len(heads), window, length)
        pieces = []
        for r0 in range(0, length, chunk):
            r1 = min(r0 + chunk, length)
            k0, k1 = (0, length) if full else (max(0, length - r1 - window), min(length, length - r0 + window))
            bias = u.as_strided(
                (1, len(heads), r1 - r0, k1 - k0), (u.numel(), u.stride(0), 1, 1), u.storage_offset() + r0 + k0
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
        outs.append(torch.cat(pieces, dim=2).flip(2))
        order += heads
    inverse = torch.tensor(order, device=q.device).argsort()
    return torch.cat(outs, dim=1).index_select(1, inverse)


@cache
def _compiled_flex_attention(device_type: str) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled flex_attention materialises the full score matrix; compiled it is a fused kernel. Inductor's CPU
    # template miscompiles dynamic shapes (torch 2.13: undeclared `cur_kvSplitSize` symbols), so on CPU every new
    # input shape compiles anew (~15 s); CUDA (Triton) keeps automatic dynamic shapes.
    return torch.compile(flex_attention, dynamic=None if device_type == "cuda" else False)


class FlexAttention(AttentionBackend):
    """torch FlexAttention on padded tokens: ALiBi as a score_mod, padding / document boundaries as the block mask;
    from ALIBI_WINDOW_MIN_LENGTH tokens on, a per-head block mask of exact windowed ALiBi (`window_mask`)."""

    name = "flex_attention"

    @staticmethod
    def prepare(layout: AttentionLayout, dtype: torch.dtype, window_tau: float | None) -> None:
        from torch.nn.attention.flex_attention import create_block_mask

        batch, seq_len = layout.shape
        layout.window_tau = window_tau if seq_len >= ALIBI_WINDOW_MIN_LENGTH else None
        if layout.key_mask is not None:
            key_mask = layout.key_mask

            def mask_mod(b, h, q_idx, kv_idx):
                return key_mask[b, kv_idx]

        elif layout.doc_ids is not None:
            doc_ids = layout.doc_ids

            def mask_mod(b, h, q_idx, kv_idx):
                return doc_ids[q_idx] == doc_ids[kv_idx]

        else:
            return
        layout.mask_mod = mask_mod  # windowed ALiBi intersects its windows with it
        rows = batch if layout.key_mask is not None else None
        layout.block_mask = create_block_mask(mask_mod, rows, None, seq_len, seq_len, device=layout.slopes.device)

    @staticmethod
    def attend(q, k, v, layout: AttentionLayout, dropout: float, scaling: float) -> torch.Tensor:
        if dropout > 0:
            raise ValueError("flex_attention has no attention dropout: set attention_probs_dropout_prob=0.0")
        slopes = layout.slopes

        def alibi(score, batch, head, q_idx, kv_idx):
            return score - slopes[head] * (q_idx - kv_idx).abs()

        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        block_mask = (
            layout.block_mask if layout.window_tau is None else FlexAttention.window_mask(q, k, layout, scaling)
        )
        kernel = _compiled_flex_attention(q.device.type)
        return kernel(q, k, v, score_mod=alibi, block_mask=block_mask, scale=scaling).transpose(1, 2)

    @staticmethod
    def window_mask(q: torch.Tensor, k: torch.Tensor, layout: AttentionLayout, scaling: float):
        """The block mask of exact windowed ALiBi for this layer's q, k (B, H, S, d): per head, keys within its window.

        Windows are rounded up to a power of two times the block size (a superset of each, so still exact), which
        keeps the distinct masks of a forward few: they are built once and cached in the layout. None of the heads
        windowed (every window covers the sequence): the layout's own mask.
        """
        from torch.nn.attention.flex_attention import create_block_mask

        block = FLEX_BLOCK_SIZE
        batch, heads, seq_len, _ = q.shape
        windows = alibi_windows(
            q.transpose(0, 1).flatten(1, 2),
            k.transpose(0, 1).flatten(1, 2),
            layout.slopes,
            scaling,
            layout.window_tau,
            seq_len,
        )
        reach = tuple(min(seq_len, block << max(0, math.ceil(math.log2(max(w, 1) / block)))) for w in windows)
        if min(reach) + block >= seq_len:  # no head can skip a whole block of keys
            return layout.block_mask
        if reach not in layout.window_masks:
            limit, base = torch.tensor(reach, device=q.device), layout.mask_mod

            def mask_mod(b, h, q_idx, kv_idx):
                near = (q_idx - kv_idx).abs() <= limit[h]
                return near if base is None else near & base(b, h, q_idx, kv_idx)

            rows = batch if layout.key_mask is not None else None
            layout.window_masks[reach] = create_block_mask(mask_mod, rows, heads, seq_len, seq_len, device=q.device)
        return layout.window_masks[reach]


class FlashAttention(AttentionBackend):
    """flash-attn 2's varlen kernel on flat tokens (T, H, d), unpadded once per forward: it adds -slope*|i-j| in fp32
    with positions restarting at every sequence of `cu_seqlens`; from ALIBI_WINDOW_MIN_LENGTH tokens on, exact
    windowed ALiBi through its `window_size`, per head group."""

    name = "flash_attention_2"

    @staticmethod
    def check_available() -> None:
        FlashAttention.kernel()

    @staticmethod
    def kernel() -> Callable:
        try:
            from flash_attn import flash_attn_varlen_func
        except Exception as error:  # a broken build (ABI mismatch) raises more than ModuleNotFoundError
            raise ImportError(FLASH_ATTN_HELP) from error
        return flash_attn_varlen_func

    @staticmethod
    def prepare(layout: AttentionLayout, dtype: torch.dtype, window_tau: float | None) -> None:
        layout.flatten()
        layout.window_tau = window_tau if layout.max_seqlen >= ALIBI_WINDOW_MIN_LENGTH else None

    @staticmethod
    def attend(q, k, v, layout: AttentionLayout, dropout: float, scaling: float) -> torch.Tensor:
        if q.dtype not in (torch.float16, torch.bfloat16) or q.device.type != "cuda":
            raise TypeError(
                f"flash_attention_2 runs in float16/bfloat16 on CUDA, got {q.dtype} on {q.device}: load the model "
                "with dtype=torch.bfloat16 and move it to a GPU, or use attn_implementation='sdpa'."
            )
        attend = FlashAttention.kernel()
        lengths = dict(cu_seqlens_q=layout.cu_seqlens, cu_seqlens_k=layout.cu_seqlens, max_seqlen_q=layout.max_seqlen)
        options = dict(
            **lengths, max_seqlen_k=layout.max_seqlen, dropout_p=dropout, softmax_scale=scaling, causal=False
        )
        groups = None
        if layout.window_tau is not None:  # exact windowed ALiBi: flash-attn's window_size per head group
            windows = alibi_windows(
                q.transpose(0, 1), k.transpose(0, 1), layout.slopes, scaling, layout.window_tau, layout.max_seqlen
            )
            groups = _window_groups(windows, layout.max_seqlen)
        if groups is None:
            return attend(q, k, v, **options, alibi_slopes=layout.slopes)
        outs, order = [], []
        for heads, window in groups:
            index = torch.tensor(heads, device=q.device)
            size = -1 if window >= layout.max_seqlen - 1 else window  # -1: no window
            qg, kg, vg = (x.index_select(1, index) for x in (q, k, v))
            slopes = layout.slopes.index_select(0, index)
            outs.append(attend(qg, kg, vg, **options, alibi_slopes=slopes, window_size=(size, size)))
            order += heads
        return torch.cat(outs, dim=1).index_select(1, torch.tensor(order, device=q.device).argsort())


# The only attention implementations MedEIR accepts: each one applies ALiBi. Names are transformers' own, so
# `attn_implementation=` and `set_attn_implementation()` select them.
ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    backend.name: backend for backend in (EagerAttention, SdpaAttention, FlexAttention, FlashAttention)
}


def attention_backend(name: str | None) -> type[AttentionBackend]:
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


def _index_dtype(ids: torch.Tensor) -> torch.Tensor:
    """nn.Embedding takes int32 / int64 ids only; narrower integer ids (uint8, int16) are widened, not refused."""
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
        hidden = self.word_embeddings(_index_dtype(input_ids)) if inputs_embeds is None else inputs_embeds
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                hidden = hidden + self.token_type_embeddings.weight[0]
            else:
                hidden = hidden + self.token_type_embeddings(_index_dtype(token_type_ids))
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
        tokens = hidden.shape[:-1]  # (B, S) padded, or (T,) flat
        q, k, v = self.qkv(hidden).view(*tokens, 3, self.num_heads, self.head_dim).unbind(dim=-3)
        out = layout.backend.attend(q, k, v, layout, self.dropout if self.training else 0.0, self.scaling)
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
    def _can_set_attn_implementation(cls) -> bool:
        # The layout's backend is looked up by name at every forward, so switching is always safe.
        return True

    def _check_and_adjust_attn_implementation(
        self, attn_implementation: str | None, is_init_check: bool = False, allow_all_kernels: bool = False
    ) -> str:
        # Checked before transformers can swap a missing flash-attn for a Hub kernel that knows nothing of ALiBi.
        if attn_implementation is not None:
            attention_backend(attn_implementation).check_available()
        chosen = super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, allow_all_kernels)
        if chosen != attn_implementation:  # transformers' default, or a fallback it picked: must apply ALiBi too
            attention_backend(chosen)
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
        output_hidden_states = bool(output_hidden_states or self.config.output_hidden_states)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        scalars = self._check_inputs(
            input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids, cu_seq_lens_q, cu_seq_lens_k
        )
        shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = self.embeddings.word_embeddings.weight.device

        # An empty batch, or one whose rows are all padding, has no token to attend from: zeros, as at any padding.
        if shape[0] == 0 or shape[1] == 0 or (attention_mask is not None and not scalars["mask_any"]):
            empty = torch.zeros(*shape, self.config.hidden_size, device=device, dtype=self.dtype)
            hidden_states = (empty,) * (self.config.num_hidden_layers + 1) if output_hidden_states else None
            out = BaseModelOutput(last_hidden_state=empty, hidden_states=hidden_states)
            return out if return_dict else out.to_tuple()

        hidden = self.embeddings(input_ids, token_type_ids, inputs_embeds)
        layout = AttentionLayout.from_inputs(
            self.config._attn_implementation,
            self._alibi_slopes(device),
            tuple(shape),
            scalars,
            dtype=hidden.dtype,
            window_tau=getattr(self.config, "alibi_window_tau", ALIBI_WINDOW_TAU),  # None: full attention
            attention_mask=attention_mask,
            position_ids=position_ids,
            cu_seq_lens_q=cu_seq_lens_q,
            cu_seq_lens_k=cu_seq_lens_k,
            max_length_q=max_length_q,
            max_length_k=max_length_k,
        )
        if layout.flat:  # unpad once per forward: every layer runs on real tokens only
            hidden = layout.unpad(hidden)

        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, layout)
            if all_hidden is not None:
                all_hidden.append(hidden)

        out = BaseModelOutput(
            last_hidden_state=layout.padded_output(hidden),
            hidden_states=tuple(map(layout.padded_output, all_hidden)) if all_hidden is not None else None,
        )
        return out if return_dict else out.to_tuple()

    # -- input checks --------------------------------------------------------------------------------------------

    def _check_inputs(
        self, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids, cu_seq_lens_q, cu_seq_lens_k
    ) -> dict[str, int]:
        """Raise on bad input, saying what to do; return the scalars `AttentionLayout.from_inputs` builds from.

        Types, shapes and devices are checked on the host. Every value (token id and token type ranges, cu_seq_lens,
        the mask's runs of tokens) is reduced on the device and read in one transfer with the layout's scalars: one
        host sync per forward. Under torch.compile the value checks are left out.
        """
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
        weight = self.embeddings.word_embeddings.weight
        checking_values = not torch.compiler.is_compiling()
        if input_ids is not None:
            self._check_integer("input_ids", input_ids)
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}.")
            self._check_device("input_ids", input_ids, weight.device)
            shape = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must be (batch, sequence, {self.config.hidden_size}), "
                    f"got shape {tuple(inputs_embeds.shape)}."
                )
            self._check_device("inputs_embeds", inputs_embeds, weight.device)
            if inputs_embeds.dtype != weight.dtype:
                raise TypeError(
                    f"inputs_embeds is {inputs_embeds.dtype} but the model runs in {weight.dtype}: "
                    f"cast it with .to({weight.dtype})."
                )
            shape = inputs_embeds.shape[:2]
        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if tensor is not None:
                self._check_device(name, tensor, weight.device)
                if tensor.shape != shape:
                    raise ValueError(f"{name} has shape {tuple(tensor.shape)} but the input is {tuple(shape)}.")
        if token_type_ids is not None:
            self._check_integer("token_type_ids", token_type_ids)
        if cu_seq_lens_q is not None:
            self._check_integer("cu_seq_lens_q", cu_seq_lens_q)
            self._check_device("cu_seq_lens_q", cu_seq_lens_q, weight.device)
            if cu_seq_lens_q.dim() != 1 or cu_seq_lens_q.numel() < 2:
                raise ValueError(
                    f"cu_seq_lens_q must be 1-D [0, end_1, ..., total], got shape {tuple(cu_seq_lens_q.shape)}."
                )

        scalars = AttentionLayout.scalars(tuple(shape), attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k)
        if checking_values:
            if input_ids is not None and input_ids.numel():
                scalars.update(ids_min=input_ids.min(), ids_max=input_ids.max())
            if token_type_ids is not None and token_type_ids.numel():
                scalars.update(types_min=token_type_ids.min(), types_max=token_type_ids.max())
            if cu_seq_lens_q is not None:
                scalars.update(cu_first=cu_seq_lens_q[0], cu_increasing=(cu_seq_lens_q.diff() > 0).all())
        values = _read_scalars(scalars, weight.device)  # the one host sync

        if "ids_min" in values:
            low, high = values["ids_min"], values["ids_max"]
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"input_ids contains token id {bad}, outside the vocabulary [0, {self.config.vocab_size}): "
                    "was the text tokenized with this model's tokenizer?"
                )
        if "types_min" in values:
            types = self.config.type_vocab_size
            low, high = values["types_min"], values["types_max"]
            if low < 0 or high >= max(types, 1):  # without token-type embeddings only 0 (ignored) is allowed
                raise ValueError(
                    f"token_type_ids contains {low if low < 0 else high}, outside [0, {max(types, 1)}) "
                    f"(type_vocab_size is {types})."
                )
        if "cu_first" in values and (values["cu_first"] != 0 or not values["cu_increasing"]):
            raise ValueError(
                "cu_seq_lens_q must start at 0 and strictly increase (one boundary per packed document), "
                f"got {cu_seq_lens_q.tolist()[:16]}."
            )
        if shape[1] > self.config.max_position_embeddings:
            logger.warning_once(
                f"Input of {shape[1]} tokens is longer than the {self.config.max_position_embeddings} tokens MedEIR "
                "was trained for; ALiBi extrapolates, but quality beyond that length was not measured."
            )
        return values

    @staticmethod
    def _check_integer(name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {tensor.dtype}.")

    @staticmethod
    def _check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
        if tensor.device != device:
            raise ValueError(
                f"{name} is on {tensor.device} but the model is on {device}: move the inputs with .to(model.device)."
            )


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
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
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
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        pooled = self._mean_pool(outputs.last_hidden_state, attention_mask, position_ids, kwargs.get("cu_seq_lens_q"))
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        out = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return out if return_dict else out.to_tuple()

    @staticmethod
    def _mean_pool(hidden, attention_mask, position_ids, cu_seq_lens_q) -> torch.Tensor:
        """Mean of each sequence's real tokens: (B, hidden), or (documents, hidden) for a packed row."""
        if cu_seq_lens_q is None and position_ids is not None and hidden.shape[0] == 1:
            bounds = _document_bounds(position_ids, hidden.shape[1])
            cu_seq_lens_q = torch.tensor(bounds, device=hidden.device) if len(bounds) > 2 else None
        if cu_seq_lens_q is not None:
            lengths = cu_seq_lens_q.diff()[:, None].clamp(min=1).to(hidden.dtype)
            documents = _document_ids(cu_seq_lens_q, hidden.shape[1])
            return hidden.new_zeros(len(lengths), hidden.shape[-1]).index_add_(0, documents, hidden[0]) / lengths
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
    "MedEIRForMaskedLM",
    "MedEIRForSequenceClassification",
    "MedEIRModel",
    "MedEIRPreTrainedModel",
    "alibi_slopes",
    "config_alibi_slopes",
]
