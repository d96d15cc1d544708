"""The pieces every Parameter Golf GPT is built from: norms, rotary, attention (with its output gates,
XSA and document masks), the MLP, SmearGate, and the adapter protocol of per-document TTT.

Formulas follow spec sections 3 and 5 (``../shared/spec``); names are the records' state-dict names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

try:  # FlashAttention-3 (Hopper); optional, never required.
    from flash_attn_interface import flash_attn_func as _fa3_func
    from flash_attn_interface import flash_attn_varlen_func as _fa3_varlen
except Exception:  # noqa: BLE001 - any import failure just means "not available"
    _fa3_func = _fa3_varlen = None

# The records' BOS id (SentencePiece ``<s>``); SmearGate's document mask compares against it.
BOS_ID = 1

Site = Literal["q", "k", "v", "o", "mlp"]


class Adapters(Protocol):
    """Additive adapters (per-document LoRA TTT, spec 2.6), called by the forward pass when given.

    ``slot`` is the layer *application* in execution order (0..16 for the records' looped schedule:
    encoder then decoder). Sites and inputs (``inp`` is (batch, seq, model_dim)):

    * ``"q"``, ``"k"``, ``"v"``: input the normalised attention input; the result is added to that
      projection's output, before the head reshape, q/k RMS norm and RoPE;
    * ``"o"``: input the same normalised attention input; added to the attention output after the output
      projection, before ``attn_scale``;
    * ``"mlp"``: input the normalised MLP input; added to the MLP output, before ``mlp_scale``.

    ``delta`` returns None where it has no adapter. ``head(h)`` gets the final-normed hidden state and
    its result (or None) is added to the tied-embedding logits before the soft cap.
    """

    def delta(self, slot: int, site: Site, inp: Tensor) -> Tensor | None: ...

    def head(self, h: Tensor) -> Tensor | None: ...


Hook = Callable[[Site, Tensor], "Tensor | None"]  # an Adapters' delta bound to one slot


def plus(out: Tensor, hook: Hook | None, site: Site, inp: Tensor) -> Tensor:
    """``out`` plus the adapter's delta at ``site``, if there is one."""
    delta = None if hook is None else hook(site, inp)
    return out if delta is None else out + delta


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """A bias-free linear layer that casts its (float32) weight to the activation dtype."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    """Split-half RoPE tables for ``rope_dims`` dims of each head; with ``yarn`` the base is scaled for rows
    longer than ``train_seq_len`` (04-09), without it never (``ROPE_YARN=0``, spec 3.4)."""

    def __init__(self, rope_dims: int, base: float, train_seq_len: int, yarn: bool = True) -> None:
        super().__init__()
        self.rope_dims, self.base, self.train_seq_len, self.yarn = rope_dims, base, train_seq_len, yarn
        self._cache: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}

    def cos_sin(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling() and not self.yarn:
            # Without base scaling the tables depend on nothing but the length: a graph makes its own, so none
            # guards on a cached table and a dynamic length stays dynamic (phased_compiled's one graph).
            cos, sin = self._tables(seq_len, device)
            return cos.to(dtype), sin.to(dtype)
        key = (seq_len, str(device))
        tables = self._cache.get(key)
        if tables is None:
            tables = self._tables(seq_len, device)
            # Only eager calls fill the cache (GPT.cache_rotary before compiled ones): a compiled graph that
            # filled it would guard on its absence and be compiled again on the next call.
            if not torch.compiler.is_compiling():
                self._cache[key] = tables
        cos, sin = tables
        return cos.to(dtype), sin.to(dtype)

    def _tables(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        base = self.base
        if self.yarn and seq_len > self.train_seq_len:
            # Long-context scaling of the base (NTK-style), as the 04-09 record does.
            base = base * (seq_len / self.train_seq_len) ** (self.rope_dims / max(self.rope_dims - 2, 1))
        exponents = torch.arange(0, self.rope_dims, 2, dtype=torch.float32, device=device) / self.rope_dims
        inv_freq = 1.0 / (base**exponents)
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, rope_dims: int) -> Tensor:
    """x: (batch, seq, heads, head_dim); rotates the first rope_dims dims, split-half form."""
    half = rope_dims // 2
    a, b = x[..., :half], x[..., half:rope_dims]
    rotated = torch.cat((a * cos + b * sin, a * (-sin) + b * cos), dim=-1)
    if rope_dims == x.size(-1):
        return rotated
    return torch.cat((rotated, x[..., rope_dims:]), dim=-1)


# ---- attention kernels ----------------------------------------------------------------------
def segment_ids(cu_seqlens: Tensor, seq_len: int) -> Tensor:
    """Segment index of every position of a packed row from its boundaries ``cu_seqlens`` (0, ends...,
    padded with ``seq_len`` as the records pad them): position t is in segment s when
    ``cu[s] <= t < cu[s+1]``."""
    positions = torch.arange(seq_len, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens.contiguous(), positions, right=True)


def check_cu_seqlens(cu_seqlens: Tensor, seq_len: int) -> None:
    """Segment boundaries must start at 0, never decrease and end at the row's length."""
    cu = cu_seqlens.tolist()
    ordered = cu_seqlens.ndim == 1 and len(cu) >= 2 and all(a <= b for a, b in zip(cu[:-1], cu[1:], strict=True))
    if not ordered or cu[0] != 0 or cu[-1] != seq_len:
        raise ValueError(f"cu_seqlens must be non-decreasing boundaries from 0 to {seq_len}; got {cu}")


def attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """Causal GQA attention on (batch, seq, heads, head_dim) tensors, scale 1/sqrt(head_dim); with
    ``cu_seqlens`` only within each segment [cu[i], cu[i+1]) (document-masked "varlen", spec 3.10)."""
    fa3 = q.is_cuda and q.dtype == torch.bfloat16
    if cu_seqlens is None:
        if fa3 and _fa3_func is not None:
            out = _fa3_func(q, k, v, causal=True)
            return out[0] if isinstance(out, tuple) else out
        return _sdpa_causal(q, k, v)
    if fa3 and _fa3_varlen is not None and q.size(0) == 1:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        out = _fa3_varlen(
            q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest, causal=True
        )
        return (out[0] if isinstance(out, tuple) else out)[None]
    # One causal attention per segment: exactly the block-diagonal causal mask, in memory per segment.
    y = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > start:
            y[:, start:end] = _sdpa_causal(q[:, start:end], k[:, start:end], v[:, start:end])
    return y


@contextlib.contextmanager
def cudnn_attention(allowed: bool) -> Iterator[None]:
    """Process-wide for the block, restored after it: whether SDPA on CUDA may take cuDNN's attention kernel.

    cuDNN's kernel is the fastest on Hopper for shapes it has planned, but it plans every new shape on the host
    (2.5 ms forward, 3.4 ms backward a call: bench/RESULTS.md run 21). Fixed-shape protocols (chunked TTT, whose
    windows are all ``seq_len`` long) take it; protocols whose shapes change at every step (the phased one) run
    FlashAttention, else the memory-efficient kernel, else math. ``EvalSession`` sets it around a protocol's
    warm-up and run: compiled graphs bake in the kernel chosen while they are traced. A global setting, not an
    ``sdpa_kernel`` block inside the model: a compiled graph holding that block is one AOTAutograd will not cache,
    so a restarted server compiled the phased step again (run 22). Being global, two protocols must not run at
    once in one process (the service runs one worker process per device)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(allowed)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False, gqa: bool = False
) -> Tensor:
    """``F.scaled_dot_product_attention`` on (batch, seq, heads, head_dim)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal, enable_gqa=gqa).transpose(1, 2)


def _sdpa_causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _sdpa(q, k, v, is_causal=True, gqa=q.size(2) != k.size(2))


