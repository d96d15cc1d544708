"""Training batches: random whole sequences from the training shards, resumable from two integers.

The shards are cut into sequences of ``seq_len + 1`` tokens starting at multiples of ``seq_len``
(inputs and shifted targets). Epoch ``e`` visits them in a permutation drawn from ``(seed, e)``, so
the loader's whole state is ``(epoch, index)`` and a step's global batch is the same whatever the
number of ranks: each rank takes its own micro-batches of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from pgttt.errors import PgtttError


class LoaderError(PgtttError, ValueError):
    """Training data that cannot feed the asked batch shape."""


class SequenceLoader:
    def __init__(self, shards: Sequence[np.ndarray], seq_len: int, seed: int) -> None:
        self.shards, self.seq_len, self.seed = list(shards), seq_len, seed
        counts = np.array([max(0, (len(s) - 1) // seq_len) for s in self.shards], dtype=np.int64)
        self.num_sequences = int(counts.sum())
        if self.num_sequences == 0:
            total = sum(len(s) for s in self.shards)
            raise LoaderError(f"training data: {total} tokens hold no sequence of train_seq_len={seq_len} (+1)")
        self._ends = np.cumsum(counts)
        self._starts = self._ends - counts
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)

    def next_indices(self, count: int) -> np.ndarray:
        """The global sequence indices of the next ``count`` sequences (crossing epochs as needed)."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            take = min(count - filled, self.num_sequences - self.index)
            out[filled : filled + take] = self._order[self.index : self.index + take]
            filled += take
            self.index += take
            if self.index == self.num_sequences:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return out

    def sequences(self, indices: np.ndarray) -> Tensor:
        """(len(indices), seq_len + 1) int64 tokens."""
        shard_ids = np.searchsorted(self._ends, indices, side="right")
        rows = []
        for shard, index in zip(shard_ids.tolist(), indices.tolist(), strict=True):
            offset = (index - int(self._starts[shard])) * self.seq_len
            rows.append(np.asarray(self.shards[shard][offset : offset + self.seq_len + 1], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if not 0 <= index < self.num_sequences:
            raise LoaderError(f"loader state index={index}: the training data has {self.num_sequences} sequences")
        self.epoch, self.index = epoch, index
        self._order = self._permutation(epoch)


def micro_batches(
    loader: SequenceLoader, batch_tokens: int, num_micro: int, rank: int, world_size: int
) -> list[Tensor]:
    """This rank's micro-batches of the next global batch of ``batch_tokens`` tokens."""
    per_micro = batch_tokens // (loader.seq_len * num_micro)
    indices = loader.next_indices(per_micro * num_micro)
    return [loader.sequences(indices[m * per_micro : (m + 1) * per_micro]) for m in range(rank, num_micro, world_size)]


def check_batch_shape(batch_tokens: int, seq_len: int, num_micro: int, world_size: int) -> None:
    if num_micro % world_size:
        raise LoaderError(f"grad_accum_micro_batches={num_micro}: must be a multiple of the {world_size} ranks")
    if batch_tokens % (seq_len * num_micro):
        raise LoaderError(
            f"train_batch_tokens={batch_tokens}: must be a multiple of train_seq_len * grad_accum_micro_batches"
            f" = {seq_len} * {num_micro}"
        )
