"""The Parameter Golf GPT, written out plainly, and its two precision policies.

One module for both model families: the 2026-04-09 record's (spec section 5) and the frontier records'
(spec section 3: SmearGate, attention output gates, a two-lane parallel decoder, RoPE without
scaling). Block order, norms and scales follow the records so that a state dict saved by the challenge
loads here unchanged and gives the same numbers. The shared pieces live in ``layers.py``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgttt.api.settings import PRECISIONS

from .config import ModelConfig
from .layers import (
    MLP,
    Adapters,
    CastedLinear,
    CausalSelfAttention,
    Hook,
    check_cu_seqlens,
    gather_positions,
    rms_norm,
    smear,
)

__all__ = ["GPT", "Block", "Adapters", "CastedLinear", "PRECISIONS", "apply_precision", "autocast", "init_weights"]

Precision = Literal["bf16", "fp32"]


class Block(nn.Module):
    """One layer. ``forward``: the sequential block (or, 04-09 family, the single-stream parallel one);
    ``lanes``: its two outputs in the frontier's two-lane decoder, which ``GPT`` mixes (spec 3.5)."""

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        d = config.model_dim
        self.attn = CausalSelfAttention(config, use_xsa=index in config.xsa_layers())
        self.mlp = MLP(config)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        self.norm_scale = 1.0 / math.sqrt(index + 1) if config.ln_scale else 1.0
        start = config.parallel_residual_start
        self.parallel = start is not None and index >= start

    def forward(
        self,
        x: Tensor,
        x0: Tensor,
        positions: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        hook: Hook | None = None,
    ) -> Tensor:
        """The block at every position, or (keys and values still from every position) only at ``positions``."""
        mix = self.resid_mix.to(x.dtype)
        x_in = mix[0] * x + mix[1] * x0
        a = self.attn(rms_norm(x_in) * self.norm_scale, positions, cu_seqlens, hook)
        if positions is not None:
            x_in = gather_positions(x_in, positions)
        attn_scale, mlp_scale = self.attn_scale.to(x.dtype), self.mlp_scale.to(x.dtype)
        if self.parallel:
            return x_in + attn_scale * a + mlp_scale * self.mlp(rms_norm(x_in) * self.norm_scale, hook)
        h = x_in + attn_scale * a
        return h + mlp_scale * self.mlp(rms_norm(h) * self.norm_scale, hook)

    def lanes(
        self,
        lane0: Tensor,
        lane1: Tensor,
        x0: Tensor,
        positions: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        hook: Hook | None = None,
    ) -> tuple[Tensor, Tensor]:
        """A = attn_scale * Attn(norm(m0 lane0 + m1 x0) f) and M = mlp_scale * MLP(norm(lane1) f), both from
        the old lanes (at ``positions`` only, when given)."""
        mix = self.resid_mix.to(lane0.dtype)
        a = self.attn(rms_norm(mix[0] * lane0 + mix[1] * x0) * self.norm_scale, positions, cu_seqlens, hook)
        if positions is not None:
            lane1 = gather_positions(lane1, positions)
        m = self.mlp(rms_norm(lane1) * self.norm_scale, hook)
        return self.attn_scale.to(a.dtype) * a, self.mlp_scale.to(m.dtype) * m


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, layers = config.model_dim, config.num_layers
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        if config.smear_gate_enabled:
            self.smear_gate = CastedLinear(config.gate_window, 1)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        # A ModuleList of Blocks, typed as such: torch's ModuleList types its items as Module.
        self.blocks = cast(Sequence[Block], nn.ModuleList(Block(config, i) for i in range(layers)))
        self.encoder_indices, self.decoder_indices = config.encoder_decoder()
        n_skip = config.num_skip_weights
        self.skip_weights = nn.Parameter(torch.ones(n_skip, d))
        self.skip_gates = nn.Parameter(torch.zeros(n_skip, d)) if config.skip_gates_enabled else None
        # The frontier scripts always hold the lane scalars, whether or not any layer runs two lanes.
        self.lane_start = None
        if config.frontier:
            self.parallel_post_lambdas = nn.Parameter(torch.ones(layers, 2, 2))
            self.parallel_resid_lambdas = nn.Parameter(torch.full((layers, 2), 1.1))
            start = config.parallel_start_layer
            self.lane_start = start if start is not None and start > 0 else None
        self.lm_head = None if config.tie_embeddings else CastedLinear(d, config.vocab_size)
        # Depth recurrence is always on for evaluation; training switches it on part-way.
        self.looping = True

    def schedule(self) -> tuple[list[int], list[int]]:
        if self.looping:
            return self.encoder_indices, self.decoder_indices
        half = self.config.num_layers // 2
        return list(range(half)), list(range(half, self.config.num_layers))

    def embed(self, ids: Tensor) -> Tensor:
        """x0 = RMSNorm(token embeddings, smeared by SmearGate when it is on)."""
        e = self.tok_emb(ids)
        if self.config.smear_gate_enabled:
            e = smear(e, ids, self.smear_gate, self.smear_lambda, self.config.smear_gate_bos_mask)
        return rms_norm(e)

    def forward_hidden(
        self,
        ids: Tensor,
        positions: Tensor | None = None,
        *,
        cu_seqlens: Tensor | None = None,
        adapters: Adapters | None = None,
    ) -> Tensor:
        """Token ids (batch, seq) -> final-normed hidden states (batch, seq, model_dim).

        ``positions`` (batch, k): the hidden states at those positions only, (batch, k, model_dim); the
        same numbers, cheaper (the last block application computes queries, attention, MLP and output
        only there). ``cu_seqlens``: segment boundaries [0, ..., seq] of every row (padding repeats of
        seq allowed); attention is causal within each segment, RoPE positions stay the row's (spec 3.10).
        ``adapters``: per-slot additive adapters (see ``layers.Adapters``).
        """
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, ids.size(1))
        x = self.embed(ids)
        x0 = x
        encoder, decoder = self.schedule()
        hooks = [
            None if adapters is None else functools.partial(adapters.delta, slot)
            for slot in range(len(encoder) + len(decoder))
        ]
        skips: list[Tensor] = []
        for slot, i in enumerate(encoder):
            x = self.blocks[i](x, x0, None, cu_seqlens, hooks[slot])
            skips.append(x)
        lanes: tuple[Tensor, Tensor] | None = None
        at_positions = False  # whether x (or the lanes) already hold only the rows at ``positions``
        for j, i in enumerate(decoder):
            hook = hooks[len(encoder) + j]
            last = j == len(decoder) - 1
            skip = None
            if j < self.skip_weights.size(0) and skips:
                skip = self.skip_weights[j].to(x.dtype) * skips.pop()
            if self.lane_start is not None and i >= self.lane_start:
                lane0, lane1 = lanes if lanes is not None else (x, x)  # both lanes start as x
                if skip is not None:
                    lane0 = self.add_skip(j, lane0, skip)
                pos = positions if last else None
                lanes = self.mix_lanes(
                    i, lane0, lane1, *self.blocks[i].lanes(lane0, lane1, x0, pos, cu_seqlens, hook), positions=pos
                )
            else:
                if skip is not None:
                    x = self.add_skip(j, x, skip)
                # After the lanes start, a sequential layer (only odd schedules have one) feeds nothing: as
                # in the scripts, the output is the lanes'.
                pos = positions if last and lanes is None else None
                x = self.blocks[i](x, x0, pos, cu_seqlens, hook)
            at_positions = pos is not None
        if lanes is not None:
            x = self.final_lane(*lanes)
        if positions is not None and not at_positions:
            x = gather_positions(x, positions)
        return rms_norm(x)

    def add_skip(self, j: int, x: Tensor, s: Tensor) -> Tensor:
        """U-net skip (spec 3.6): s = skip_weights[j] * E_j, then s + sigmoid(skip_gates[j]) (x - s) or x + s."""
        if self.skip_gates is None:
            return x + s
        return s + torch.sigmoid(self.skip_gates[j].to(x.dtype)) * (x - s)

    def mix_lanes(
        self, i: int, lane0: Tensor, lane1: Tensor, a: Tensor, m: Tensor, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """lane_k <- rho_{i,k} lane_k + pi_{i,0,k} A + pi_{i,1,k} M (spec 3.5)."""
        if positions is not None:
            lane0, lane1 = gather_positions(lane0, positions), gather_positions(lane1, positions)
        rho = self.parallel_resid_lambdas[i].to(lane0.dtype)
        post = self.parallel_post_lambdas[i].to(lane0.dtype)  # post[0]: attention -> lanes, post[1]: MLP
        return (rho[0] * lane0 + post[0, 0] * a + post[1, 0] * m, rho[1] * lane1 + post[0, 1] * a + post[1, 1] * m)

    def final_lane(self, lane0: Tensor, lane1: Tensor) -> Tensor:
        lane = self.config.parallel_final_lane
        if lane == "attn":
            return lane0
        if lane == "mlp":
            return lane1
        return 0.5 * (lane0 + lane1)

    def cache_rotary(self, seq_len: int, device: torch.device | str) -> None:
        """Make every layer's rotary tables for ``seq_len`` on ``device`` now, outside compiled code, so that
        compiled graphs find them and never compile again for their sake."""
        for block in self.blocks:
            block.attn.rotary.cos_sin(seq_len, torch.device(device), torch.float32)

    def logits_from_hidden(self, h: Tensor, adapters: Adapters | None = None) -> Tensor:
        """Tied (or head) projection, plus the head adapter, then the soft cap ``c * tanh(logits / c)``."""
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight.to(h.dtype))
        if adapters is not None:
            delta = adapters.head(h)
            logits = logits if delta is None else logits + delta
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap)

    def forward(self, ids: Tensor, *, cu_seqlens: Tensor | None = None, adapters: Adapters | None = None) -> Tensor:
        """Token ids (batch, seq) -> soft-capped logits (batch, seq, vocab)."""
        return self.logits_from_hidden(self.forward_hidden(ids, cu_seqlens=cu_seqlens, adapters=adapters), adapters)

    def loss(self, ids: Tensor, targets: Tensor, *, cu_seqlens: Tensor | None = None) -> Tensor:
        """Mean cross-entropy over all positions, taken on float32 logits."""
        logits = self(ids, cu_seqlens=cu_seqlens)
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
                # Output projections and the gates start at zero: the gates transparent (2 sigmoid(0) = 1,
                # smear_lambda = 0), as the records initialise them.
                if name.endswith((".proj", "attn_gate_proj")) or name in ("lm_head", "smear_gate"):
                    nn.init.zeros_(module.weight)
                elif min(module.weight.shape) >= 64:
                    nn.init.orthogonal_(module.weight, generator=gen)
                else:
                    nn.init.normal_(module.weight, std=module.weight.size(1) ** -0.5, generator=gen)
            elif isinstance(module, CausalSelfAttention) and module.gate == "dense":
                nn.init.normal_(module.attn_gate_w, std=0.01, generator=gen)  # GATED_ATTN_INIT_STD
    return model
