"""Token shards (spec section 1): validated, memory-mapped, concatenated in name order, trimmed.

A shard is 256 little-endian int32 (magic 20240520, version 1, token count N, zeros) then N uint16
ids; anything else is refused with the file and the fault named. Per-file work that reads every
byte (the largest id, the sha256) is cached by (path, size, mtime), so a service that evaluates the
same val set many times reads it once.

CaseOps datasets (frontier spec 5.3) add a byte sidecar beside each val shard:
``fineweb_val_bytes_NNNNNN.bin``, the same format, one entry per token of ``fineweb_val_NNNNNN.bin``:
the bytes of the original text that token stands for (0 for BOS). Names containing ``_bytes_`` are
never token shards (spec 2.2).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from .errors import DataError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VAL_PATTERN = "fineweb_val_*.bin"
SIDECAR_PATTERN = "fineweb_val_bytes_*.bin"
SIDECAR_MARK = "_bytes_"  # the records' rule: a val file whose name contains it is a sidecar, not tokens
BOS_ID = 1
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


def is_sidecar(path: str | Path) -> bool:
    return SIDECAR_MARK in Path(path).name


def resolve_val_files(spec: str | Path) -> list[Path]:
    """A directory (its ``fineweb_val_*.bin``), a glob, or one file; sorted by name as the challenge does.
    Byte sidecars (``*_bytes_*``) are never token shards: a directory's or a glob's are left out."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        matches = sorted(m for m in glob.glob(os.path.join(text, VAL_PATTERN)) if not is_sidecar(m))
        where = f"{path}: no {VAL_PATTERN} files in this directory"
    elif _GLOB_CHARS & set(text):
        matches = sorted(m for m in glob.glob(text) if not is_sidecar(m))
        where = f"{text}: no files match this pattern" + (
            " (byte sidecars are not token shards)" if glob.glob(text) else ""
        )
    elif path.is_file():
        if is_sidecar(path):
            raise DataError(f"{text}: a byte sidecar, not a token shard: give its token shard or their directory")
        matches = [text]
        where = ""
    else:
        raise DataError(f"{text}: no such file or directory (expected a directory of {VAL_PATTERN}, a glob or a file)")
    if not matches:
        raise DataError(where)
    return [Path(m) for m in matches]


def sidecar_of(token_file: Path) -> Path | None:
    """Where the byte sidecar of ``fineweb_val_X.bin`` would be: ``fineweb_val_bytes_X.bin`` beside it."""
    prefix = "fineweb_val_"
    if not token_file.name.startswith(prefix):
        return None
    return token_file.with_name(f"{prefix}bytes_{token_file.name[len(prefix) :]}")


def resolve_sidecar_files(spec: str | Path, token_files: list[Path]) -> list[Path]:
    """The byte sidecars of ``token_files``, one per shard, or none at all (a dataset without CaseOps).
    A shard without its sidecar while others have one, or (for a directory) a sidecar without its token
    shard, is refused with both names."""
    partners = [sidecar_of(f) for f in token_files]
    present = [p for p in partners if p is not None and p.is_file()]
    if Path(spec).is_dir():
        wanted = {p.name for p in partners if p is not None}
        orphans = sorted(
            name
            for name in (Path(m).name for m in glob.glob(os.path.join(spec, SIDECAR_PATTERN)))
            if name not in wanted
        )
        if orphans:
            token = orphans[0].replace(SIDECAR_MARK, "_", 1)
            raise DataError(f"{Path(spec) / orphans[0]}: a byte sidecar without its token shard {token}")
    if not present:
        return []
    for token_file, partner in zip(token_files, partners, strict=True):
        if partner is None or not partner.is_file():
            expected = partner.name if partner is not None else "a fineweb_val_bytes_*.bin"
            raise DataError(
                f"{token_file}: no byte sidecar {expected} beside it, while {present[0].name} is there: "
                "a CaseOps val set needs the sidecar of every shard"
            )
    return present


def open_sidecar(path: Path, token_file: Path, tokens: np.ndarray) -> np.ndarray:
    """The sidecar of ``token_file`` (whose ids are ``tokens``) as a uint16 memmap, checked against it:
    one entry per token, and 0 bytes at every BOS."""
    n = read_header(path)
    if n != len(tokens):
        raise DataError(
            f"{path}: {n} entries for the {len(tokens)} tokens of {token_file.name}: a byte sidecar has one "
            "entry per token of its shard"
        )
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    entries = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
    position = _first_bos_with_bytes(FileKey.of(path), FileKey.of(token_file))
    if position >= 0:
        raise DataError(
            f"{path}: entry {int(entries[position])} at position {position}, where {token_file.name} has BOS "
            f"(id {BOS_ID}, 0 bytes): the sidecar is misaligned with its token shard or belongs to another one"
        )
    return entries


@functools.lru_cache(maxsize=1024)
def _first_bos_with_bytes(sidecar: FileKey, tokens: FileKey) -> int:
    """The first position where the token shard has BOS and the sidecar a non-zero entry, or -1."""
    ids = np.memmap(tokens.path, dtype="<u2", mode="r", offset=HEADER_BYTES)
    entries = np.memmap(sidecar.path, dtype="<u2", mode="r", offset=HEADER_BYTES)
    bad = np.flatnonzero((ids == BOS_ID) & (entries != 0))
    return int(bad[0]) if len(bad) else -1


