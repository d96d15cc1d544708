"""``model.bin``: pgttt's own self-describing checkpoint file (no pickle: JSON and raw tensor bytes).

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic b"PGTTTBIN"
    8       4     format version, uint32 (this module writes version 2 and reads 1 and 2)
    12      8     header length H, uint64
    20      8     payload length P, uint64
    28      H     header: UTF-8 JSON object
    28+H    P     payload: brotli( byte_shuffle(raw, stride 2) )
    28+H+P  32    sha256 of every byte before it (magic .. payload)

The header holds ``config`` (ModelConfig keys), ``tokenizer`` (sha256, vocab_size, name, or null),
``provenance`` (how the weights were trained or imported), ``payload`` (compression, shuffle_stride,
raw_bytes) and ``tensors``: in state-dict order, byte spans of each tensor's sections in the raw
(decompressed, unshuffled) payload (``tensor_table.py``; version 2 adds int7, gate_int8_row and LQER).

Reading checks, in order: magic, version, lengths against the file size, the checksum, the header,
the tensor table against the config's state dict (before anything is decompressed), the payload
(decompressed to at most the size the table needs), then every tensor's values; any failure is one
CheckpointError naming the file and the problem. Docs: docs/model-bin.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import brotli
import numpy as np
import torch

from pgttt.errors import PgtttError

from .config import ConfigError, ModelConfig
from .inflate import InflateError, brotli_decompress
from .model import GPT
from .quant import SCHEMES, QuantizedTensor
from .tensor_table import build_tensors, plan_table, table_for

MAGIC = b"PGTTTBIN"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
_PREFIX = struct.Struct("<8sIQQ")  # magic, version, header length, payload length
_DIGEST_BYTES = 32
SHUFFLE_STRIDE = 2
# Quality 5 is within about 1% of quality 11 on quantized weights and ~100x faster (0.4 s vs ~50 s
# for the 36M-parameter model); model.bin is not the challenge's submission artifact.
BROTLI_QUALITY = 5
_HEADER_KEYS = {"config", "tokenizer", "provenance", "payload", "tensors"}


class CheckpointError(PgtttError):
    """Any problem with a checkpoint or tokenizer file; the message names the file and the problem."""


@dataclass(frozen=True)
class TokenizerIdentity:
    sha256: str
    vocab_size: int
    name: str  # the file name it came from

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "vocab_size": self.vocab_size, "name": self.name}


@dataclass(frozen=True)
class ModelBin:
    path: Path
    config: ModelConfig
    tensors: dict[str, QuantizedTensor]
    tokenizer: TokenizerIdentity | None
    provenance: dict
    header: dict
    sha256: str  # of the whole file
    size_bytes: int


# ---- files ----------------------------------------------------------------------------------
def read_file_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a file, or a CheckpointError saying why not (missing, a directory, empty, ...)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not data:
        raise CheckpointError(f"{path}: empty file")
    return data


def tokenizer_identity(path: str | os.PathLike) -> TokenizerIdentity:
    """sha256 of a SentencePiece ``.model`` file's bytes and its vocabulary size."""
    import sentencepiece as spm

    path = Path(path)
    data = read_file_bytes(path)
    try:
        vocab_size = spm.SentencePieceProcessor(model_proto=data).vocab_size()
    except Exception as exc:  # noqa: BLE001 - sentencepiece raises RuntimeError/TypeError/...
        raise CheckpointError(f"{path}: not a SentencePiece model ({str(exc).splitlines()[0]})") from None
    return TokenizerIdentity(hashlib.sha256(data).hexdigest(), int(vocab_size), path.name)


# ---- byte shuffle (the challenge's, any stride) ---------------------------------------------
def byte_shuffle(data: bytes, stride: int) -> bytes:
    """All bytes at positions 0, s, 2s, ..., then 1, 1+s, ...: groups bytes of the same significance."""
    src = np.frombuffer(data, dtype=np.uint8)
    return np.concatenate([src[i::stride] for i in range(stride)]).tobytes()


def byte_unshuffle(data: bytes, stride: int) -> bytes:
    src = np.frombuffer(data, dtype=np.uint8)
    out = np.empty_like(src)
    start = 0
    for i in range(stride):
        count = len(range(i, len(src), stride))
        out[i::stride] = src[start : start + count]
        start += count
    return out.tobytes()


