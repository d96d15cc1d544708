"""The Parameter Golf GPT (spec section 5), written out plainly, and its two precision policies.

Block order, norms and scales follow the challenge's 2026-04-09 record so that a state dict saved by
the challenge loads here unchanged and gives the same numbers.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

Precision = Literal["bf16", "fp32"]
PRECISIONS: tuple[str, ...] = ("bf16", "fp32")

try:  # FlashAttention-3 (Hopper); optional, never required.
    from flash_attn_interface import flash_attn_func as _fa3_func  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure just means "not available"
    _fa3_func = None


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """A bias-free linear layer that casts its (float32) weight to the activation dtype."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    """Split-half RoPE on the first ``rope_dims`` dims of each head, base scaled past ``train_seq_len``."""

    def __init__(self, rope_dims: int, base: float, train_seq_len: int) -> None:
        super().__init__()
        self.rope_dims, self.base, self.train_seq_len = rope_dims, base, train_seq_len
        self._cache: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}

    def cos_sin(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
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
        if seq_len > self.train_seq_len:
            # Long-context scaling of the base (NTK-style), as the record does.
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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, use_xsa: bool) -> None:
        super().__init__()
        d, hd = config.model_dim, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.rope_dims = config.rope_dims
        self.c_q = CastedLinear(d, d)
        self.c_k = CastedLinear(d, config.num_kv_heads * hd)
        self.c_v = CastedLinear(d, config.num_kv_heads * hd)
        self.proj = CastedLinear(d, d)
        self.q_gain = nn.Parameter(torch.full((config.num_heads,), config.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(config.rope_dims, config.rope_base, config.train_seq_len)
        self.use_xsa = use_xsa

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """Attention over all positions; with ``positions`` (batch, k), queries (and output) only there: keys
        and values still come from every position."""
        bsz, seq, dim = x.shape
        x_q = x if positions is None else gather_positions(x, positions)
        q = self.c_q(x_q).reshape(bsz, x_q.size(1), self.num_heads, self.head_dim)
        k = self.c_k(x).reshape(bsz, seq, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).reshape(bsz, seq, self.num_kv_heads, self.head_dim)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary.cos_sin(seq, x.device, q.dtype)
        k = apply_rotary(k, cos, sin, self.rope_dims)
        if positions is not None:
            cos, sin = cos[0][positions], sin[0][positions]  # (batch, k, 1, rope_dims / 2)
        q = apply_rotary(q, cos, sin, self.rope_dims)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        if positions is None:
            y = attention(q, k, v)  # (bsz, seq, heads, head_dim)
        else:
            y = attention_at(q, k, v, positions)  # (bsz, k, heads, head_dim)
            v = gather_positions(v, positions)
        if self.use_xsa:
            y = exclude_self_value(y, v)
        return self.proj(y.flatten(2))


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal GQA attention on (batch, seq, heads, head_dim) tensors, scale 1/sqrt(head_dim)."""
    if _fa3_func is not None and q.is_cuda and q.dtype == torch.bfloat16:
        out = _fa3_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        is_causal=True, enable_gqa=q.size(2) != k.size(2),
    )
    return y.transpose(1, 2)


