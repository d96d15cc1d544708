"""Documents of the val stream, their selection, batches, queue and chunk windows (frontier spec 2.2-2.4).

Pure index arithmetic on numpy arrays and lists; no torch. Positions are val-stream positions: document
``(start, length)`` holds tokens ``start .. start+length-1`` (its last one is the next document's BOS)
and predicts targets ``start+1 .. start+length-1``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from .errors import DataError

BOS_ID = 1  # the records' BOS (SentencePiece <s>); documents start at it


@dataclass(frozen=True)
class Doc:
    index: int  # in the stream
    start: int
    length: int  # tokens, including the next document's BOS

    @property
    def targets(self) -> int:
        return self.length - 1


@dataclass(frozen=True)
class Batch:
    index: int  # orig_batch_idx: position in the ascending-length order
    docs: tuple[Doc, ...]

    @property
    def longest(self) -> int:
        return max(d.length for d in self.docs)


def find_documents(tokens: np.ndarray) -> list[Doc]:
    """Spec 2.2: a document from each BOS to the next, plus that next BOS; the last one to the stream's end."""
    ids = np.asarray(tokens)
    if len(ids) < 2 or int(ids[0]) != BOS_ID:
        first = int(ids[0]) if len(ids) else None
        raise DataError(
            f"the phased protocol needs a stream that starts with BOS (id {BOS_ID}) and holds a target; "
            f"this one starts with {first!r} and has {len(ids)} tokens"
        )
    starts = np.flatnonzero(ids == BOS_ID)
    ends = np.append(starts[1:] + 1, len(ids))
    docs = [Doc(i, int(s), int(e - s)) for i, (s, e) in enumerate(zip(starts, ends, strict=True))]
    if docs[-1].length < 2:
        raise DataError(
            f"the stream's last token (position {len(ids) - 1}) is a BOS: its document has no target "
            "(the record's loader asserts here); cut the stream elsewhere (max_tokens)"
        )
    return docs


def select_documents(docs: list[Doc], *, max_docs: int | None, fraction: float, seed: int) -> list[Doc]:
    """The stream's first ``max_docs`` documents, then the record's VAL_DOC_FRACTION subset of those: a
    ``random.Random(seed)`` sample of round(n * fraction) (at least 1), in stream order."""
    chosen = docs if max_docs is None else docs[:max_docs]
    if fraction >= 1.0:
        return list(chosen)
    count = max(1, int(round(len(chosen) * fraction)))
    return [chosen[i] for i in sorted(random.Random(seed).sample(range(len(chosen)), count))]


def make_queue(docs: list[Doc], batch_size: int) -> list[Batch]:
    """Spec 2.3: documents sorted by length (stable), cut into batches numbered in that order; the queue
    runs by descending longest document (stable: equal maxima keep ascending batch numbers)."""
    ordered = sorted(docs, key=lambda d: d.length)
    batches = [Batch(i, tuple(ordered[a : a + batch_size])) for i, a in enumerate(range(0, len(ordered), batch_size))]
    return sorted(batches, key=lambda b: -b.longest)


@dataclass(frozen=True)
class Window:
    """Spec 2.4: chunk ``c`` of a document with ``m`` targets, scored in one window inside the document."""

    start: int  # prediction index of the window's first input (document-relative)
    length: int  # inputs in the window
    chunk_offset: int  # window column of the chunk's first target
    chunk_length: int  # targets in the chunk


def chunk_window(c: int, targets: int, chunk_size: int, eval_seq_len: int) -> Window:
    num_chunks = -(-targets // chunk_size)
    end = targets if c == num_chunks - 1 else (c + 1) * chunk_size
    start = max(0, end - eval_seq_len)
    return Window(start, end - start, c * chunk_size - start, end - c * chunk_size)


def num_chunks(doc: Doc, chunk_size: int) -> int:
    return -(-doc.targets // chunk_size)