def fingerprint(files: list[Path]) -> str:
    """sha256 over each file's name, size and contents (per-file digests cached), in order."""
    digest = hashlib.sha256()
    for path in files:
        key = FileKey.of(path)
        digest.update(f"{path.name}\0{key.size}\0{_file_sha256(key)}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ValSet:
    """The validation stream: all files' ids concatenated (a memmap view when there is one file), and for
    CaseOps data the byte sidecar, entry for entry (``sidecar[i]``: the bytes of token ``tokens[i]``)."""

    files: tuple[Path, ...]
    tokens: np.ndarray
    fingerprint: str  # of the token shards and the sidecars
    sidecar_files: tuple[Path, ...] = ()
    sidecar: np.ndarray | None = None

    def trimmed(self, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
        return trim_stream(self.tokens, seq_len, max_tokens, where=self.describe())

    def target_count(self, seq_len: int) -> int:
        """The targets of the whole trimmed stream: ``((N - 1) // seq_len) * seq_len``."""
        return len(self.trimmed(seq_len)) - 1

    def byte_source(self, tables: ByteSource) -> ByteSource:
        """Where the bytes of targets come from: the sidecar when there is one (spec 5.4), else ``tables``."""
        if self.sidecar is None:
            return tables
        return SidecarBytes(self.sidecar, self.describe_sidecar())

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, sidecar: np.ndarray | None = None) -> ValSet:
        """A stream held in memory (tests, callers with their own data); fingerprinted by its bytes."""
        tokens = np.ascontiguousarray(tokens, dtype=np.uint16)
        digest = hashlib.sha256(tokens.tobytes())
        if sidecar is not None:
            sidecar = np.ascontiguousarray(sidecar, dtype=np.uint16)
            if len(sidecar) != len(tokens):
                raise DataError(f"in-memory val: {len(sidecar)} sidecar entries for {len(tokens)} tokens")
            bad = np.flatnonzero((tokens == BOS_ID) & (sidecar != 0))
            if len(bad):
                raise DataError(f"in-memory val: sidecar entry {int(sidecar[bad[0]])} at BOS position {int(bad[0])}")
            digest.update(b"sidecar\0" + sidecar.tobytes())
        return cls((), tokens, digest.hexdigest(), (), sidecar)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise DataError naming the file, position and id if any id is not below ``vocab_size``."""
        for path in self.files:
            open_shard(path, vocab_size)
        if not self.files and len(self.tokens) and int(self.tokens.max()) >= vocab_size:
            _refuse_first_id(self.tokens, vocab_size, self.describe())

    def describe(self) -> str:
        return _describe(self.files, "in-memory val")

    def describe_sidecar(self) -> str:
        return _describe(self.sidecar_files, "in-memory val sidecar")


def _describe(files: tuple[Path, ...], default: str) -> str:
    if not files:
        return default
    first = str(files[0])
    return first if len(files) == 1 else f"{first} (+{len(files) - 1} more files)"


class ByteSource(Protocol):
    """Bytes for bits per byte: the tokenizer's tables (``ByteTables``) or a val set's sidecar."""

    @property
    def kind(self) -> str:
        """``tokenizer`` (the SentencePiece tables of spec 2) or ``sidecar`` (frontier spec 5.4)."""
        ...

    def target_bytes(self, tokens: np.ndarray) -> np.ndarray:
        """The bytes of every target ``tokens[i+1]``: int64 (len - 1,)."""
        ...


@dataclass(frozen=True)
class SidecarBytes:
    """A val set's sidecar as a byte source: target ``tokens[i+1]`` is ``entries[i+1]`` bytes, whatever
    the previous token (spec 5.4). ``tokens`` must be a prefix of that val set's stream (a trimmed cut)."""

    entries: np.ndarray
    where: str
    kind: ClassVar[str] = "sidecar"

    def target_bytes(self, tokens: np.ndarray) -> np.ndarray:
        n = len(tokens)
        if n > len(self.entries):
            raise DataError(f"{self.where}: {len(self.entries)} sidecar entries, fewer than the {n} tokens scored")
        return np.asarray(self.entries[1:n], dtype=np.int64)


def load_val(spec: str | Path, vocab_size: int | None = None) -> ValSet:
    files = resolve_val_files(spec)
    parts = [open_shard(f, vocab_size) for f in files]
    tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
    sidecars = resolve_sidecar_files(spec, files)
    if not sidecars:
        return ValSet(tuple(files), tokens, fingerprint(files))
    entries = [open_sidecar(s, f, part) for s, f, part in zip(sidecars, files, parts, strict=True)]
    sidecar = entries[0] if len(entries) == 1 else np.concatenate(entries)
    return ValSet(tuple(files), tokens, fingerprint(files + sidecars), tuple(sidecars), sidecar)


def trim_stream(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None, *, where: str = "val") -> np.ndarray:
    """Cut to ``usable + 1`` tokens, ``usable = ((N-1) // seq_len) * seq_len``, then to ``max_tokens + 1``."""
    n = len(tokens)
    usable = ((n - 1) // seq_len) * seq_len if n else 0
    if usable <= 0:
        raise DataError(f"{where}: {n} tokens is too few for seq_len={seq_len} (at least {seq_len + 1} needed)")
    targets = usable if max_tokens is None else min(usable, max_tokens)
    return tokens[: targets + 1]