def attention_at(q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
    """Causal attention for queries at ``positions`` (batch, k) only: query i of row b sees the keys at
    positions up to ``positions[b, i]``. The same numbers as ``attention`` there, for a fraction of its work."""
    keys = torch.arange(k.size(1), device=k.device)
    mask = keys[None, None, None, :] <= positions[:, None, :, None]  # (batch, 1, k, seq)
    groups = q.size(2) // k.size(2)
    if groups > 1:  # query head h reads key/value head h // groups, as enable_gqa does
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return y.transpose(1, 2)


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


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = CastedLinear(config.model_dim, config.mlp_hidden)
        self.proj = CastedLinear(config.mlp_hidden, config.model_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), negative_slope=0.5).square())


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        d = config.model_dim
        self.attn = CausalSelfAttention(config, use_xsa=index >= config.num_layers - config.xsa_last_n)
        self.mlp = MLP(config)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        self.norm_scale = 1.0 / math.sqrt(index + 1) if config.ln_scale else 1.0
        self.parallel = index >= config.parallel_residual_start

    def forward(self, x: Tensor, x0: Tensor, positions: Tensor | None = None) -> Tensor:
        """The block at every position, or (keys and values still from every position) only at ``positions``."""
        mix = self.resid_mix.to(x.dtype)
        x_in = mix[0] * x + mix[1] * x0
        a = self.attn(rms_norm(x_in) * self.norm_scale, positions)
        if positions is not None:
            x_in = gather_positions(x_in, positions)
        attn_scale, mlp_scale = self.attn_scale.to(x.dtype), self.mlp_scale.to(x.dtype)
        if self.parallel:
            return x_in + attn_scale * a + mlp_scale * self.mlp(rms_norm(x_in) * self.norm_scale)
        h = x_in + attn_scale * a
        return h + mlp_scale * self.mlp(rms_norm(h) * self.norm_scale)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.model_dim
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.encoder_indices, self.decoder_indices = config.encoder_decoder()
        n_skip = config.num_skip_weights
        self.skip_weights = nn.Parameter(torch.ones(n_skip, d))
        self.skip_gates = nn.Parameter(torch.zeros(n_skip, d)) if config.skip_gates_enabled else None
        self.lm_head = None if config.tie_embeddings else CastedLinear(d, config.vocab_size)
        # Depth recurrence is always on for evaluation; training switches it on part-way.
        self.looping = True

    def schedule(self) -> tuple[list[int], list[int]]:
        if self.looping:
            return self.encoder_indices, self.decoder_indices
        half = self.config.num_layers // 2
        return list(range(half)), list(range(half, self.config.num_layers))

    def forward_hidden(self, ids: Tensor, positions: Tensor | None = None) -> Tensor:
        """Token ids (batch, seq) -> final-normed hidden states (batch, seq, model_dim).

        With ``positions`` (batch, k): the hidden states at those positions only, (batch, k, model_dim). The
        same numbers, cheaper: the last block application computes queries, attention, MLP and output only
        there (its keys and values still at every position).
        """
        x = rms_norm(self.tok_emb(ids))
        x0 = x
        encoder, decoder = self.schedule()
        skips: list[Tensor] = []
        for i in encoder:
            x = self.blocks[i](x, x0)
            skips.append(x)
        for j, i in enumerate(decoder):
            if j < self.skip_weights.size(0) and skips:
                s = self.skip_weights[j].to(x.dtype) * skips.pop()
                if self.skip_gates is not None:
                    x = s + torch.sigmoid(self.skip_gates[j].to(x.dtype)) * (x - s)
                else:
                    x = x + s
            last = j == len(decoder) - 1
            x = self.blocks[i](x, x0, positions if last else None)
        if not decoder and positions is not None:
            x = gather_positions(x, positions)
        return rms_norm(x)

    def cache_rotary(self, seq_len: int, device: torch.device | str) -> None:
        """Make every layer's rotary tables for ``seq_len`` on ``device`` now, outside compiled code, so that
        compiled graphs find them and never compile again for their sake."""
        for block in self.blocks:
            block.attn.rotary.cos_sin(seq_len, torch.device(device), torch.float32)

    def logits_from_hidden(self, h: Tensor) -> Tensor:
        """Tied (or head) projection, then the soft cap ``c * tanh(logits / c)``."""
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight.to(h.dtype))
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap)

    def forward(self, ids: Tensor) -> Tensor:
        """Token ids (batch, seq) -> soft-capped logits (batch, seq, vocab)."""
        return self.logits_from_hidden(self.forward_hidden(ids))

    def loss(self, ids: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over all positions, taken on float32 logits."""
        logits = self(ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def apply_precision(model: GPT, precision: str) -> GPT:
    """Put parameters in the dtypes of a precision policy (spec section 4).

    ``bf16``: cast to bfloat16, then every parameter but the token embedding back to float32
    (linear weights and control tensors); forward passes then run under bfloat16 autocast.
    ``fp32``: every parameter float32, no autocast.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    model.float()
    if precision == "bf16":
        model.tok_emb.weight.data = model.tok_emb.weight.data.to(torch.bfloat16)
    return model


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The forward-pass context of a precision policy: bf16 autocast, or nothing for fp32."""
    device_type = torch.device(device).type
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def init_weights(model: GPT, seed: int = 0, tied_embed_init_std: float = 0.005) -> GPT:
    """Fresh weights as the record initialises them: orthogonal matrices, zero output projections."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.normal_(model.tok_emb.weight, std=tied_embed_init_std, generator=gen)
        for name, module in model.named_modules():
            if isinstance(module, CastedLinear):
                if name.endswith(".proj") or name == "lm_head":
                    nn.init.zeros_(module.weight)
                elif min(module.weight.shape) >= 64:
                    nn.init.orthogonal_(module.weight, generator=gen)
                else:
                    nn.init.normal_(module.weight, std=module.weight.size(1) ** -0.5, generator=gen)
    return model
