"""model.bin's tensor table: header entries that place each tensor's sections in the raw payload.

Version 1 entries: ``{"name", "scheme", "shape", "q", "scale"}`` with schemes int6/int8/float16.
Version 2 adds the schemes int7 and gate_int8_row and the key ``lqer``: null, or ``{"kind": "asym" |
"sym", "rank", "group" (asym: elements of B per scale; sym: null), "a", "a_scale", "b", "b_scale"}``,
each a byte span. Spans are ``[offset, length]`` into the raw payload and lie back to back from 0.
The table is checked (and its total size known) before the payload is decompressed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .quant import SCHEMES, Lqer, LqerKind, QuantizedTensor, Scheme

_V1_SCHEMES = ("int6", "int8", "float16")
_KEYS = {1: {"name", "scheme", "shape", "q", "scale"}, 2: {"name", "scheme", "shape", "q", "scale", "lqer"}}
_LQER_KEYS = {"kind", "rank", "group", "a", "a_scale", "b", "b_scale"}
_INT8 = np.dtype("<i1")
_F16 = np.dtype("<f2")
# Largest LQER rank accepted: the records use 4; a hostile rank must not size an allocation.
MAX_LQER_RANK = 256


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Section:
    span: tuple[int, int]
    dtype: np.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Planned:
    name: str
    scheme: Scheme
    shape: tuple[int, ...]
    sections: dict[str, Section]  # q, scale, lqer_a, lqer_a_scale, lqer_b, lqer_b_scale
    lqer_kind: LqerKind | None


def plan_table(entries: Any, version: int, fail) -> tuple[list[Planned], int]:
    """The entries, validated (keys, schemes, shapes, spans back to back), and the raw bytes they cover."""
    if not isinstance(entries, list):
        raise fail("header tensors must be a list")
    planned: list[Planned] = []
    names: set[str] = set()
    cursor = 0

    def section(span: Any, dtype: np.dtype, shape: tuple[int, ...], what: str) -> Section:
        nonlocal cursor
        size = math.prod(shape) * dtype.itemsize
        if not (isinstance(span, list) and len(span) == 2 and all(_is_int(v) for v in span)):
            raise fail(f"{what}: byte span must be [offset, length], found {span!r}")
        if span != [cursor, size]:
            raise fail(
                f"{what}: byte span {span} does not fit shape {list(shape)} "
                f"(expected {[cursor, size]}: {math.prod(shape)} x {dtype.itemsize} bytes, back to back)"
            )
        cursor += size
        return Section((span[0], size), dtype, shape)

    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != _KEYS[version]:
            raise fail(f"header tensors[{i}] must have the keys {sorted(_KEYS[version])}, found {entry!r}")
        name, scheme, shape = entry["name"], entry["scheme"], entry["shape"]
        if not isinstance(name, str) or name in names:
            raise fail(f"header tensors[{i}]: name {name!r} is not a string or appears twice")
        names.add(name)
        known = SCHEMES if version >= 2 else _V1_SCHEMES
        if scheme not in known:
            raise fail(f"tensor {name}: unknown scheme {scheme!r} (known in version {version}: {', '.join(known)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise fail(f"tensor {name}: shape must be a list of non-negative integers, found {shape!r}")
        shape = tuple(shape)
        sections = {"q": section(entry["q"], _F16 if scheme == "float16" else _INT8, shape, f"tensor {name} values")}
        if scheme == "float16":
            if entry["scale"] is not None:
                raise fail(f"tensor {name}: float16 passthrough must have scale null")
        else:
            if not shape:
                raise fail(f"tensor {name}: {scheme} needs at least one dimension (rows)")
            sections["scale"] = section(entry["scale"], _F16, (shape[0],), f"tensor {name} scales (one per row)")
        kind = None
        lqer = entry.get("lqer")
        if lqer is not None:
            kind = _plan_lqer(name, scheme, shape, lqer, sections, section, fail)
        planned.append(Planned(name, scheme, shape, sections, kind))
    return planned, cursor


def _plan_lqer(name, scheme, shape, lqer, sections, section, fail) -> LqerKind:
    if scheme not in ("int6", "int7", "int8") or len(shape) != 2:
        raise fail(f"tensor {name}: an LQER correction needs a GPTQ'd matrix, not {scheme} {list(shape)}")
    if not isinstance(lqer, dict) or set(lqer) != _LQER_KEYS or lqer["kind"] not in ("asym", "sym"):
        raise fail(f"tensor {name}: lqer must be null or {sorted(_LQER_KEYS)} with kind asym/sym, found {lqer!r}")
    rows, cols = shape
    rank, group = lqer["rank"], lqer["group"]
    if not _is_int(rank) or not 1 <= rank <= MAX_LQER_RANK:
        raise fail(f"tensor {name}: LQER rank must be within 1..{MAX_LQER_RANK}, found {rank!r}")
    if lqer["kind"] == "asym":
        if not _is_int(group) or group < 1 or (rank * cols) % group:
            raise fail(f"tensor {name}: LQER group {group!r} must divide the {rank * cols} elements of B")
        scales: tuple[tuple[int, ...], tuple[int, ...]] = ((), ((rank * cols) // group,))
    else:
        if group is not None:
            raise fail(f"tensor {name}: a symmetric LQER has group null")
        scales = ((rows,), (rank,))
    sections["lqer_a"] = section(lqer["a"], _INT8, (rows, rank), f"tensor {name} LQER A")
    sections["lqer_a_scale"] = section(lqer["a_scale"], _F16, scales[0], f"tensor {name} LQER A scale")
    sections["lqer_b"] = section(lqer["b"], _INT8, (rank, cols), f"tensor {name} LQER B")
    sections["lqer_b_scale"] = section(lqer["b_scale"], _F16, scales[1], f"tensor {name} LQER B scales")
    return lqer["kind"]


def build_tensors(planned: list[Planned], raw: bytes) -> dict[str, QuantizedTensor]:
    """The tensors of a validated plan, copied out of the raw payload (exactly ``plan_table``'s size)."""

    def take(s: Section) -> torch.Tensor:
        count = math.prod(s.shape)
        array = np.frombuffer(raw, dtype=s.dtype, count=count, offset=s.span[0])
        return torch.from_numpy(array.astype(s.dtype.newbyteorder("="))).reshape(s.shape)

    out: dict[str, QuantizedTensor] = {}
    for p in planned:
        t = {key: take(s) for key, s in p.sections.items()}
        lqer = None
        if p.lqer_kind is not None:
            lqer = Lqer(p.lqer_kind, t["lqer_a"], t["lqer_a_scale"], t["lqer_b"], t["lqer_b_scale"])
        out[p.name] = QuantizedTensor(p.scheme, t["q"], t.get("scale"), lqer)
    return out


def table_for(tensors: dict[str, QuantizedTensor], order: list[str]) -> tuple[list[dict], bytes]:
    """Version-2 entries for ``tensors`` in ``order`` and the raw payload they describe."""
    entries, sections, offset = [], [], 0

    def section(t: torch.Tensor, dtype: np.dtype) -> list[int]:
        nonlocal offset
        data = t.detach().cpu().contiguous().numpy().astype(dtype, copy=False).tobytes()
        sections.append(data)
        offset += len(data)
        return [offset - len(data), len(data)]

    for name in order:
        qt = tensors[name]
        values = section(qt.q, _F16 if qt.scheme == "float16" else _INT8)
        scale = None if qt.scale is None else section(qt.scale, _F16)
        lqer = None
        if qt.lqer is not None:
            lq = qt.lqer
            lqer = {
                "kind": lq.kind,
                "rank": lq.rank,
                "group": lq.group,
                "a": section(lq.a, _INT8),
                "a_scale": section(lq.a_scale, _F16),
                "b": section(lq.b, _INT8),
                "b_scale": section(lq.b_scale, _F16),
            }
        entries.append(
            {"name": name, "scheme": qt.scheme, "shape": list(qt.shape), "q": values, "scale": scale, "lqer": lqer}
        )
    return entries, b"".join(sections)
