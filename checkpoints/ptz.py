"""Importing the challenge's quantized artifacts (``final_model.int6.ptz``, spec section 6), losslessly.

A file is ``compressor(byte_shuffle(torch.save({"w": W, "m": M})))``: brotli or xz/lzma (an
uncompressed torch.save is accepted too), an optional ``BSHF`` + stride-byte shuffle, then a pickle
that is only ever opened with ``torch.load(weights_only=True)``. ``M[name]`` is ``"gptq (int6)"``,
``"gptq (int8)"`` or ``"passthrough (float16)"``; quantized entries are ``W[name + ".q"]`` (int8)
and ``W[name + ".scale"]`` (float16, one per row), passthrough entries ``W[name]``. That is the only
supported layout; older records' payloads (keys ``quantized``/``scales``/``passthrough``) and plain
state dicts are refused with a message naming what was found. Artifacts carry no hyperparameters,
so the architecture comes from a preset plus overrides and must match the tensors exactly.
"""

from __future__ import annotations

import io
import lzma
import os
import pickle
import re
from pathlib import Path
from typing import Any

import brotli
import torch

from .config import ModelConfig
from .format import CheckpointError, byte_unshuffle, check_tensors, expected_shapes, read_file_bytes
from .quant import QuantizedTensor

SHUFFLE_MAGIC = b"BSHF"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's own (uncompressed) container
META_SCHEMES: dict[str, str] = {
    "gptq (int6)": "int6",
    "gptq (int8)": "int8",
    "passthrough (float16)": "float16",
}
_OLD_LAYOUT_KEYS = {"quantized", "scales", "passthrough"}
_WRONG_ARCH_HINT = (
    " (wrong preset or overrides? an artifact carries no hyperparameters: use those its training log printed)"
)


def read_ptz(path: str | os.PathLike, config: ModelConfig) -> dict[str, QuantizedTensor]:
    """The artifact's tensors (the same integers and scales), validated against ``config``."""
    path = Path(path)
    tensors, _ = parse_ptz(path, read_file_bytes(path), config)
    return tensors


def parse_ptz(path: Path, data: bytes, config: ModelConfig) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    """Tensors plus how the file was packed: ``{"compression": ..., "shuffle_stride": int | None}``."""

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: {problem}")

    raw, compression = _decompress(data, fail)
    stride = None
    if raw.startswith(SHUFFLE_MAGIC):
        if len(raw) < len(SHUFFLE_MAGIC) + 1 or raw[len(SHUFFLE_MAGIC)] == 0:
            raise fail("byte-shuffle header BSHF without a valid stride byte")
        stride = raw[len(SHUFFLE_MAGIC)]
        raw = byte_unshuffle(raw[len(SHUFFLE_MAGIC) + 1 :], stride)
    obj = _load_weights_only(raw, fail)
    tensors = _tensors_from_layout(obj, fail)
    check_tensors(tensors, config, str(path), hint=_WRONG_ARCH_HINT)
    ordered = {name: tensors[name] for name in expected_shapes(config)}
    return ordered, {"compression": compression, "shuffle_stride": stride}


def _decompress(data: bytes, fail) -> tuple[bytes, str]:
    if data.startswith(_XZ_MAGIC):
        try:
            return lzma.decompress(data), "xz"
        except lzma.LZMAError as exc:
            raise fail(f"xz data is corrupt ({exc})") from None
    if data.startswith(SHUFFLE_MAGIC) or data.startswith(_ZIP_MAGIC):
        return data, "none"
    # brotli has no magic bytes; legacy .lzma has only a weak one: try both.
    try:
        return brotli.decompress(data), "brotli"
    except brotli.error:
        pass
    try:
        return lzma.decompress(data, format=lzma.FORMAT_ALONE), "lzma"
    except lzma.LZMAError:
        pass
    raise fail(
        f"not a pgttt model.bin (no PGTTTBIN magic) and not a challenge artifact: the data is not brotli, "
        f"xz or lzma compressed (first bytes {data[:8].hex()})"
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
        raise fail(f"decompressed data is not a torch.save archive ({type(exc).__name__}: {exc})") from None


def _describe_keys(obj: dict, limit: int = 5) -> str:
    keys = sorted(map(str, obj))
    return str(keys) if len(keys) <= limit else f"{keys[:limit]} and {len(keys) - limit} more"


def _tensors_from_layout(obj: Any, fail) -> dict[str, QuantizedTensor]:
    supported = "supported: {'w': tensors, 'm': quantization meta}, as the 2026-04-09 record saves it"
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
    w, m = obj["w"], obj["m"]
    if not isinstance(w, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in w.items()):
        raise fail("unsupported payload layout: 'w' must map names to tensors")
    if not isinstance(m, dict) or not all(isinstance(k, str) for k in m):
        raise fail("unsupported payload layout: 'm' must map names to quantization strings")
    unknown = sorted({repr(v) for v in m.values() if v not in META_SCHEMES})
    if unknown:
        example = next(k for k, v in m.items() if v not in META_SCHEMES)
        raise fail(
            f"unknown quantization meta {', '.join(unknown)} (e.g. for {example}); "
            f"supported: {', '.join(map(repr, META_SCHEMES))}"
        )
    tensors: dict[str, QuantizedTensor] = {}
    used: set[str] = set()
    for name, meta in m.items():
        scheme = META_SCHEMES[meta]
        keys = [name] if scheme == "float16" else [f"{name}.q", f"{name}.scale"]
        absent = [k for k in keys if k not in w]
        if absent:
            raise fail(f"m describes {name} as {meta!r} but w has no {', '.join(absent)}")
        used.update(keys)
        if scheme == "float16":
            tensors[name] = QuantizedTensor("float16", w[name].contiguous())
        else:
            tensors[name] = QuantizedTensor(scheme, w[f"{name}.q"].contiguous(), w[f"{name}.scale"].contiguous())
    stray = [k for k in w if k not in used]
    if stray:
        raise fail(f"w holds tensors that m does not describe: {', '.join(stray[:6])}")
    return tensors
