"""Quantized tensors as the challenge stores them: per-row int6/int8 with float16 scales, or float16.

One representation serves both file formats (the challenge's ``.ptz`` and our ``model.bin``), the
training job's quantizer and the evaluation engine's dequantizer, so there is one place where
``weight = q * scale[row]`` is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Scheme = Literal["int6", "int8", "float16"]
SCHEMES: tuple[str, ...] = ("int6", "int8", "float16")
QMAX: dict[str, int] = {"int6": 31, "int8": 127}

# The challenge quantizes matrices with more than this many elements; the rest pass through as float16.
PASSTHROUGH_MAX_NUMEL = 65_536


@dataclass(frozen=True)
class QuantizedTensor:
    """``scheme`` int6/int8: ``q`` int8 (rows, ...), ``scale`` float16 (rows,). float16: ``q`` is the tensor."""

    scheme: Scheme
    q: Tensor
    scale: Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    def dequantize(self) -> Tensor:
        """The float32 weight: ``q.float() * scale.float()[row]`` (exact), or the float16 upcast."""
        if self.scheme == "float16":
            return self.q.float()
        assert self.scale is not None
        return self.q.float() * self.scale.float().view(self.q.shape[0], *([1] * (self.q.ndim - 1)))

    def check(self, name: str) -> None:
        """Raise ValueError naming ``name`` when dtypes, shapes or value ranges are inconsistent."""
        if self.scheme not in SCHEMES:
            raise ValueError(f"{name}: unknown quantization scheme {self.scheme!r}")
        if self.scheme == "float16":
            if self.q.dtype != torch.float16:
                raise ValueError(f"{name}: float16 passthrough holds {self.q.dtype}")
            return
        if self.q.dtype != torch.int8:
            raise ValueError(f"{name}: {self.scheme} values must be int8, found {self.q.dtype}")
        if self.scale is None or self.scale.dtype != torch.float16:
            raise ValueError(f"{name}: {self.scheme} needs float16 per-row scales")
        if self.q.ndim < 1 or self.scale.shape != (self.q.shape[0],):
            raise ValueError(
                f"{name}: scale shape {tuple(self.scale.shape)} does not match {self.q.shape[0]} rows"
            )
        qmax = QMAX[self.scheme]
        # min/max, not abs: int8 abs(-128) overflows to -128 and would pass.
        if self.q.numel() and (int(self.q.min()) < -qmax or int(self.q.max()) > qmax):
            raise ValueError(f"{name}: {self.scheme} values exceed +-{qmax}")


def quantize_rows(weight: Tensor, scheme: Scheme, clip: Tensor | None = None) -> QuantizedTensor:
    """Round-to-nearest per-row quantization; ``clip`` (rows,) bounds |w| per row (default: row max)."""
    if scheme == "float16":
        return QuantizedTensor("float16", weight.detach().to(torch.float16).contiguous())
    w = weight.detach().float().reshape(weight.shape[0], -1)
    qmax = QMAX[scheme]
    limit = w.abs().amax(dim=1) if clip is None else clip.float()
    scale = (limit / qmax).clamp_min(1e-10).to(torch.float16)
    q = torch.clamp(torch.round(w / scale.float()[:, None]), -qmax, qmax).to(torch.int8)
    return QuantizedTensor(scheme, q.reshape(weight.shape).contiguous(), scale.contiguous())


def default_scheme(name: str, tensor: Tensor) -> Scheme:
    """The challenge's choice: large matrices int6 (the token embedding int8), the rest float16."""
    if tensor.ndim < 2 or tensor.numel() <= PASSTHROUGH_MAX_NUMEL:
        return "float16"
    return "int8" if name.startswith("tok_emb") else "int6"


def dequantize_state(tensors: dict[str, QuantizedTensor]) -> dict[str, Tensor]:
    return {name: qt.dequantize() for name, qt in tensors.items()}
