"""Importing the challenge's quantized artifacts (``final_model.int6.ptz``, spec sections 4 and 6), losslessly.

The container is sniffed, never guessed from the name: ``PGRP`` is the 2026-04-27 record's per-group
lrzip container (``pergroup.py``); xz's magic means xz; otherwise brotli, then legacy ``.lzma``, is
tried, and an uncompressed ``torch.save`` is accepted too. After decompression an optional ``BSHF`` +
stride-byte shuffle is undone. Payloads are only ever opened with ``torch.load(weights_only=True)``;
the layout is ``{"w": W, "m": M}`` (pergroup: rebuilt from its streams) with ``M[name]`` one of the
categories in ``CATEGORIES``, optionally suffixed ``+lqer_asym`` / ``+lqer``. Older records' payloads
(keys ``quantized``/``scales``/``passthrough``) and plain state dicts are refused with a message naming
what was found. Every size is bounded before it is allocated: decompression by ``raw_limit(config)``,
declared shapes by the architecture, tensor views by their storage.
"""

from __future__ import annotations

import io
import lzma
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .format import CheckpointError, byte_unshuffle, check_tensors, expected_shapes, read_file_bytes
from .inflate import InflateError, brotli_decompress, lzma_decompress
from .pergroup import MAGIC as PGRP_MAGIC
from .pergroup import decode_pergroup
from .quant import Lqer, LqerKind, QuantizedTensor, Scheme

SHUFFLE_MAGIC = b"BSHF"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's own (uncompressed) container
CATEGORIES: dict[str, Scheme] = {
    "gptq (int6)": "int6",
    "gptq (int7)": "int7",
    "gptq (int8)": "int8",
    "gate_int8_row": "gate_int8_row",
    "passthrough (float16)": "float16",
}
LQER_SUFFIXES: dict[str, LqerKind] = {"+lqer_asym": "asym", "+lqer": "sym"}
# The tensors each kind stores, as name suffixes (spec 4.1).
_VALUE_KEYS = {"float16": ("",), "gate_int8_row": (".gq", ".gs")}
_LQER_KEYS = {"asym": (".lqA_a", ".lqAs_a", ".lqB_a", ".lqBs_a"), "sym": (".lqA", ".lqAs", ".lqB", ".lqBs")}
_OLD_LAYOUT_KEYS = {"quantized", "scales", "passthrough"}
_WRONG_ARCH_HINT = (
    " (wrong preset, log or overrides? an artifact carries no hyperparameters: use those its training log printed)"
)


def category(qt: QuantizedTensor) -> str:
    """The record's category string of a tensor, e.g. ``"gptq (int7)+lqer_asym"``."""
    base = next(c for c, s in CATEGORIES.items() if s == qt.scheme)
    return base + ("" if qt.lqer is None else next(k for k, v in LQER_SUFFIXES.items() if v == qt.lqer.kind))


def raw_limit(config: ModelConfig) -> int:
    """The most bytes a valid payload for ``config`` can hold: at most 2 bytes per value, scales and
    LQER factors of at most as many again, plus torch.save's per-tensor overhead."""
    shapes = expected_shapes(config)
    params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    return 5 * params + 8192 * len(shapes) + (1 << 20)


def read_ptz(path: str | os.PathLike, config: ModelConfig) -> dict[str, QuantizedTensor]:
    """The artifact's tensors (the same integers and scales), validated against ``config``."""
    path = Path(path)
    tensors, _ = parse_ptz(path, read_file_bytes(path), config)
    return tensors


def parse_ptz(path: Path, data: bytes, config: ModelConfig) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    """Tensors plus how the file was packed: ``{"compression": ..., "shuffle_stride": int | None}``."""

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: {problem}")

    limit = raw_limit(config)
    if data.startswith(PGRP_MAGIC):
        w, m = decode_pergroup(
            data,
            fail,
            load_remainder=lambda raw: _load_weights_only(raw, fail),
            remainder_limit=limit,
            expected=expected_shapes(config),
            num_layers=config.num_layers,
        )
        compression, stride = "pergroup", None
    else:
        raw, compression = _decompress(data, limit, fail)
        stride = None
        if raw.startswith(SHUFFLE_MAGIC):
            if len(raw) < len(SHUFFLE_MAGIC) + 1 or raw[len(SHUFFLE_MAGIC)] == 0:
                raise fail("byte-shuffle header BSHF without a valid stride byte")
            stride = raw[len(SHUFFLE_MAGIC)]
            raw = byte_unshuffle(raw[len(SHUFFLE_MAGIC) + 1 :], stride)
        w, m = _layout(_load_weights_only(raw, fail), fail)
    tensors = tensors_from_layout(w, m, fail, config, str(path))
    ordered = {name: tensors[name] for name in expected_shapes(config)}
    return ordered, {"compression": compression, "shuffle_stride": stride}


def _decompress(data: bytes, limit: int, fail) -> tuple[bytes, str]:
    def bounded(what: str, fn, **kwargs) -> bytes:
        try:
            return fn(data, limit, **kwargs)
        except InflateError as exc:
            if exc.too_large:
                raise fail(
                    f"{what} data {exc}, more than any artifact of this architecture "
                    "(a decompression bomb, or the wrong architecture)"
                ) from None
            raise

    if data.startswith(_XZ_MAGIC):
        try:
            return bounded("xz", lzma_decompress), "xz"
        except InflateError as exc:
            raise fail(str(exc)) from None
    if data.startswith(SHUFFLE_MAGIC) or data.startswith(_ZIP_MAGIC):
        return data, "none"
    # brotli has no magic bytes; legacy .lzma has only a weak one: try both.
    try:
        return bounded("brotli", brotli_decompress), "brotli"
    except InflateError:
        pass
    try:
        return bounded("lzma", lzma_decompress, fmt=lzma.FORMAT_ALONE), "lzma"
    except InflateError:
        pass
    raise fail(
        f"not a pgttt model.bin (no PGTTTBIN magic) and not a challenge artifact: the data is not PGRP, brotli, "
        f"xz or lzma compressed (first bytes {data[:8].hex()}; a truncated or damaged file?)"
    )


