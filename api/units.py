"""Per-unit loss sums of one evaluation: what a paired comparison of two results needs.

A *unit* is what the protocol scores as one piece: a document for the document-masked and phased
protocols, a chunk of the stream for the chunked protocol. Two results that scored the same units
(same ``kind`` and the same ``first_token`` offsets) can be compared unit by unit.

On disk the sums live beside the result's JSON as a ``.npz`` of four plain arrays (no pickles):
``save`` writes one, ``load`` reads one back and refuses anything that is not exactly that.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KINDS = ("document", "chunk")
# A units file is four int64/float64 arrays; 50M units is far above any val set (the full FineWeb val
# has about 50k documents and 40M tokens), so this bounds what a hostile file can make us allocate.
MAX_UNITS = 50_000_000
_FIELDS = {"first_token": np.int64, "tokens": np.int64, "bytes": np.int64, "loss_sum": np.float64}


class UnitsError(ValueError):
    """A units file or array set that is not what ``UnitSums`` describes; the message names it."""


@dataclass(frozen=True, eq=False)
class UnitSums:
    """Per-unit sums, all arrays of one length ``n``, in scoring order.

    ``first_token``: the unit's first scored token as an offset in the val stream (its identity across
    runs); ``tokens`` and ``bytes``: what was scored in it; ``loss_sum``: the summed loss in nats.
    """

    kind: str
    first_token: np.ndarray
    tokens: np.ndarray
    bytes: np.ndarray
    loss_sum: np.ndarray

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UnitsError(f"units kind {self.kind!r} is not one of {', '.join(KINDS)}")
        n = None
        for name, dtype in _FIELDS.items():
            arr = np.ascontiguousarray(getattr(self, name), dtype=dtype)
            if arr.ndim != 1:
                raise UnitsError(f"units field {name!r} has shape {arr.shape}, not one dimension")
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise UnitsError(f"units field {name!r} has {arr.shape[0]} entries, {n} expected")
            object.__setattr__(self, name, arr)
        if n is not None and n > MAX_UNITS:
            raise UnitsError(f"{n} units is more than the {MAX_UNITS} allowed")
        if (self.tokens < 0).any() or (self.bytes < 0).any() or (self.first_token < 0).any():
            raise UnitsError("units have a negative token, byte or offset count")
        if not np.isfinite(self.loss_sum).all():
            raise UnitsError("units have a loss sum that is not finite")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def total(self) -> tuple[float, int, int]:
        """(loss_sum, tokens, bytes) over all units."""
        return float(self.loss_sum.sum()), int(self.tokens.sum()), int(self.bytes.sum())

    def identity(self) -> str:
        """A digest of which units these are (kind, offsets, token and byte counts), not of their losses."""
        h = hashlib.sha256(self.kind.encode())
        for name in ("first_token", "tokens", "bytes"):
            h.update(getattr(self, name).tobytes())
        return h.hexdigest()[:16]

    # builtins.bytes: in the class body, ``bytes`` is the field.
    def to_bytes(self) -> builtins.bytes:
        buf = io.BytesIO()
        np.savez(buf, kind=np.array(self.kind), **{name: getattr(self, name) for name in _FIELDS})
        return buf.getvalue()

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: builtins.bytes, *, name: str = "units") -> UnitSums:
        # np.load on a zip opens members lazily; check member names and declared sizes before reading.
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                members = {info.filename: info.file_size for info in zf.infolist()}
        except zipfile.BadZipFile as exc:
            raise UnitsError(f"{name}: not a units file (.npz): {exc}") from None
        expected = {f"{field}.npy" for field in (*_FIELDS, "kind")}
        if set(members) != expected:
            raise UnitsError(f"{name}: members {sorted(members)} are not {sorted(expected)}")
        if sum(members.values()) > len(_FIELDS) * 8 * MAX_UNITS + 4096:
            raise UnitsError(f"{name}: declares {sum(members.values())} bytes, more than any units file holds")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {field: npz[field] for field in _FIELDS}
                kind = str(npz["kind"])
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise UnitsError(f"{name}: unreadable units file: {exc}") from None
        for field, dtype in _FIELDS.items():
            if arrays[field].dtype != dtype:
                raise UnitsError(f"{name}: field {field!r} is {arrays[field].dtype}, not {np.dtype(dtype)}")
        try:
            return cls(kind=kind, **arrays)
        except UnitsError as exc:
            raise UnitsError(f"{name}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> UnitSums:
        path = Path(path)
        size = path.stat().st_size
        if size > len(_FIELDS) * 8 * MAX_UNITS + 65536:
            raise UnitsError(f"{path}: {size} bytes is larger than any units file")
        return cls.from_bytes(path.read_bytes(), name=str(path))
