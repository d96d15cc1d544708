"""A fused GPU kernel for scoring: the MLP's first matmul with its squared leaky ReLU in the epilogue.

Scoring runs the MLP on every window position (about 65K rows a batch). Unfused, the activation is a pass
of its own that reads and writes the whole ``rows x mlp_hidden`` bfloat16 tensor: on an H100 about as long
as half the matmul. This Triton kernel computes ``leaky_relu(x @ w.T, 0.5) ** 2`` with the plain path's
roundings (the product rounded to bfloat16, the activation on that value, the result rounded to bfloat16),
so only the matmul's summation order differs. Forward only: training keeps the plain path and autograd.

``fc_leaky_relu_sq`` is a ``torch.library`` op, so ``torch.compile`` calls the kernel inside its graphs.
``available(x)`` says when the model may use it: Triton importable, a CUDA bfloat16 input, no gradients,
and ``PGTTT_FUSED_MLP`` not ``0``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain path is used
    triton = None

# Tests run the kernel on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# PGTTT_FUSED_MLP=0 keeps the plain path everywhere (set before the first compile; numbers barely differ).
ENABLED = os.environ.get("PGTTT_FUSED_MLP", "1") != "0"


def available(x: Tensor) -> bool:
    """Whether the fused kernel may compute the MLP's first layer for activations ``x``: bfloat16 (or
    bfloat16 autocast), on a GPU (or the interpreter), with gradients off."""
    device = x.device.type
    bf16 = x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
    )
    return ENABLED and triton is not None and (x.is_cuda or INTERPRETED) and bf16 and not torch.is_grad_enabled()


if triton is not None:

    @triton.jit
    def _round_to_bf16(v):
        """float32 -> the nearest bfloat16 value (ties to even), still float32. Spelled out because Triton's
        interpreter truncates in ``.to(tl.bfloat16)``; on the GPU this is what the conversion does."""
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _fc_leaky_relu_sq_kernel(
        x_ptr, w_ptr, out_ptr, M, N, K,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
        slope,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        # Tiles in groups of GROUP_M rows of tiles, so neighbouring programs share x and w tiles in L2.
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        x_tile = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
        w_tile = w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn  # a (K, N) tile of w.T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a = tl.load(x_tile, mask=(rows[:, None] < M) & (ks[None, :] < k_left), other=0.0)
            b = tl.load(w_tile, mask=(ks[:, None] < k_left) & (cols[None, :] < N), other=0.0)
            if UPCAST:  # the interpreter multiplies bfloat16 tiles wrongly; float32 gives the same sums
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
            x_tile += BLOCK_K * stride_xk
            w_tile += BLOCK_K * stride_wk

        # The plain path's roundings: the product to bfloat16, then leaky ReLU and square, then bfloat16.
        h = _round_to_bf16(acc)
        h = tl.where(h >= 0, h, h * slope)
        out = _round_to_bf16(h * h).to(tl.bfloat16)
        out_tile = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_tile, out, mask=(rows[:, None] < M) & (cols[None, :] < N))


def _launch(x: Tensor, w: Tensor, slope: float) -> Tensor:
    m, k = x.shape
    n = w.size(0)
    out = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    # 128x256 tiles, 64-deep, 3 stages (144 KiB of shared memory) keep an H100's tensor cores fed at
    # these sizes; a small batch (the trimmed last block) takes 64-row tiles so more SMs get work.
    block_m = 128 if m >= 8192 else 64
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, 256),)
    kernel = torch.library.wrap_triton(_fc_leaky_relu_sq_kernel)
    kernel[grid](
        x, w, out, m, n, k,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        slope,
        BLOCK_M=block_m, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, UPCAST=INTERPRETED,
        num_warps=8, num_stages=3,
    )
    return out


if triton is not None:

    @torch.library.triton_op("pgttt::fc_leaky_relu_sq", mutates_args=())
    def _fc_leaky_relu_sq_op(x: Tensor, w: Tensor, slope: float) -> Tensor:
        return _launch(x, w, slope)


def fc_leaky_relu_sq(x: Tensor, w: Tensor, slope: float = 0.5) -> Tensor:
    """``leaky_relu(x @ w.T, slope) ** 2`` in bfloat16 for ``x`` (..., in) and ``w`` (out, in), both bfloat16."""
    if triton is None:
        raise RuntimeError("fc_leaky_relu_sq needs Triton; check kernels.available(x) first")
    lead = x.shape[:-1]
    out = torch.ops.pgttt.fc_leaky_relu_sq(x.reshape(-1, x.size(-1)).contiguous(), w.contiguous(), slope)
    return out.reshape(*lead, w.size(0))
