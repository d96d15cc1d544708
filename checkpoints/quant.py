"""Quantized tensors as the challenge stores them, and the one place each reconstruction formula is written.

Kinds (spec section 4.1): per-row ``int6`` / ``int7`` / ``int8`` GPTQ rows and the attention gate's
``gate_int8_row`` (int8 ``q``, one float16 scale per row: ``W = q * scale[row]``), ``float16``
passthrough, and an optional LQER low-rank correction of a GPTQ'd matrix, added to ``q * scale``:

- asymmetric (``+lqer_asym``): ``A`` int8 in {-2..1} (rows, r) with one float16 scale (0-dim), ``B``
  int8 in [-8, 7] (r, cols) with one float16 scale per group of consecutive elements of ``B``
  flattened row-major; ``W += (A * sA) @ (B * sB[group])``.
- symmetric (``+lqer``): ``A`` (rows, r) and ``B`` (r, cols) int8, one float16 scale per row of each;
  ``W += (A * sA[row]) @ (B * sB[row])``.

Everything is computed in float32 on the CPU, in the record's order of operations, so the weights are
the record's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Scheme = Literal["int6", "int7", "int8", "gate_int8_row", "float16"]
SCHEMES: tuple[str, ...] = ("int6", "int7", "int8", "gate_int8_row", "float16")
QMAX: dict[str, int] = {"int6": 31, "int7": 63, "int8": 127, "gate_int8_row": 127}
# Schemes that may carry an LQER correction (the GPTQ'd matrices).
GPTQ_SCHEMES: tuple[str, ...] = ("int6", "int7", "int8")
LqerKind = Literal["asym", "sym"]
# Value ranges of the asymmetric factors (A: signed 2-bit, B: signed 4-bit); the symmetric factors'
# range depends on LQER_FACTOR_BITS, which the file does not record, so only int8 is checked.
LQER_ASYM_A_RANGE = (-2, 1)
LQER_ASYM_B_RANGE = (-8, 7)

# The challenge quantizes matrices with more than this many elements; the rest pass through as float16.
PASSTHROUGH_MAX_NUMEL = 65_536


@dataclass(frozen=True)
class Lqer:
    """A low-rank correction ``(a * a_scale) @ (b * b_scale)`` of a (rows, cols) matrix, rank ``a.shape[1]``."""

    kind: LqerKind
    a: Tensor
    a_scale: Tensor
    b: Tensor
    b_scale: Tensor

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    @property
    def group(self) -> int | None:
        """Asymmetric: elements of ``b`` per scale (64 in the records); symmetric: None."""
        return self.b.numel() // self.b_scale.numel() if self.kind == "asym" and self.b_scale.numel() else None

    def tensors(self) -> dict[str, Tensor]:
        return {"a": self.a, "a_scale": self.a_scale, "b": self.b, "b_scale": self.b_scale}

    def term(self) -> Tensor:
        if self.kind == "asym":
            a = self.a.float() * self.a_scale.float()
            g = self.group
            assert g is not None  # asymmetric with group scales: check() refuses one without
            b = (self.b.reshape(-1, g).float() * self.b_scale.float().view(-1, 1)).reshape(self.b.shape)
        else:
            a = self.a.float() * self.a_scale.float().view(-1, 1)
            b = self.b.float() * self.b_scale.float().view(-1, 1)
        return a @ b

    def expected_shapes(self, rows: int, cols: int) -> dict[str, tuple[int, ...]]:
        """The factor shapes a (rows, cols) matrix needs at this rank (and group)."""
        r = self.rank
        if self.kind == "asym":
            return {"a": (rows, r), "a_scale": (), "b": (r, cols), "b_scale": (self.b_scale.numel(),)}
        return {"a": (rows, r), "a_scale": (rows,), "b": (r, cols), "b_scale": (r,)}

    def check(self, name: str, rows: int, cols: int) -> None:
        if self.kind not in ("asym", "sym"):
            raise ValueError(f"{name}: unknown LQER kind {self.kind!r}")
        if self.a.ndim != 2 or self.a.shape[1] < 1:
            raise ValueError(f"{name}: LQER A has shape {tuple(self.a.shape)}, expected ({rows}, rank)")
        want = self.expected_shapes(rows, cols)
        for part, t in self.tensors().items():
            if tuple(t.shape) != want[part]:
                raise ValueError(f"{name}: LQER {part} has shape {tuple(t.shape)}, expected {want[part]}")
            dtype = torch.float16 if part.endswith("scale") else torch.int8
            if t.dtype != dtype:
                raise ValueError(f"{name}: LQER {part} must be {dtype}, found {t.dtype}")
        if self.kind == "asym":
            if self.b_scale.numel() == 0 or self.b.numel() % self.b_scale.numel():
                raise ValueError(
                    f"{name}: LQER B has {self.b.numel()} elements, not a whole number of groups "
                    f"for {self.b_scale.numel()} group scales"
                )
            _check_range(name, "LQER A", self.a, *LQER_ASYM_A_RANGE)
            _check_range(name, "LQER B", self.b, *LQER_ASYM_B_RANGE)


def _check_range(name: str, what: str, q: Tensor, low: int, high: int) -> None:
    # min/max, not abs: int8 abs(-128) overflows to -128 and would pass.
    if q.numel() and (int(q.min()) < low or int(q.max()) > high):
        bounds = f"+-{high}" if low == -high else f"[{low}, {high}]"
        raise ValueError(f"{name}: {what} values exceed {bounds}")


@dataclass(frozen=True)
class QuantizedTensor:
    """``scheme`` int6/int7/int8/gate_int8_row: ``q`` int8 (rows, ...), ``scale`` float16 (rows,), and for
    GPTQ'd matrices an optional ``lqer``. float16: ``q`` is the tensor."""

    scheme: Scheme
    q: Tensor
    scale: Tensor | None = None
    lqer: Lqer | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    def dequantize(self) -> Tensor:
        """The float32 weight: ``q * scale[row]`` (+ the LQER term), exactly as the record computes it."""
        if self.scheme == "float16":
            return self.q.float()
        assert self.scale is not None
        w = self.q.float() * self.scale.float().view(self.q.shape[0], *([1] * (self.q.ndim - 1)))
        if self.lqer is not None:
            w = w + self.lqer.term()
        return w

    def check(self, name: str) -> None:
        """Raise ValueError naming ``name`` when dtypes, shapes or value ranges are inconsistent."""
        if self.scheme not in SCHEMES:
            raise ValueError(f"{name}: unknown quantization scheme {self.scheme!r}")
        if self.scheme == "float16":
            if self.q.dtype != torch.float16:
                raise ValueError(f"{name}: float16 passthrough holds {self.q.dtype}")
            if self.scale is not None or self.lqer is not None:
                raise ValueError(f"{name}: float16 passthrough has no scales or LQER factors")
            return
        if self.q.dtype != torch.int8:
            raise ValueError(f"{name}: {self.scheme} values must be int8, found {self.q.dtype}")
        if self.scale is None or self.scale.dtype != torch.float16:
            raise ValueError(f"{name}: {self.scheme} needs float16 per-row scales")
        if self.q.ndim < 1 or self.scale.shape != (self.q.shape[0],):
            raise ValueError(f"{name}: scale shape {tuple(self.scale.shape)} does not match {self.q.shape[0]} rows")
        qmax = QMAX[self.scheme]
        _check_range(name, self.scheme, self.q, -qmax, qmax)
        if self.lqer is not None:
            if self.scheme not in GPTQ_SCHEMES or self.q.ndim != 2:
                raise ValueError(f"{name}: an LQER correction needs a GPTQ'd matrix, not {self.scheme} {self.shape}")
            self.lqer.check(name, *self.q.shape)


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
