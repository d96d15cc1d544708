"""The session that serves evaluations: a checkpoint loaded once, evaluated many times, and its results.

``EvalSession`` holds a checkpoint's pristine weights and one working model per (device, precision), reset
before every evaluation; ``evaluate`` runs the protocol ``EvalConfig.protocol`` names (``PROTOCOLS``) on it
and wraps the protocol's run in an ``EvalResult`` with the identities, timings and the full-val projection.
With several ranks, cancel every rank's evaluation: a rank left alone waits in a collective.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Hashable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pgttt import __version__
from pgttt.api.units import UnitSums
from pgttt.checkpoints.config import ModelConfig
from pgttt.checkpoints.layers import cudnn_attention
from pgttt.checkpoints.model import GPT, apply_precision

from .bytes import ByteTables, byte_source, load_byte_tables
from .chunked import CHUNKED
from .config import EvalConfig
from .data import ValSet, load_val
from .distributed import World
from .doc_masked import DOC_MASKED
from .phased import PHASED
from .projection import dataset_family_hint, project_full_eval
from .protocol import CancelEvent, ChunkTrace, Compiled, ProgressFn, Protocol, resolved_shape

ENGINE_VERSION = __version__

# Every protocol, by the name EvalConfig.protocol gives it: a new protocol is a module beside these and an entry here.
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (CHUNKED, PHASED, DOC_MASKED)}


@dataclass
class EvalResult:
    val_loss: float
    val_bpb: float
    loss_sum: float
    tokens_scored: int
    bytes_scored: int
    config: dict[str, Any]  # the resolved EvalConfig: what actually ran
    model_config: dict[str, Any]
    identity: dict[str, Any]  # checkpoint and tokenizer sha256, val fingerprint and files, engine version
    chunks: list[ChunkTrace]
    timings: dict[str, float]  # seconds: load (the session's), data, warmup, scoring, training, eval, total
    tokens_per_second: float  # scored tokens over the evaluation loop's wall time (eval_s)
    peak_gpu_memory_bytes: int | None
    device: str
    world_size: int
    compliance: dict[str, Any]
    # What each unit (a chunk, or a document for doc_masked and phased) scored, in stream order; to_dict gives
    # only its kind, count and identity (the arrays are binary: UnitSums.save writes them beside the JSON).
    units: UnitSums
    # The full val set on 8 GPUs: {"pgttt": this engine's speed, "reference": the record's script on 8xH100
    # (decides fits_budget)}; projected_8gpu_s is pgttt's seconds, reference_8xh100_s the reference's.
    projection: dict[str, Any]
    projected_8gpu_s: float
    reference_8xh100_s: float | None = None
    trained_chunks: int = 0  # chunks trained on after scoring (never the last; 0 with ttt_epochs=0)
    warnings: list[str] = field(default_factory=list)  # e.g. a TTT run that trained on nothing
    # The phased protocol: counts, the phase schedule, the per-batch trace (chunks stays empty).
    protocol: str = "chunked"
    counts: dict[str, int] | None = None
    schedule: dict[str, Any] | None = None
    batches: list[Any] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self, dict_factory=lambda items: {k: v for k, v in items if k != "units"})
        out["units"] = {"kind": self.units.kind, "count": len(self.units), "identity": self.units.identity()}
        return out

    def summary(self) -> str:
        cfg = self.config
        mode, check = PROTOCOLS[cfg["protocol"]].describe(cfg, self.compliance)
        return (
            f"val_loss {self.val_loss:.8f} val_bpb {self.val_bpb:.8f} | {mode} | {self.tokens_scored} tokens "
            f"{self.bytes_scored} bytes ({self.identity['bytes_from']}) | "
            f"{self.timings['eval_s']:.1f}s {self.tokens_per_second:.0f} tok/s | {self.device} x{self.world_size} "
            f"{cfg['precision']} | {check} | full val: pgttt on 8 such devices "
            f"~{self.projected_8gpu_s:.0f}s, reference on 8xH100 ~{self.reference_8xh100_s or math.nan:.0f}s "
            f"({'fits' if self.projection['fits_budget'] else 'over'} the 600 s budget)"
        )


@dataclass
class _Worker:
    """A working model on one device in one precision, its pristine weights there, and its compiled twins."""

    model: GPT
    pristine: dict[str, Tensor]
    lock: threading.Lock = field(default_factory=threading.Lock)
    twins: dict[Hashable, Any] = field(default_factory=dict)  # each protocol's, by its own keys (protocol.Compiled)

    def reset(self) -> None:
        """Copy the pristine weights in place: no re-allocation, so compiled graphs stay valid."""
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.pristine[name])
                p.grad = None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class EvalSession:
    """A checkpoint loaded once: its pristine float32 weights and a working model per (device, precision).

    Every evaluation starts from the pristine weights, so none changes the next one's starting point.
    Evaluations on one working model are serialised by its lock; use separate devices to run in parallel.
    ``cuda_graphs``: replay compiled static training graphs as CUDA graphs (on by default; see
    ``chunked_compiled.Steps``).
    """

    def __init__(
        self,
        model: GPT,
        *,
        checkpoint_sha256: str | None = None,
        tokenizer_sha256: str | None = None,
        tokenizer_name: str | None = None,
        source: str | None = None,
        load_s: float = 0.0,
        cuda_graphs: bool = True,
        preset: str | None = None,
    ) -> None:
        self.template = copy.deepcopy(model).cpu().float().eval().requires_grad_(False)
        self.cuda_graphs = cuda_graphs
        self.checkpoint_sha256 = checkpoint_sha256
        self.tokenizer_sha256 = tokenizer_sha256  # what the checkpoint was trained with, when it says
        self.tokenizer_name = tokenizer_name
        self.source = source
        self.load_s = load_s
        self.preset = preset  # the architecture preset it was made as, when known: its record's TTT defaults
        self._workers: dict[tuple[str, str], _Worker] = {}
        self._lock = threading.Lock()
        # The phased protocol's compiled step replayed as CUDA graphs: off until measured (bench/bench_speed.py).
        self.phased_cuda_graphs = False

    @classmethod
    def from_checkpoint(cls, ckpt: Any, *, load_s: float = 0.0, cuda_graphs: bool = True) -> EvalSession:
        """From a ``LoadedCheckpoint`` (``pgttt.checkpoints.loading``)."""
        from pgttt.checkpoints.loading import build_model

        model = build_model(ckpt, precision="fp32", device="cpu")
        tokenizer = ckpt.tokenizer
        return cls(
            model,
            checkpoint_sha256=ckpt.sha256,
            source=str(ckpt.path),
            load_s=load_s,
            tokenizer_sha256=None if tokenizer is None else tokenizer.sha256,
            tokenizer_name=None if tokenizer is None else tokenizer.name,
            cuda_graphs=cuda_graphs,
            preset=ckpt.provenance.get("preset"),
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        preset: str | None = None,
        overrides: Any = None,
        tokenizer: str | Path | None = None,
        cuda_graphs: bool = True,
    ) -> EvalSession:
        from pgttt.checkpoints.loading import load_checkpoint

        t0 = time.perf_counter()
        ckpt = load_checkpoint(path, preset=preset, overrides=overrides, tokenizer=tokenizer)
        session = cls.from_checkpoint(ckpt, cuda_graphs=cuda_graphs)
        session.load_s = time.perf_counter() - t0
        return session

    @property
    def config(self) -> ModelConfig:
        return self.template.config

    def worker(self, device: torch.device, precision: str) -> _Worker:
        key = (str(device), precision)
        with self._lock:
            if key not in self._workers:
                model = apply_precision(copy.deepcopy(self.template).to(device), precision).eval()
                pristine = {n: p.detach().to(device) for n, p in self.template.named_parameters()}
                self._workers[key] = _Worker(model, pristine)
            return self._workers[key]

    def warmup(
        self,
        config: EvalConfig | None = None,
        *,
        device: str | torch.device | None = None,
        seq_lens: list[int | None] | None = None,
        world_sizes: Iterable[int] = (1,),
        fallback: bool = True,
    ) -> float:
        """Compile every batch shape of ``config`` (at each of ``seq_lens``), so no evaluation compiles;
        training batches get static graphs at the shares of every rank of each of ``world_sizes`` (jobs
        this device may run with others). ``fallback=False`` leaves out the graph that serves shapes no
        warm-up saw (``Protocol.warm_up``): a service ready sooner, which compiles it later with another
        call (``fallback=True``; shapes already compiled are skipped) while evaluations run those shapes
        uncompiled. Returns the seconds spent; nothing happens when compilation is off (the default on CPUs)."""
        device = torch.device(device) if device is not None else default_device()
        config = config or EvalConfig()
        t0 = time.perf_counter()
        for seq_len in seq_lens or [config.seq_len]:  # None: the checkpoint's train_seq_len
            cfg = replace(config, seq_len=seq_len).resolved(self.config, device)
            worker = self.worker(device, resolved_shape(cfg)[1])
            protocol = PROTOCOLS[cfg.protocol]
            with worker.lock, cudnn_attention(protocol.cudnn_attention):
                for size in world_sizes:
                    for rank in range(size):
                        protocol.warm_up(
                            worker.model,
                            self._compiled(worker),
                            cfg,
                            World(rank, size),
                            static_training=True,
                            fallback=fallback,
                        )
        return time.perf_counter() - t0

    def _compiled(self, worker: _Worker) -> Compiled:
        return Compiled(worker.twins, cuda_graphs=self.cuda_graphs, phased_cuda_graphs=self.phased_cuda_graphs)

    def evaluate(
        self,
        val: Any,
        tokenizer: str | Path | ByteTables,
        config: EvalConfig | None = None,
        *,
        device: str | torch.device | None = None,
        progress: ProgressFn | None = None,
        cancel: CancelEvent | None = None,
    ) -> EvalResult:
        """One evaluation. ``val``: a ``ValSet`` or what ``load_val`` takes (a directory, glob or file); the
        bytes of targets come from its sidecar when it has one (CaseOps), else from ``tokenizer``'s tables."""
        t_start = time.perf_counter()
        device = torch.device(device) if device is not None else default_device()
        cfg = (config or EvalConfig()).resolved(self.config, device, preset=self.preset)
        vocab = self.config.vocab_size
        valset = val if isinstance(val, ValSet) else load_val(val, vocab)
        valset.check_vocab(vocab)
        tables = tokenizer if isinstance(tokenizer, ByteTables) else load_byte_tables(tokenizer, vocab)
        source = byte_source(valset, tables, vocab, self.tokenizer_sha256, self.tokenizer_name)
        seq_len, precision = resolved_shape(cfg)
        tokens = valset.trimmed(seq_len, cfg.max_tokens)
        world = World.current()
        protocol = PROTOCOLS[cfg.protocol]
        data_s = time.perf_counter() - t_start

        worker = self.worker(device, precision)
        with worker.lock, cudnn_attention(protocol.cudnn_attention):  # the graphs bake in the kernel they trace
            t0 = time.perf_counter()
            protocol.warm_up(worker.model, self._compiled(worker), cfg, world, tokens=tokens)
            warmup_s = time.perf_counter() - t0
            worker.reset()
            torch.manual_seed(cfg.seed)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            run = protocol.run(worker.model, self._compiled(worker), tokens, source, cfg, world, progress, cancel)
            eval_s = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        tokens_per_second = run.tokens / eval_s if eval_s > 0 else 0.0
        projection = project_full_eval(
            tokens_per_second, world.size, cfg.to_dict(), dataset_family_hint(valset), self.config.to_dict()
        )
        trained = sum(1 for c in run.chunks if c.lr is not None)
        return EvalResult(
            val_loss=run.val_loss,
            val_bpb=run.val_bpb,
            loss_sum=run.loss_sum,
            tokens_scored=run.tokens,
            bytes_scored=run.bytes,
            config=cfg.to_dict(),
            model_config=self.config.to_dict(),
            identity={
                "checkpoint_sha256": self.checkpoint_sha256,
                "checkpoint": self.source,
                "tokenizer_sha256": tables.tokenizer_sha256,
                "val_fingerprint": valset.fingerprint,
                "val_files": [str(f) for f in valset.files],
                "val_byte_files": [str(f) for f in valset.sidecar_files],
                "bytes_from": source.kind,  # "sidecar" (CaseOps, frontier spec 5.4) or "tokenizer"
                "engine_version": ENGINE_VERSION,
            },
            chunks=run.chunks,
            timings={
                "load_s": self.load_s,
                "data_s": data_s,
                "warmup_s": warmup_s,
                "scoring_s": run.scoring_s,
                "training_s": run.training_s,
                **run.other_timings,
                "eval_s": eval_s,
                "total_s": time.perf_counter() - t_start,
            },
            tokens_per_second=tokens_per_second,
            peak_gpu_memory_bytes=peak,
            device=str(device),
            world_size=world.size,
            compliance=run.compliance,
            units=run.units,
            projection=projection,
            projected_8gpu_s=projection["pgttt"]["seconds"],
            reference_8xh100_s=(projection["reference"] or {}).get("seconds"),
            trained_chunks=trained,
            warnings=protocol.warnings(cfg, run),
            protocol=cfg.protocol,
            counts=run.counts,
            schedule=run.schedule,
            batches=run.batches,
        )
