"""Token shards (spec section 1): validated, memory-mapped, concatenated in name order, trimmed.

A shard is 256 little-endian int32 (magic 20240520, version 1, token count N, zeros) then N uint16
ids; anything else is refused with the file and the fault named. Per-file work that reads every
byte (the largest id, the sha256) is cached by (path, size, mtime), so a service that evaluates the
same val set many times reads it once.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VAL_PATTERN = "fineweb_val_*.bin"
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class FileKey:
    """Identifies one version of a file: a change of size or mtime invalidates cached work."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileKey:
        st = path.stat()
        return cls(str(path.resolve()), st.st_size, st.st_mtime_ns)


def read_header(path: Path) -> int:
    """The token count N of a shard, after checking magic, version, and that size == 1024 + 2N exactly."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read token shard: {exc.strerror or exc}") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: short read: the header needs {HEADER_BYTES} bytes, the file has {len(raw)}")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != SHARD_MAGIC:
        raise DataError(f"{path}: wrong magic {int(header[0])} (a token shard starts with {SHARD_MAGIC})")
    if int(header[1]) != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {int(header[1])} (expected {SHARD_VERSION})")
    n = int(header[2])
    if n < 0:
        raise DataError(f"{path}: negative token count {n} in the header")
    expected = HEADER_BYTES + 2 * n
    if size < expected:
        raise DataError(
            f"{path}: short read: the header promises {n} tokens ({expected} bytes), the file has {size} bytes"
        )
    if size != expected:
        raise DataError(
            f"{path}: size mismatch: the header says {n} tokens, so {expected} bytes, but the file has {size} bytes"
        )
    return n


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write ``tokens`` as a shard: the header (magic, version 1, count, zeros), then the uint16 ids."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def open_shard(path: str | Path, vocab_size: int | None = None) -> np.ndarray:
    """The shard's ids as a read-only uint16 memmap, validated; ids must be below ``vocab_size`` if given."""
    path = Path(path)
    n = read_header(path)
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
    if vocab_size is not None and _max_token(FileKey.of(path)) >= vocab_size:
        _refuse_first_id(tokens, vocab_size, str(path))
    return tokens


def _refuse_first_id(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    position = int(np.flatnonzero(tokens >= vocab_size)[0])
    raise DataError(
        f"{where}: token id {int(tokens[position])} at position {position} is not below the model's "
        f"vocab_size={vocab_size} (wrong tokenizer or data for this checkpoint?)"
    )


@functools.lru_cache(maxsize=1024)
def _max_token(key: FileKey) -> int:
    tokens = np.memmap(key.path, dtype="<u2", mode="r", offset=HEADER_BYTES)
    return int(tokens.max()) if tokens.size else -1


@functools.lru_cache(maxsize=1024)
def _file_sha256(key: FileKey) -> str:
    digest = hashlib.sha256()
    with open(key.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_val_files(spec: str | Path) -> list[Path]:
    """A directory (its ``fineweb_val_*.bin``), a glob, or one file; sorted by name as the challenge does."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        matches = sorted(glob.glob(os.path.join(text, VAL_PATTERN)))
        where = f"{path}: no {VAL_PATTERN} files in this directory"
    elif _GLOB_CHARS & set(text):
        matches = sorted(glob.glob(text))
        where = f"{text}: no files match this pattern"
    elif path.is_file():
        matches = [text]
        where = ""
    else:
        raise DataError(f"{text}: no such file or directory (expected a directory of {VAL_PATTERN}, a glob or a file)")
    if not matches:
        raise DataError(where)
    return [Path(m) for m in matches]


def fingerprint(files: list[Path]) -> str:
    """sha256 over each file's name, size and contents (per-file digests cached), in order."""
    digest = hashlib.sha256()
    for path in files:
        key = FileKey.of(path)
        digest.update(f"{path.name}\0{key.size}\0{_file_sha256(key)}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ValSet:
    """The validation stream: all files' ids concatenated (a memmap view when there is one file)."""

    files: tuple[Path, ...]
    tokens: np.ndarray
    fingerprint: str

    def trimmed(self, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
        return trim_stream(self.tokens, seq_len, max_tokens, where=self.describe())

    @classmethod
    def from_tokens(cls, tokens: np.ndarray) -> ValSet:
        """A stream held in memory (tests, callers with their own data); fingerprinted by its bytes."""
        tokens = np.ascontiguousarray(tokens, dtype=np.uint16)
        return cls((), tokens, hashlib.sha256(tokens.tobytes()).hexdigest())

    def check_vocab(self, vocab_size: int) -> None:
        """Raise DataError naming the file, position and id if any id is not below ``vocab_size``."""
        for path in self.files:
            open_shard(path, vocab_size)
        if not self.files and len(self.tokens) and int(self.tokens.max()) >= vocab_size:
            _refuse_first_id(self.tokens, vocab_size, self.describe())

    def describe(self) -> str:
        if not self.files:
            return "in-memory val"
        first = str(self.files[0])
        return first if len(self.files) == 1 else f"{first} (+{len(self.files) - 1} more files)"


def load_val(spec: str | Path, vocab_size: int | None = None) -> ValSet:
    files = resolve_val_files(spec)
    parts = [open_shard(f, vocab_size) for f in files]
    tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return ValSet(tuple(files), tokens, fingerprint(files))


def trim_stream(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None, *, where: str = "val") -> np.ndarray:
    """Cut to ``usable + 1`` tokens, ``usable = ((N-1) // seq_len) * seq_len``, then to ``max_tokens + 1``."""
    n = len(tokens)
    usable = ((n - 1) // seq_len) * seq_len if n else 0
    if usable <= 0:
        raise DataError(f"{where}: {n} tokens is too few for seq_len={seq_len} (at least {seq_len + 1} needed)")
    targets = usable if max_tokens is None else min(usable, max_tokens)
    return tokens[: targets + 1]
