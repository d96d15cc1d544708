"""The 2026-04-27 record's per-group container (magic ``PGRP``, spec section 4.2), decoded to ``w`` and ``m``.

Layout: ``PGRP``, uint32 LE n (= 9), n uint32 LE stream lengths, the streams back to back. Streams
0-6 are lrzip files of the int8 ``.q`` tensors of one group each (the token embedding, then c_k,
c_q, c_v, attn.proj, mlp.fc, mlp.proj over layers 0..L-1), every tensor column-major and, for the
three similarity-sorted groups, with its rows permuted. Stream 7 is brotli of a ``torch.save`` of
``{"r": remainder tensors, "m": categories, "s": group -> shapes}``; stream 8 is brotli of the row
permutations (uint16 LE, group then layer order). Everything is checked before it is allocated: the
lengths against the file, the declared shapes against the architecture, the lrzip outputs against the
shapes, the permutations for being permutations.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import lrzip
from .inflate import InflateError, brotli_decompress

MAGIC = b"PGRP"
GROUP_ORDER: tuple[str, ...] = (
    "_tok_emb.weight.q",
    "attn.c_k.weight.q",
    "attn.c_q.weight.q",
    "attn.c_v.weight.q",
    "attn.proj.weight.q",
    "mlp.fc.weight.q",
    "mlp.proj.weight.q",
)
SIMSORT_GROUPS = frozenset({"_tok_emb.weight.q", "attn.c_q.weight.q", "mlp.fc.weight.q"})
NUM_STREAMS = len(GROUP_ORDER) + 2
# Without an architecture to bound them, no group may declare more than this (the records: 11.5 MB).
MAX_GROUP_BYTES_UNCHECKED = 256 << 20

Fail = Callable[[str], Exception]


def split_streams(data: bytes, fail: Fail) -> list[bytes]:
    if len(data) < 8:
        raise fail(f"PGRP container truncated: {len(data)} bytes, no stream count")
    (n,) = struct.unpack_from("<I", data, 4)
    if n != NUM_STREAMS:
        raise fail(f"PGRP container declares {n} streams; the record's layout has {NUM_STREAMS}")
    table_end = 8 + 4 * n
    if len(data) < table_end:
        raise fail(f"PGRP container truncated inside its stream table ({len(data)} bytes)")
    lengths = struct.unpack_from(f"<{n}I", data, 8)
    body = len(data) - table_end
    if sum(lengths) != body:
        state = "run past the end of the file" if sum(lengths) > body else "leave trailing bytes"
        raise fail(f"PGRP stream lengths (sum {sum(lengths):,}) {state} ({body:,} bytes after the table; truncated?)")
    offsets = np.cumsum((table_end, *lengths)).tolist()
    return [data[offsets[i] : offsets[i + 1]] for i in range(n)]


def group_tensor_names(group: str, count: int) -> list[str]:
    return [group[1:]] if group.startswith("_") else [f"blocks.{i}.{group}" for i in range(count)]


def decode_pergroup(
    data: bytes,
    fail: Fail,
    *,
    load_remainder: Callable[[bytes], Any],
    remainder_limit: int,
    expected: dict[str, tuple[int, ...]] | None = None,
    num_layers: int | None = None,
    decoder: Callable[[list[tuple[bytes, int]]], list[bytes]] = lrzip.decode_all,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(w, m)`` as the record's ``_deserialize_pergroup`` rebuilds them (``.q`` names plus the remainder).

    ``expected``: the architecture's state dict (name -> shape) that declared shapes must match, and
    ``num_layers`` its layer count; without them only the global caps bound the sizes.
    ``load_remainder`` opens the remainder's torch.save bytes (with ``weights_only=True``).
    """
    streams = split_streams(data, fail)
    if not streams[len(GROUP_ORDER)]:
        raise fail("PGRP remainder stream (7) is empty: no categories or shapes")
    try:
        remainder_raw = brotli_decompress(streams[len(GROUP_ORDER)], remainder_limit)
    except InflateError as exc:
        raise fail(f"PGRP remainder stream: {exc}") from None
    obj = load_remainder(remainder_raw)
    if not isinstance(obj, dict) or set(obj) != {"r", "m", "s"}:
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise fail(f"PGRP remainder must be a dict with keys ['m', 'r', 's'], found {found}")
    remainder, meta, manifest = obj["r"], obj["m"], obj["s"]
    if not isinstance(remainder, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in remainder.items()
    ):
        raise fail("PGRP remainder 'r' must map names to tensors")
    plan = _plan(manifest, streams, fail, expected, num_layers)
    inverses = _inverse_permutations(streams[-1], plan, fail)
    if any(data for data, _ in plan.values()) and lrzip.lrzip_program() is None:
        raise fail(
            f"this is a PGRP (per-group lrzip) artifact and the lrzip program is not installed; {lrzip.INSTALL_HINT}"
        )
    jobs = [(stream, sum(int(np.prod(shape)) for _, shape in entries)) for stream, entries in plan.values()]
    try:
        decoded = dict(zip(plan, decoder(jobs), strict=True))
    except lrzip.LrzipError as exc:
        raise fail(f"PGRP group stream: {exc}") from None
    w: dict[str, torch.Tensor] = dict(remainder)
    for group, (_, entries) in plan.items():
        flat = np.frombuffer(decoded[group], dtype=np.int8)
        offset = 0
        for name, shape in entries:
            count = int(np.prod(shape))
            chunk = flat[offset : offset + count]
            offset += count
            if len(shape) == 2:
                rows, cols = shape
                chunk = chunk.reshape(cols, rows).T
                if group in SIMSORT_GROUPS:
                    chunk = chunk[inverses.pop(0)]
            if name in w:
                raise fail(f"PGRP tensor {name} is both in a group stream and in the remainder")
            w[name] = torch.from_numpy(np.ascontiguousarray(chunk).reshape(shape))
    return w, meta


