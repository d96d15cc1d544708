"""Byte accounting for bits per byte (spec section 2), from the SentencePiece model alone.

Control, unknown and unused pieces (and ids beyond the tokenizer's vocabulary) are boundary tokens
of 0 bytes; a byte-fallback piece is 1 byte; any other piece is the UTF-8 length of its text without
a leading ``▁``, plus one byte for that space unless the previous token is a boundary.

A CaseOps tokenizer (frontier spec 5.2: the case operators U+E001..U+E004 as pieces of their own) is
recognised, because its data takes bytes from the val set's sidecar instead (spec 5.4): these tables
would charge 3 bytes to every case operator.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import sentencepiece as spm

from pgttt.checkpoints.format import tokenizer_identity

from .data import ByteSource, FileKey, ValSet
from .errors import EvalError

SPACE = "\u2581"  # ▁, SentencePiece's word-boundary marker
CASE_OPERATORS = ("\ue001", "\ue002", "\ue003", "\ue004")  # TITLE, ALLCAPS, CAPNEXT, ESC (frontier spec 5.1)


@dataclass(frozen=True)
class ByteTables:
    """Per-id tables sized to the model's vocabulary."""

    base_bytes: np.ndarray  # int64 (vocab,)
    has_leading_space: np.ndarray  # bool (vocab,)
    is_boundary: np.ndarray  # bool (vocab,)
    tokenizer_sha256: str
    tokenizer_vocab_size: int
    caseops: bool = False  # the tokenizer has the case operators: its data needs a byte sidecar
    tokenizer_name: str = ""
    kind: ClassVar[str] = "tokenizer"

    @property
    def vocab_size(self) -> int:
        return len(self.base_bytes)

    def target_bytes(self, tokens: np.ndarray) -> np.ndarray:
        """Bytes of every target ``tokens[i+1]`` given its previous token ``tokens[i]``: int64 (len-1,)."""
        ids = np.asarray(tokens, dtype=np.int64)
        prev, target = ids[:-1], ids[1:]
        return self.base_bytes[target] + (self.has_leading_space[target] & ~self.is_boundary[prev])


def build_byte_tables(
    sp: spm.SentencePieceProcessor, vocab_size: int, sha256: str, *, where: str, name: str = ""
) -> ByteTables:
    sp_vocab = int(sp.vocab_size())
    space_id = sp.piece_to_id(SPACE)
    if not (0 <= space_id < sp_vocab) or sp.id_to_piece(space_id) != SPACE:
        raise EvalError(f"{where}: the tokenizer has no piece '{SPACE}' of its own; bits per byte need it (spec 2)")
    base = np.zeros(vocab_size, dtype=np.int64)
    leading = np.zeros(vocab_size, dtype=bool)
    boundary = np.ones(vocab_size, dtype=bool)  # ids beyond the tokenizer's vocabulary stay boundary
    for token_id in range(min(sp_vocab, vocab_size)):
        if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id):
            continue
        boundary[token_id] = False
        if sp.is_byte(token_id):
            base[token_id] = 1
            continue
        piece = sp.id_to_piece(token_id)
        if piece.startswith(SPACE):
            leading[token_id] = True
            piece = piece[len(SPACE) :]
        base[token_id] = len(piece.encode("utf-8"))
    for table in (base, leading, boundary):
        table.setflags(write=False)  # shared through the cache
    return ByteTables(base, leading, boundary, sha256, sp_vocab, is_caseops(sp), name)


def is_caseops(sp: spm.SentencePieceProcessor) -> bool:
    """Whether every case operator is a piece of its own (the CaseOps tokenizer has them as ids 4..7)."""
    return all(sp.id_to_piece(sp.piece_to_id(op)) == op for op in CASE_OPERATORS)


def load_byte_tables(path: str | Path, vocab_size: int) -> ByteTables:
    """Tables for ids ``0 .. vocab_size-1`` (the model's vocabulary), cached per tokenizer file version."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such tokenizer file")
    return _load_cached(FileKey.of(path), vocab_size)


@functools.lru_cache(maxsize=32)
def _load_cached(key: FileKey, vocab_size: int) -> ByteTables:
    identity = tokenizer_identity(key.path)  # refuses a file that is not a SentencePiece model, naming it
    sp = spm.SentencePieceProcessor(model_file=key.path)
    return build_byte_tables(sp, vocab_size, identity.sha256, where=key.path, name=identity.name)


def byte_source(
    valset: ValSet,
    tables: ByteTables,
    vocab_size: int,
    checkpoint_tokenizer: str | None = None,
    checkpoint_tokenizer_name: str | None = None,
) -> ByteSource:
    """The bytes for bits per byte of ``valset``: its sidecar (CaseOps) or ``tables``, once ``tables`` (the
    dataset's tokenizer) is known to be the checkpoint's (sha256 ``checkpoint_tokenizer``, when it records
    one) and the data to have what the tokenizer needs."""
    if tables.vocab_size != vocab_size:
        raise EvalError(f"byte tables cover {tables.vocab_size} ids, the model's vocab_size is {vocab_size}")
    if checkpoint_tokenizer is not None and tables.tokenizer_sha256 != checkpoint_tokenizer:
        recorded = f"{checkpoint_tokenizer_name or 'its tokenizer'}, sha256 {checkpoint_tokenizer[:12]}…"
        raise EvalError(
            f"tokenizer {tables.tokenizer_name or 'given'} (sha256 {tables.tokenizer_sha256[:12]}…) is not the one "
            f"this checkpoint records ({recorded}): {valset.describe()} was tokenized for another model (a CaseOps "
            "checkpoint needs CaseOps data, with its byte sidecar), or bits per byte would be counted with the "
            "wrong pieces"
        )
    if tables.caseops and valset.sidecar is None:
        raise EvalError(
            f"{valset.describe()}: no byte sidecar (fineweb_val_bytes_*.bin beside each shard), but tokenizer "
            f"{tables.tokenizer_name or tables.tokenizer_sha256[:12]} is a CaseOps tokenizer: its bits per byte "
            "count the original text's bytes, which only the sidecar gives (frontier spec 5.4)"
        )
    return valset.byte_source(tables)