# ---- tensors against a config ---------------------------------------------------------------
@lru_cache(maxsize=16)
def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state dict of ``GPT(config)``, name -> shape, in module order (built on the meta device)."""
    with torch.device("meta"):
        model = GPT(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def shape_problems(shapes: dict[str, tuple[int, ...]], config: ModelConfig) -> list[str]:
    """Missing, unexpected and mismatched names of ``shapes`` against config's state dict (empty: equal)."""
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in shapes]
    unexpected = [n for n in shapes if n not in expected]
    mismatched = [f"{n} {shapes[n]} vs {shape}" for n, shape in expected.items() if n in shapes and shapes[n] != shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches (file vs config): {_listing(mismatched, 4)}")
    return problems


def check_tensors(tensors: dict[str, QuantizedTensor], config: ModelConfig, where: str, hint: str = "") -> None:
    """Raise one CheckpointError (prefixed ``where``) unless the tensors are exactly config's state dict."""
    problems = shape_problems({n: qt.shape for n, qt in tensors.items()}, config)
    if problems:
        raise CheckpointError(f"{where}: tensors do not match the architecture: {'; '.join(problems)}{hint}")
    for name, qt in tensors.items():
        try:
            qt.check(name)
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from None


def quantization_summary(tensors: dict[str, QuantizedTensor]) -> dict[str, dict[str, int]]:
    """Per scheme: number of tensors, parameters, and stored (uncompressed) bytes of values and scales."""
    summary: dict[str, dict[str, int]] = {}
    for qt in tensors.values():
        entry = summary.setdefault(qt.scheme, {"tensors": 0, "parameters": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["parameters"] += qt.q.numel()
        parts = [qt.q, qt.scale, *(qt.lqer.tensors().values() if qt.lqer else ())]
        entry["bytes"] += sum(t.numel() * t.element_size() for t in parts if t is not None)
    return {scheme: summary[scheme] for scheme in SCHEMES if scheme in summary}


def parameter_count(tensors: dict[str, QuantizedTensor]) -> int:
    return sum(qt.q.numel() for qt in tensors.values())


# ---- writing --------------------------------------------------------------------------------
def _encode(header: dict, raw: bytes) -> bytes:
    """Header + raw payload -> the file's bytes (shuffle, compress, prefix, checksum)."""
    payload = brotli.compress(byte_shuffle(raw, SHUFFLE_STRIDE), quality=BROTLI_QUALITY)
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes), len(payload)) + header_bytes + payload
    return body + hashlib.sha256(body).digest()


def save_model_bin(
    path: str | os.PathLike,
    config: ModelConfig,
    tensors: dict[str, QuantizedTensor],
    *,
    tokenizer: TokenizerIdentity | None,
    provenance: dict,
) -> None:
    """Validate, then write atomically: a temp file in the same folder, fsync, rename over ``path``."""
    path = Path(path)
    check_tensors(tensors, config, f"{path}: refusing to write")
    try:
        json.dumps(provenance)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: refusing to write: provenance is not JSON-serialisable ({exc})") from None
    entries, raw = table_for(tensors, list(expected_shapes(config)))
    header = {
        "config": config.to_dict(),
        "tokenizer": None if tokenizer is None else tokenizer.to_dict(),
        "provenance": provenance,
        "payload": {"compression": "brotli", "shuffle_stride": SHUFFLE_STRIDE, "raw_bytes": len(raw)},
        "tensors": entries,
    }
    write_atomic(path, _encode(header, raw))


def write_atomic(path: Path, data: bytes) -> None:
    tmp_name = None
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
            tmp_name = f.name
            os.fchmod(f.fileno(), 0o644)  # temp files are created 0600; a checkpoint is an ordinary file
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write: {exc.strerror or exc}") from None
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)


# ---- reading --------------------------------------------------------------------------------
def read_model_bin(path: str | os.PathLike) -> ModelBin:
    """Read and validate a model.bin completely; any problem is a CheckpointError naming the file."""
    path = Path(path)
    return parse_model_bin(path, read_file_bytes(path))


