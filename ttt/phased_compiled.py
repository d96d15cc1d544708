"""The phased protocol's chunk step, plain (``per_token_loss``) and compiled (``PhasedStep``, the fast twin
``phased_batch.score_batch`` takes as ``chunk_step``).

``PhasedStep`` runs the plain function through ``torch.compile``. Its rows are the batch's documents still
scoring (``ttt_batch_size`` at a batch's start in every batch but the queue's first, fewer as documents end,
at least 2: ``first_row``) and its width a step's longest window (at most ``ttt_eval_seq_len``). Both are
dynamic dimensions of one graph, so every batch and step of a job runs the graph compiled once, unpadded (a
graph makes its own rotary tables; a batch of one document gets a graph of its own, as Dynamo specialises a
size of 1). A model whose RoPE base grows past its train_seq_len
(``rope_yarn``), or ``dynamic=False``, gets static graphs instead, one per (rows, padded width): the width is
rounded up to a power of two, at least ``SMALLEST_WIDTH`` (``bucket``), the extra columns zero ids to the right
of every row (the model is causal, so the scored columns see exactly the inputs they saw). A graph runs forward
and backward; a step without training runs the training graph too (its backward never runs), so no inference
graph is compiled. A graph is compiled on dummy adapters, twice, so that real calls find it ready: by
``warm_up`` (``EvalSession`` warms every batch size of a job's queue before the job, and ``ttt_batch_size`` in
``EvalSession.warmup``), or else when first met. A shape that fails to compile runs the plain step from then on
(``failed`` says why). The LoRA optimizer is the fused one on CUDA (the same formula). With ``cuda_graphs`` the
graphs replay as CUDA graphs (Inductor's ``reduce-overhead``): off unless measured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pgttt.checkpoints.model import GPT, autocast

from .config import EvalConfig
from .documents import find_documents, make_queue, select_documents
from .lora import AdapterSet, lora_optimizer, shapes_for

log = logging.getLogger(__name__)


# The narrowest compiled width: the first few chunk steps of a batch are cheap, and each width is a graph to
# compile (about a minute on an H200). Over gutenberg_caseops at pr1855's defaults, powers of two from 256 pad
# the columns by 28% (from 1: 27%) with 4 graphs per batch size instead of 7.
SMALLEST_WIDTH = 256


def bucket(width: int, rotary_limit: int | None = None, smallest: int = 1) -> int:
    """The compiled width of a step whose longest window has ``width`` columns: the next power of two, at least
    ``smallest``. With ``rotary_limit`` (a model whose RoPE base grows past its train_seq_len) the padding never
    crosses it, and a width beyond it is kept, so the rotary tables stay the plain step's."""
    if rotary_limit is not None and width > rotary_limit:
        return width
    padded = max(1 << (width - 1).bit_length(), smallest)
    return padded if rotary_limit is None else min(padded, rotary_limit)


