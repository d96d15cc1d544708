"""Per-unit loss sums as a protocol scores them, merged over ranks into ``pgttt.api.units.UnitSums``.

A protocol adds what it scored of each unit (a chunk or a document, keyed by its index) as it goes; a unit
scored in parts (a document split across batches or ranks) adds up. ``sums`` gives them in stream order.
"""

from __future__ import annotations

import numpy as np

from pgttt.api.units import UnitSums

from .distributed import World


class UnitLog:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.rows: dict[int, list] = {}  # key -> [first_token, tokens, bytes, loss_sum]

    def add(self, key: int, first_token: int, tokens: int, nbytes: int, loss_sum: float) -> None:
        """``first_token``: the stream position of the part's first scored target (target i is position i + 1)."""
        row = self.rows.get(key)
        if row is None:
            self.rows[key] = [first_token, tokens, nbytes, loss_sum]
        else:
            row[:] = [min(row[0], first_token), row[1] + tokens, row[2] + nbytes, row[3] + loss_sum]

    def sums(self, world: World | None = None) -> UnitSums:
        """The units, every rank's merged when ``world`` is given and distributed (each rank gets them all)."""
        merged = self
        if world is not None and world.distributed:
            merged = UnitLog(self.kind)
            for rows in world.all_gather(self.rows):  # rank order: a split unit's parts add up alike everywhere
                for key, row in rows.items():
                    merged.add(key, *row)
        rows = sorted(merged.rows.values(), key=lambda r: r[0])
        return UnitSums(
            self.kind,
            first_token=np.array([r[0] for r in rows], dtype=np.int64),
            tokens=np.array([r[1] for r in rows], dtype=np.int64),
            bytes=np.array([r[2] for r in rows], dtype=np.int64),
            loss_sum=np.array([r[3] for r in rows], dtype=np.float64),
        )