def attention_at(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """Causal attention for queries at ``positions`` (batch, k) only: query i of row b sees the keys at
    positions up to ``positions[b, i]`` (and, with ``cu_seqlens``, in its segment only). The same numbers
    as ``attention`` there, for a fraction of its work."""
    keys = torch.arange(k.size(1), device=k.device)
    mask = keys[None, None, None, :] <= positions[:, None, :, None]  # (batch, 1, k, seq)
    if cu_seqlens is not None:
        segments = segment_ids(cu_seqlens.to(k.device), k.size(1))
        mask = mask & (segments[keys][None, None, None, :] == segments[positions][:, None, :, None])
    groups = q.size(2) // k.size(2)
    if groups > 1:  # query head h reads key/value head h // groups, as enable_gqa does
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    return _sdpa(q, k, v, attn_mask=mask)


def gather_positions(x: Tensor, positions: Tensor) -> Tensor:
    """Rows ``positions`` (batch, k) of x (batch, seq, ...) -> (batch, k, ...)."""
    index = positions.reshape(*positions.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


def exclude_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: remove from each head's output its component along its own (normalized) value vector."""
    bsz, seq, heads, hd = y.shape
    kv_heads = v.size(2)
    y_g = y.reshape(bsz, seq, kv_heads, heads // kv_heads, hd)
    v_n = F.normalize(v, dim=-1).unsqueeze(-2)
    return (y_g - (y_g * v_n).sum(dim=-1, keepdim=True) * v_n).reshape(bsz, seq, heads, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, use_xsa: bool) -> None:
        super().__init__()
        d, hd, heads = config.model_dim, config.head_dim, config.num_heads
        self.num_heads, self.num_kv_heads, self.head_dim = heads, config.num_kv_heads, hd
        self.rope_dims = config.rotary_dims
        self.c_q = CastedLinear(d, d)
        self.c_k = CastedLinear(d, config.num_kv_heads * hd)
        self.c_v = CastedLinear(d, config.num_kv_heads * hd)
        self.proj = CastedLinear(d, d)
        self.q_gain = nn.Parameter(torch.full((heads,), config.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(self.rope_dims, config.rope_base, config.train_seq_len, config.rope_yarn)
        self.use_xsa = use_xsa
        # The output gate (spec 3.3), one of three or none; the state-dict names are the records'.
        self.gate, self.gate_window = config.attn_gate, config.gate_window
        self.gate_from_q = config.attn_out_gate_src == "q"
        self.gate_scale = config.sparse_attn_gate_scale
        if self.gate == "attn_out":
            self.attn_gate_proj = CastedLinear(config.gate_window, heads)
        elif self.gate in ("dense", "sparse"):
            width = d if self.gate == "dense" else config.gate_window
            self.attn_gate_w = nn.Parameter(torch.zeros(heads, width))

    def forward(
        self, x: Tensor, positions: Tensor | None = None, cu_seqlens: Tensor | None = None, hook: Hook | None = None
    ) -> Tensor:
        """Attention over all positions; with ``positions`` (batch, k), queries (and output) only there: keys
        and values still come from every position. ``cu_seqlens``: document masks; ``hook``: adapters."""
        bsz, seq, dim = x.shape
        x_q = x if positions is None else gather_positions(x, positions)
        q_raw = plus(self.c_q(x_q), hook, "q", x_q)
        q = q_raw.reshape(bsz, x_q.size(1), self.num_heads, self.head_dim)
        k = plus(self.c_k(x), hook, "k", x).reshape(bsz, seq, self.num_kv_heads, self.head_dim)
        v = plus(self.c_v(x), hook, "v", x).reshape(bsz, seq, self.num_kv_heads, self.head_dim)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary.cos_sin(seq, x.device, q.dtype)
        k = apply_rotary(k, cos, sin, self.rope_dims)
        if positions is not None:
            cos, sin = cos[0][positions], sin[0][positions]  # (batch, k, 1, rope_dims / 2)
        q = apply_rotary(q, cos, sin, self.rope_dims)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        if positions is None:
            y = attention(q, k, v, cu_seqlens)  # (bsz, seq, heads, head_dim)
        else:
            y = attention_at(q, k, v, positions, cu_seqlens)  # (bsz, k, heads, head_dim)
            v = gather_positions(v, positions)
        if self.use_xsa:
            y = exclude_self_value(y, v)
        y = self.gate_heads(y, x_q, q_raw)
        return plus(self.proj(y.flatten(2)), hook, "o", x_q)

    def gate_heads(self, y: Tensor, a: Tensor, q_raw: Tensor) -> Tensor:
        """Scale each head's output y (batch, seq, heads, head_dim) by its gate; ``a`` is the attention input."""
        if self.gate is None:
            return y
        if self.gate == "attn_out":  # AttnOutGate (04-16): 2 sigmoid(P src[:w])
            src = q_raw if self.gate_from_q else a
            g = 2.0 * torch.sigmoid(self.attn_gate_proj(src[..., : self.gate_window]))
        elif self.gate == "dense":  # GatedAttn (04-19): sigmoid(G a)
            g = torch.sigmoid(F.linear(a, self.attn_gate_w.to(a.dtype)))
        else:  # sparse head-output gate (04-23): sigmoid(kappa G a[:w])
            g = torch.sigmoid(self.gate_scale * F.linear(a[..., : self.gate_window], self.attn_gate_w.to(a.dtype)))
        return y * g[..., None]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = CastedLinear(config.model_dim, config.mlp_hidden)
        self.proj = CastedLinear(config.mlp_hidden, config.model_dim)

    def forward(self, x: Tensor, hook: Hook | None = None) -> Tensor:
        return plus(self.proj(F.leaky_relu(self.fc(x), negative_slope=0.5).square()), hook, "mlp", x)


def smear(e: Tensor, ids: Tensor, gate: CastedLinear, lam: Tensor, bos_mask: bool) -> Tensor:
    """SmearGate (spec 3.2) on raw embeddings e (batch, seq, d): for t >= 1,
    e'_t = e_t + lam * sigmoid(w . e_t[:window]) * e_{t-1}, times [id_t != BOS] with the BOS mask."""
    g = lam.to(e.dtype) * torch.sigmoid(gate(e[:, 1:, : gate.in_features]))
    prev = e[:, :-1]
    if bos_mask:
        prev = prev * (ids[:, 1:] != BOS_ID).to(e.dtype).unsqueeze(-1)
    return torch.cat((e[:, :1], e[:, 1:] + g * prev), dim=1)
