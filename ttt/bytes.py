"""Byte accounting for bits per byte (spec section 2), from the SentencePiece model alone.

Control, unknown and unused pieces (and ids beyond the tokenizer's vocabulary) are boundary tokens
of 0 bytes; a byte-fallback piece is 1 byte; any other piece is the UTF-8 length of its text without
a leading ``▁``, plus one byte for that space unless the previous token is a boundary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pgttt.checkpoints.format import tokenizer_identity

from .data import FileKey
from .errors import EvalError

SPACE = "\u2581"  # ▁, SentencePiece's word-boundary marker


@dataclass(frozen=True)
class ByteTables:
    """Per-id tables sized to the model's vocabulary."""

    base_bytes: np.ndarray  # int64 (vocab,)
    has_leading_space: np.ndarray  # bool (vocab,)
    is_boundary: np.ndarray  # bool (vocab,)
    tokenizer_sha256: str
    tokenizer_vocab_size: int

    @property
    def vocab_size(self) -> int:
        return len(self.base_bytes)

    def target_bytes(self, tokens: np.ndarray) -> np.ndarray:
        """Bytes of every target ``tokens[i+1]`` given its previous token ``tokens[i]``: int64 (len-1,)."""
        ids = np.asarray(tokens, dtype=np.int64)
        prev, target = ids[:-1], ids[1:]
        return self.base_bytes[target] + (self.has_leading_space[target] & ~self.is_boundary[prev])


def build_byte_tables(sp: spm.SentencePieceProcessor, vocab_size: int, sha256: str, *, where: str) -> ByteTables:
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
            piece = piece[len(SPACE):]
        base[token_id] = len(piece.encode("utf-8"))
    for table in (base, leading, boundary):
        table.setflags(write=False)  # shared through the cache
    return ByteTables(base, leading, boundary, sha256, sp_vocab)


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
    return build_byte_tables(sp, vocab_size, identity.sha256, where=key.path)