def _load_weights_only(raw: bytes, fail) -> Any:
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Name what it wanted, but not torch's advice to allowlist it.
        found = re.search(r"GLOBAL (\S+)", str(exc))
        detail = f"it references {found.group(1)}" if found else str(exc).strip().splitlines()[0][:200]
        raise fail(
            f"refused to unpickle: the payload holds objects other than tensors, which could run code ({detail})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... on a foreign blob
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise fail(f"decompressed data is not a torch.save archive ({type(exc).__name__}: {first})") from None


def _describe_keys(obj: dict, limit: int = 5) -> str:
    keys = sorted(map(str, obj))
    return str(keys) if len(keys) <= limit else f"{keys[:limit]} and {len(keys) - limit} more"


def _layout(obj: Any, fail) -> tuple[Any, Any]:
    supported = "supported: {'w': tensors, 'm': quantization meta}, as the records save it"
    if not isinstance(obj, dict):
        raise fail(f"unsupported payload layout: a {type(obj).__name__}, not a dict; {supported}")
    if set(obj) != {"w", "m"}:
        keys = _describe_keys(obj)
        if _OLD_LAYOUT_KEYS & set(obj):
            kind = f"an older record's layout with top-level keys {keys}"
        elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            kind = f"a plain state dict of {len(obj)} tensors (keys {keys}), not a quantized artifact"
        else:
            kind = f"top-level keys {keys}"
        raise fail(f"unsupported payload layout: {kind}; {supported}")
    return obj["w"], obj["m"]


def parse_category(meta: Any) -> tuple[Scheme, LqerKind | None] | None:
    """``"gptq (int6)+lqer_asym"`` -> ``("int6", "asym")``; None for an unknown category."""
    if not isinstance(meta, str):
        return None
    for suffix, kind in LQER_SUFFIXES.items():
        if meta.endswith(suffix) and CATEGORIES.get(meta[: -len(suffix)]) in ("int6", "int7", "int8"):
            return CATEGORIES[meta[: -len(suffix)]], kind
    return (CATEGORIES[meta], None) if meta in CATEGORIES else None


def _check_view(key: str, t: torch.Tensor, fail) -> None:
    """A tensor must lie inside its own storage: a 2 KB file can hold a view that claims a terabyte."""
    need = t.numel() * t.element_size()
    have = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    if need > max(have, 0):
        raise fail(
            f"tensor {key} of shape {tuple(t.shape)} claims {need:,} bytes but its storage holds {have:,} "
            "(a view larger than its data)"
        )


def tensors_from_layout(w: Any, m: Any, fail, config: ModelConfig, where: str) -> dict[str, QuantizedTensor]:
    """The record's ``w``/``m`` as QuantizedTensors, checked against ``config`` before any copy is made."""
    if not isinstance(w, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in w.items()):
        raise fail("unsupported payload layout: 'w' must map names to tensors")
    if not isinstance(m, dict) or not all(isinstance(k, str) for k in m):
        raise fail("unsupported payload layout: 'm' must map names to quantization strings")
    unknown = sorted({repr(v) for v in m.values() if parse_category(v) is None})
    if unknown:
        example = next(k for k, v in m.items() if parse_category(v) is None)
        raise fail(
            f"unknown quantization meta {', '.join(unknown)} (e.g. for {example}); "
            f"supported: {', '.join(map(repr, CATEGORIES))}, GPTQ ones optionally with +lqer_asym or +lqer"
        )
    for key, t in w.items():
        _check_view(key, t, fail)
    tensors: dict[str, QuantizedTensor] = {}
    used: set[str] = set()
    for name, meta in m.items():
        parsed = parse_category(meta)
        assert parsed is not None  # unknown categories were refused above
        scheme, kind = parsed
        keys = [name + k for k in _VALUE_KEYS.get(scheme, (".q", ".scale"))]
        lqer_keys = [name + k for k in _LQER_KEYS[kind]] if kind else []
        absent = [k for k in keys + lqer_keys if k not in w]
        if absent:
            raise fail(f"m describes {name} as {meta!r} but w has no {', '.join(absent)}")
        used.update(keys + lqer_keys)
        lqer = Lqer(kind, *(w[k] for k in lqer_keys)) if kind else None
        values = [w[k] for k in keys]  # q, then its scales (float16 has none)
        tensors[name] = QuantizedTensor(scheme, values[0], values[1] if len(values) > 1 else None, lqer=lqer)
    stray = [k for k in w if k not in used]
    if stray:
        raise fail(f"w holds tensors that m does not describe: {', '.join(stray[:6])}")
    check_tensors(tensors, config, where, hint=_WRONG_ARCH_HINT)
    return {name: _contiguous(qt) for name, qt in tensors.items()}


def _contiguous(qt: QuantizedTensor) -> QuantizedTensor:
    lqer = qt.lqer and Lqer(qt.lqer.kind, *(t.contiguous() for t in qt.lqer.tensors().values()))
    scale = None if qt.scale is None else qt.scale.contiguous()
    return QuantizedTensor(qt.scheme, qt.q.contiguous(), scale, lqer)
