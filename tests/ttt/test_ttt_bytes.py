"""Byte accounting (spec section 2) against a direct per-piece reading, on the real tokenizers and others."""

from __future__ import annotations

import hashlib
import io
import random

import numpy as np
import pytest
import sentencepiece as spm

from pgttt.errors import PgtttError
from pgttt.ttt.bytes import build_byte_tables, load_byte_tables
from pgttt.ttt.errors import EvalError


def direct_bytes(sp, token_id: int) -> tuple[int, bool, bool]:
    """(base bytes, leading space, boundary) read straight off one piece."""
    if token_id >= sp.vocab_size():
        return 0, False, True
    piece = sp.id_to_piece(token_id)
    if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id):
        return 0, False, True
    if sp.is_byte(token_id):
        assert piece.startswith("<0x") and piece.endswith(">")
        return 1, False, False
    if piece[0] == "\u2581":
        return len(piece[1:].encode("utf-8")), True, False
    return len(piece.encode("utf-8")), False, False


@pytest.mark.parametrize("which", ["sp1024_tokenizer", "sp8192_tokenizer"])
def test_tables_match_each_piece_on_the_real_tokenizers(which, request):
    path = request.getfixturevalue(which)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    vocab = sp.vocab_size() + 16  # a model vocabulary larger than the tokenizer's
    tables = load_byte_tables(path, vocab)
    assert tables.vocab_size == vocab and tables.tokenizer_vocab_size == sp.vocab_size()
    assert tables.tokenizer_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for token_id in range(vocab):
        base, space, boundary = direct_bytes(sp, token_id)
        assert tables.base_bytes[token_id] == base, token_id
        assert tables.has_leading_space[token_id] == space, token_id
        assert tables.is_boundary[token_id] == boundary, token_id
    assert tables.is_boundary[sp.vocab_size() :].all()
    assert tables.is_boundary[[0, 1, 2, 3]].all()  # <pad> <s> </s> <unk>
    assert tables.base_bytes[[0, 1, 2, 3]].tolist() == [0, 0, 0, 0]


def test_byte_counts_of_real_text_equal_its_utf8_length(sp8192_tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(sp8192_tokenizer))
    tables = load_byte_tables(sp8192_tokenizer, 8192)
    text = "Thou art more lovely — and more temperate: «naïve» 東京 🎭 café"
    ids = [1] + sp.encode(text)  # [BOS] + ids, as in the shards
    assert any(sp.is_byte(i) for i in ids)  # the emoji and kanji fall back to bytes
    assert int(tables.target_bytes(np.array(ids)).sum()) == len(text.encode("utf-8"))
    # A leading space counts one byte after a non-boundary token, none after BOS.
    the = sp.piece_to_id("\u2581the")
    assert sp.id_to_piece(the) == "\u2581the" and tables.has_leading_space[the]
    assert tables.target_bytes(np.array([ids[-1], the])).tolist() == [4]
    assert tables.target_bytes(np.array([1, the])).tolist() == [3]


class FakePieces:
    """A SentencePiece-like vocabulary with every kind of piece, including unused ones."""

    def __init__(self, pieces: list[tuple[str, str]]) -> None:
        self.pieces = pieces

    def vocab_size(self) -> int:
        return len(self.pieces)

    def id_to_piece(self, i: int) -> str:
        return self.pieces[i][0]

    def piece_to_id(self, piece: str) -> int:
        return next((i for i, (p, _) in enumerate(self.pieces) if p == piece), 0)

    def is_control(self, i: int) -> bool:
        return self.pieces[i][1] == "control"

    def is_unknown(self, i: int) -> bool:
        return self.pieces[i][1] == "unknown"

    def is_unused(self, i: int) -> bool:
        return self.pieces[i][1] == "unused"

    def is_byte(self, i: int) -> bool:
        return self.pieces[i][1] == "byte"


def test_every_kind_of_piece():
    sp = FakePieces(
        [
            ("<unk>", "unknown"),
            ("<s>", "control"),
            ("<0xE2>", "byte"),
            ("\u2581", "normal"),
            ("\u2581caf\u00e9", "normal"),
            ("ing", "normal"),
            ("\u2581\u2581x", "normal"),
            ("<reserved>", "unused"),
            ("\u00e9\u2581", "normal"),
        ]
    )
    tables = build_byte_tables(sp, 10, "sha", where="fake")
    assert tables.base_bytes.tolist() == [0, 0, 1, 0, 5, 3, 4, 0, 5, 0]
    assert tables.has_leading_space.tolist() == [False, False, False, True, True, False, True, False, False, False]
    assert tables.is_boundary.tolist() == [True, True, False, False, False, False, False, True, False, True]
    # A leading space counts unless the previous token is a boundary (control, unknown, unused, beyond vocab).
    assert tables.target_bytes(np.array([5, 4, 1, 4, 7, 3, 9, 3, 2, 3])).tolist() == [6, 0, 5, 0, 0, 0, 0, 1, 1]


def test_model_vocab_smaller_than_the_tokenizer_keeps_only_model_ids():
    sp = FakePieces([("<unk>", "unknown"), ("\u2581", "normal"), ("ab", "normal"), ("abc", "normal")])
    tables = build_byte_tables(sp, 3, "sha", where="fake")
    assert tables.base_bytes.tolist() == [0, 0, 2]


def _train_tokenizer(text: list[str], **kwargs) -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=out, vocab_size=40, model_type="bpe", minloglevel=2, **kwargs
    )
    return out.getvalue()


def test_tokenizer_without_its_own_space_piece_is_refused(tmp_path):
    rng = random.Random(0)
    words = ["abc", "bcd", "cde", "xyz", "qrs"]
    text = ["".join(rng.choice(words) for _ in range(20)) for _ in range(200)]  # no spaces at all
    path = tmp_path / "nospace.model"
    path.write_bytes(_train_tokenizer(text, add_dummy_prefix=False))
    with pytest.raises(EvalError, match=rf"{path}: the tokenizer has no piece '\u2581' of its own"):
        load_byte_tables(path, 40)


def test_unreadable_or_invalid_tokenizer(tmp_path):
    with pytest.raises(EvalError, match="no such tokenizer file"):
        load_byte_tables(tmp_path / "missing.model", 10)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(PgtttError, match=rf"{bad}: not a SentencePiece model"):
        load_byte_tables(bad, 10)