def parse_model_bin(path: Path, data: bytes) -> ModelBin:
    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: {problem}")

    if not data.startswith(MAGIC):
        raise fail(f"not a pgttt model.bin (wrong magic {data[:8]!r}, expected {MAGIC!r})")
    if len(data) < _PREFIX.size:
        raise fail(f"truncated: {len(data)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    _, version, header_len, payload_len = _PREFIX.unpack_from(data)
    if version not in READ_VERSIONS:
        newer = " is newer than this pgttt reads; upgrade pgttt" if version > FORMAT_VERSION else " is unknown"
        raise fail(f"format version {version}{newer} (supported: {', '.join(map(str, READ_VERSIONS))})")
    expected_size = _PREFIX.size + header_len + payload_len + _DIGEST_BYTES
    if len(data) != expected_size:
        state = "truncated" if len(data) < expected_size else "has trailing bytes"
        raise fail(f"{state}: the prefix announces {expected_size} bytes, the file has {len(data)} (corrupt?)")
    body = data[:-_DIGEST_BYTES]
    if hashlib.sha256(body).digest() != data[-_DIGEST_BYTES:]:
        raise fail("checksum mismatch: the file is corrupt (damaged or modified after writing)")

    try:
        header = json.loads(body[_PREFIX.size : _PREFIX.size + header_len].decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise fail(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        found = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise fail(f"header must have exactly the keys {sorted(_HEADER_KEYS)}, found {found}")
    try:
        config = ModelConfig.from_dict(header["config"], where="header config")
    except (ConfigError, TypeError) as exc:
        raise fail(str(exc)) from None
    tokenizer = _parse_tokenizer(header["tokenizer"], fail)
    if not isinstance(header["provenance"], dict):
        raise fail("header provenance must be a JSON object")
    planned, table_bytes = plan_table(header["tensors"], version, fail)
    problems = shape_problems({p.name: p.shape for p in planned}, config)
    if problems:
        raise fail(
            f"tensors do not match the architecture: {'; '.join(problems)} "
            "(the header's config and its tensors disagree)"
        )
    raw = _decode_payload(header["payload"], body[_PREFIX.size + header_len :], table_bytes, fail)
    tensors = build_tensors(planned, raw)
    check_tensors(tensors, config, str(path), hint=" (the header's config and its tensors disagree)")
    return ModelBin(
        path=path,
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        provenance=header["provenance"],
        header=header,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_tokenizer(entry: Any, fail) -> TokenizerIdentity | None:
    if entry is None:
        return None
    if (
        not isinstance(entry, dict)
        or set(entry) != {"sha256", "vocab_size", "name"}
        or not isinstance(entry["sha256"], str)
        or not _is_int(entry["vocab_size"])
        or not isinstance(entry["name"], str)
    ):
        raise fail(f"header tokenizer must be null or {{sha256, vocab_size, name}}, found {entry!r}")
    return TokenizerIdentity(entry["sha256"], entry["vocab_size"], entry["name"])


def _decode_payload(meta: Any, payload: bytes, table_bytes: int, fail) -> bytes:
    if not isinstance(meta, dict) or set(meta) != {"compression", "shuffle_stride", "raw_bytes"}:
        raise fail(f"header payload must be {{compression, shuffle_stride, raw_bytes}}, found {meta!r}")
    if meta["compression"] != "brotli":
        raise fail(f"unsupported payload compression {meta['compression']!r} (supported: 'brotli')")
    stride = meta["shuffle_stride"]
    if not _is_int(stride) or stride < 1:
        raise fail(f"header payload shuffle_stride must be a positive integer, found {stride!r}")
    if meta["raw_bytes"] != table_bytes:
        raise fail(f"header payload raw_bytes {meta['raw_bytes']!r} is not the {table_bytes} bytes its tensors need")
    try:
        # Bounded by what the (already checked) tensor table needs: a small file cannot inflate beyond it.
        raw = byte_unshuffle(brotli_decompress(payload, table_bytes), stride)
    except InflateError as exc:
        raise fail(f"payload does not decompress ({exc})") from None
    if len(raw) != table_bytes:
        raise fail(f"payload holds {len(raw)} bytes, the header says {table_bytes}")
    return raw