def _plan(manifest: Any, streams: list[bytes], fail: Fail, expected, num_layers) -> dict[str, tuple[bytes, list]]:
    """Per present group: its stream and [(tensor name, shape)], every shape checked before any decoding."""
    if not isinstance(manifest, dict) or not all(isinstance(k, str) for k in manifest):
        raise fail("PGRP remainder 's' must map group names to lists of shapes")
    unknown = sorted(set(manifest) - set(GROUP_ORDER))
    if unknown:
        raise fail(f"PGRP shape manifest names unknown groups {unknown}; known: {list(GROUP_ORDER)}")
    plan: dict[str, tuple[bytes, list]] = {}
    for i, group in enumerate(GROUP_ORDER):
        stream, shapes = streams[i], manifest.get(group)
        if not stream:
            if shapes:
                raise fail(f"PGRP group {group} declares {len(shapes)} shapes but its stream is empty")
            continue
        if (
            not isinstance(shapes, (list, tuple))
            or not shapes
            or not all(
                isinstance(s, (list, tuple))
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)
                for s in shapes
            )
        ):
            raise fail(f"PGRP group {group}: shape manifest entry {shapes!r} is not a list of shapes")
        count = 1 if group.startswith("_") else (num_layers if num_layers is not None else len(shapes))
        if len(shapes) != count:
            raise fail(f"PGRP group {group} declares {len(shapes)} tensors; the architecture has {count}")
        entries = [(name, tuple(s)) for name, s in zip(group_tensor_names(group, count), shapes, strict=True)]
        for name, shape in entries:
            weight = name[: -len(".q")]
            if expected is not None and expected.get(weight) != shape:
                have = "no such tensor" if weight not in expected else f"shape {expected[weight]}"
                raise fail(
                    f"PGRP declares {name} with shape {shape}; the architecture has {have}"
                    " (wrong preset, log or overrides?)"
                )
            if expected is None and int(np.prod(shape)) > MAX_GROUP_BYTES_UNCHECKED:
                raise fail(f"PGRP declares {name} with shape {shape}, beyond any record")
            if len(shape) == 2 and group in SIMSORT_GROUPS and shape[0] > 65536:
                raise fail(f"PGRP declares {name} with {shape[0]} rows; uint16 permutations index at most 65536")
        if expected is None and sum(int(np.prod(s)) for _, s in entries) > MAX_GROUP_BYTES_UNCHECKED:
            raise fail(f"PGRP group {group} declares more than {MAX_GROUP_BYTES_UNCHECKED:,} bytes")
        plan[group] = (stream, entries)
    return plan


def _inverse_permutations(stream: bytes, plan: dict[str, tuple[bytes, list]], fail: Fail) -> list[np.ndarray]:
    """The inverse of every stored row order, in stream order, each checked to be a permutation."""
    named = [
        (name, shape[0])
        for g, (_, entries) in plan.items()
        if g in SIMSORT_GROUPS
        for name, shape in entries
        if len(shape) == 2
    ]
    rows = [r for _, r in named]
    need = 2 * sum(rows)
    if not stream:
        if need:
            raise fail(f"PGRP permutation stream (8) is empty; the similarity-sorted groups need {need:,} bytes")
        return []
    try:
        raw = brotli_decompress(stream, need)
    except InflateError as exc:
        raise fail(f"PGRP permutation stream: {exc}") from None
    if len(raw) != need:
        raise fail(f"PGRP permutation stream holds {len(raw):,} bytes; the declared shapes need {need:,}")
    flat = np.frombuffer(raw, dtype="<u2").astype(np.int64)
    perms = np.split(flat, np.cumsum(rows)[:-1].tolist()) if rows else []
    return [_inverse(perm, name, fail) for perm, (name, _) in zip(perms, named, strict=True)]


def _inverse(perm: np.ndarray, name: str, fail: Fail) -> np.ndarray:
    if perm.size and (perm.max() >= perm.size or np.bincount(perm, minlength=perm.size).max() != 1):
        raise fail(f"PGRP row permutation of {name} is not a permutation of 0..{perm.size - 1}")
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return inv