def step_widths(config: EvalConfig) -> list[int]:
    """Every window width a batch of ``config`` (resolved) has: chunk step c's is min((c+1) size, window)."""
    size, window = config.ttt_chunk_size, config.ttt_eval_seq_len
    assert size is not None and window is not None
    return sorted({min((c + 1) * size, window) for c in range(-(-window // size))})


def batch_sizes(tokens: np.ndarray, config: EvalConfig) -> list[int]:
    """The document counts of the batches ``run_phased`` makes of ``tokens`` with ``config`` (resolved)."""
    assert config.val_doc_fraction is not None and config.ttt_batch_size is not None  # resolved
    docs = select_documents(
        find_documents(tokens), max_docs=config.max_docs, fraction=config.val_doc_fraction, seed=config.seed
    )
    return sorted({len(b.docs) for b in make_queue(docs, config.ttt_batch_size)}, reverse=True)


def per_token_loss(model: GPT, x: Tensor, positions: Tensor, y: Tensor, adapters: AdapterSet, precision: str) -> Tensor:
    """The plain chunk step: cross-entropy (bsz, k) of the targets ``y`` at the window columns ``positions``
    (bsz, k)."""
    with autocast(precision, x.device):
        logits = model.logits_from_hidden(model.forward_hidden(x, positions, adapters=adapters), adapters)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)


class PhasedStep:
    """``__call__`` is ``per_token_loss``'s signature and numbers; ``optimizer`` is ``lora_optimizer``'s."""

    def __init__(
        self,
        *,
        cuda_graphs: bool = False,
        backend: str | Callable = "inductor",
        smallest_width: int = SMALLEST_WIDTH,
        dynamic: bool = True,
    ) -> None:
        self.cuda_graphs, self.smallest_width, self.dynamic = cuda_graphs, smallest_width, dynamic
        self.ready: set[tuple[Any, ...]] = set()
        self.failed: dict[tuple[Any, ...], str] = {}  # shapes that would not compile: why (they run eagerly)
        # A graph per (rows, bucket); a service sees a few chunk sizes and windows: 64 is plenty.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # backend: "aot_eager" traces and guards as Inductor's graphs do without generating code (the CPU tests).
        mode = "reduce-overhead" if cuda_graphs else None
        self.compiled = torch.compile(per_token_loss, dynamic=None if dynamic else False, backend=backend, mode=mode)

    def optimizer(self, params: list[Tensor], **settings: Any) -> torch.optim.Optimizer:
        return lora_optimizer(params, **settings, fused=params[0].is_cuda)

    def __call__(
        self, model: GPT, x: Tensor, positions: Tensor, y: Tensor, adapters: AdapterSet, precision: str
    ) -> Tensor:
        width = self._width(model, x.size(1))
        key = self._key(model, x.size(0), width, positions.size(1), adapters, precision)
        if key not in self.ready and key not in self.failed:
            self._compile(key, model, x.size(0), width, positions.size(1), adapters, precision)
        if key in self.failed:
            return per_token_loss(model, x, positions, y, adapters, precision)
        x = x if width == x.size(1) else F.pad(x, (0, width - x.size(1)))
        return self._run(model, x, positions, y, adapters, precision)

    def first_row(self, model: GPT, finished: int, rows: int) -> int:
        """The first row a step of a batch of ``rows`` documents runs from, when its first ``finished`` are done
        (``phased_batch.score_batch``): the dynamic graph leaves at least 2 rows (one more would be a graph of
        its own); static graphs run every row (every row count would be one)."""
        return min(finished, max(rows - 2, 0)) if self._dynamic(model) else 0

    def warm_up(self, model: GPT, config: EvalConfig, rows: int | None = None) -> None:
        """Compile every shape a batch of ``rows`` documents (default ``ttt_batch_size``) of ``config``
        (resolved) takes; weights unchanged."""
        assert config.ttt_lora_rank is not None and config.precision is not None
        # Resolved (EvalConfig.resolved), every record knob is set.
        assert config.ttt_k_lora is not None and config.ttt_mlp_lora is not None and config.ttt_o_lora is not None
        assert config.ttt_batch_size is not None and config.ttt_chunk_size is not None
        shapes = shapes_for(
            model, config.ttt_lora_rank, k=config.ttt_k_lora, mlp=config.ttt_mlp_lora, o=config.ttt_o_lora
        )
        rows = rows or config.ttt_batch_size
        model.eval().requires_grad_(False)  # as run_phased runs it: graphs guard on it
        device = next(model.parameters()).device
        for width in step_widths(config):  # the plain step's too: no later plain job adds a table graphs read
            model.cache_rotary(width, device)
        a = [torch.zeros(rows, shapes.rank, shapes.model_dim) for _ in shapes.draws()]
        adapters = AdapterSet(shapes, a, config.lora_scale, device)
        # Widest first: a dynamic graph is traced (and its kernels tuned) at the width most of the work has.
        for width in sorted({self._width(model, w) for w in step_widths(config)}, reverse=True):
            key = self._key(model, rows, width, config.ttt_chunk_size, adapters, config.precision)
            if key not in self.ready and key not in self.failed:
                self._compile(key, model, rows, width, config.ttt_chunk_size, adapters, config.precision)

    def _width(self, model: GPT, width: int) -> int:
        """The width a step of ``width`` columns runs at: its own on a dynamic graph, else its bucket."""
        limit = _rotary_limit(model)
        return width if self._dynamic(model) else bucket(width, limit, self.smallest_width)

    def _dynamic(self, model: GPT) -> bool:
        return self.dynamic and _rotary_limit(model) is None

    def _key(
        self, model: GPT, rows: int, width: int, size: int, adapters: AdapterSet, precision: str
    ) -> tuple[Any, ...]:
        """A graph's shape. The dynamic graph serves every width and every row count but 1 (Dynamo specialises
        a dimension of size 1, so a batch of one document has a graph of its own): ``None`` for both."""
        if self._dynamic(model):
            return (id(model), 1 if rows == 1 else None, None, size, adapters.shapes, adapters.scale, precision)
        return (id(model), rows, width, size, adapters.shapes, adapters.scale, precision)

    def _run(self, model: GPT, x: Tensor, positions: Tensor, y: Tensor, adapters: AdapterSet, precision: str) -> Tensor:
        if self._dynamic(model):
            if x.size(0) > 1:  # the rows: every input's first dimension
                for t in (x, positions, y, *adapters.parameters()):
                    torch._dynamo.mark_dynamic(t, 0)
            if x.size(1) > 1:
                torch._dynamo.mark_dynamic(x, 1)  # the window width
        if self.cuda_graphs:
            # A new step: the last replay's outputs (its losses, the gradients it made) are read no more.
            torch.compiler.cudagraph_mark_step_begin()
        if torch.is_grad_enabled():
            return self.compiled(model, x, positions, y, adapters, precision)
        with torch.enable_grad():  # the training graph, not one more graph for a step that does not train
            return self.compiled(model, x, positions, y, adapters, precision).detach()

    def _compile(
        self, key: tuple[Any, ...], model: GPT, rows: int, width: int, size: int, adapters: AdapterSet, precision: str
    ) -> None:
        """Forward and backward on zero inputs and dummy adapters of the real ones' shapes, twice (a guard the
        first call leaves behind, a cache filled on its way, fails on the second, which compiles for good)."""
        device = next(model.parameters()).device
        model.cache_rotary(width, device)  # eagerly, so no graph guards on the rotary cache
        dummy = AdapterSet(
            adapters.shapes, [torch.zeros(rows, *a.shape[1:]) for a in adapters.a], adapters.scale, device
        )
        live = dummy.rows_from(0)  # views, as score_batch passes them
        x = torch.zeros(rows, width, dtype=torch.long, device=device)
        positions = torch.arange(width - size, width, device=device).expand(rows, size)
        y = torch.zeros(rows, size, dtype=torch.long, device=device)
        try:
            for _ in range(2):
                with torch.enable_grad():
                    self._run(model, x, positions, y, live, precision).sum().backward()
                for t in dummy.parameters():  # as score_batch does: a replay's gradients are never read later
                    t.grad = None
        except Exception as exc:  # noqa: BLE001 - any compile failure: this shape runs the plain step
            log.warning("phased step %s does not compile, it runs eagerly: %s", key[1:4], exc)
            self.failed[key] = f"{type(exc).__name__}: {exc}"
            return
        self.ready.add(key)


def _rotary_limit(model: GPT) -> int | None:
    config = model.config
    return config.train_seq_len if config.rope_yarn else None
