"""The emulated ranks' adapter sets (frontier spec 2.6), their A drawn on a thread ahead of the batches.

Each emulated rank (``Lane``) draws its sets' A from its own CPU generator, in the record's order
(``lora.DrawStream``): a reusable set of ``ttt_batch_size`` slots is built at the start and after each
phase, drawn lazily when first used; a batch of another size gets a brand-new set; without
``ttt_warm_start_a`` every batch re-draws its A. A set's draws are hundreds of millions of CPU uniforms at the
records' sizes (64 slots x rank 80 x 512 x 86 adapters: about 1.3 s), so ``DrawAhead`` makes them on one
thread, in exactly the order the evaluation takes them (``plan``), one batch ahead: the device works on a
batch while the next one's A is drawn. The values are those of drawing in line; only the timing moves.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import EvalConfig
from .lora import AdapterSet, DrawStream, Shapes
from .schedule import segments, virtual_rank


@dataclass
class Draw:
    """What one batch's adapters need from its lane's generator: ``new``, the A of a brand-new set (a batch of
    another size); ``first``, the A of the reusable set's first use; ``redraw``, the A a batch re-draws."""

    new: list[Tensor] | None = None
    first: list[Tensor] | None = None
    redraw: list[Tensor] | None = None


class Lane:
    """One emulated rank: its draw stream (CPU side, ``build`` and ``draw``, in the lane's order) and its
    reusable adapter set on the device (``adapters``)."""

    def __init__(self, seed: int) -> None:
        self.draws = DrawStream(seed)
        self.pending: Tensor | None = None  # the generator state a built set is drawn from when first used
        self.reusable: AdapterSet | None = None

    def build(self, shapes: Shapes, bsz: int) -> None:
        """A new reusable set (at the start and after each phase), drawn when first used."""
        self.pending = self.draws.reserve(shapes, bsz)

    def draw(self, shapes: Shapes, bsz: int, config: EvalConfig) -> Draw:
        """The draws of the next batch of ``bsz`` documents this lane takes."""
        if bsz != config.ttt_batch_size:  # another size: a brand-new set
            return Draw(new=self.draws.draw(shapes, bsz))
        first = None
        if self.pending is not None:
            first, self.pending = DrawStream.draw_from(self.pending, shapes, bsz), None
        return Draw(first=first, redraw=None if config.ttt_warm_start_a else self.draws.draw(shapes, bsz))

    def adapters(self, draw: Draw, shapes: Shapes, config: EvalConfig, device: torch.device) -> AdapterSet:
        """The adapters of the batch ``draw`` was made for, B = 0."""
        if draw.new is not None:
            return AdapterSet(shapes, draw.new, config.lora_scale, device)
        if draw.first is not None:
            self.reusable = AdapterSet(shapes, draw.first, config.lora_scale, device)
        assert self.reusable is not None  # a lane's first batch of ttt_batch_size follows a build
        self.reusable.reset(draw.redraw)
        return self.reusable


def plan(queue_sizes: Sequence[int], pauses: list[int], lanes: Sequence[int], emulate_ranks: int) -> Iterator:
    """The lanes' generator work in an order that gives ``run_phased``'s draws: ("batch", lane, size) for every
    batch of these lanes, in queue order, each after the ("build", lane)s its lane owes. A lane builds at the
    start and after every phase whose weights still score a batch; each lane has its own generator, so a build
    waits for its lane's next batch (a lane none of whose batches follows owes nothing anyone reads)."""
    owed = dict.fromkeys(lanes, 1)
    for seg, (first, last) in enumerate(segments(len(queue_sizes), pauses)):
        for q in range(first, last):
            v = virtual_rank(q, pauses, emulate_ranks)
            if v in owed:
                yield from [("build", v)] * owed[v]
                owed[v] = 0
                yield ("batch", v, queue_sizes[q])
        if seg < len(pauses) and pauses[seg] < len(queue_sizes):
            owed = {v: n + 1 for v, n in owed.items()}


class DrawAhead:
    """Runs ``plan`` on a thread; ``next()`` returns the next batch's ``Draw`` (the thread's error, if it had
    one), and the thread stays at most one batch ahead. ``close`` stops it (a cancelled or failed evaluation).
    ``pin``: the draws come in pinned memory (for a CUDA device: their copies there do not stop the host)."""

    def __init__(
        self, lanes: dict[int, Lane], work: Iterator, shapes: Shapes, config: EvalConfig, *, pin: bool = False
    ) -> None:
        assert config.ttt_batch_size is not None  # resolved (EvalConfig.resolved)
        self._batch_size, self._pin = config.ttt_batch_size, pin
        self._ready: queue.Queue[Draw | BaseException] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(lanes, work, shapes, config), name="pgttt-lora-draws", daemon=True
        )
        self._thread.start()

    def _run(self, lanes: dict[int, Lane], work: Iterator, shapes: Shapes, config: EvalConfig) -> None:
        try:
            for kind, v, *size in work:
                if kind == "build":
                    lanes[v].build(shapes, self._batch_size)
                elif not self._put(self._pinned(lanes[v].draw(shapes, size[0], config))):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the evaluation, which raises it
            self._put(exc)

    def _pinned(self, draw: Draw) -> Draw:
        if not self._pin:
            return draw
        new, first, redraw = ([t.pin_memory() for t in a] if a is not None else None for a in vars(draw).values())
        return Draw(new, first, redraw)

    def _put(self, item: Draw | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> Draw:
        while True:
            try:
                item = self._ready.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._ready.empty():
                    raise RuntimeError("the LoRA draw plan has no more batches: it and run_phased disagree") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> DrawAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
