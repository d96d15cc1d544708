"""The budget oracle: the reference evaluators' TTT-loop seconds on 8xH100, predicted from the settings.

Seconds = theta . features (``cost``), theta fitted per protocol family to the logged times in
``calibration.json`` (weighted least squares on relative error, theta >= 0). Phased TTT's features come
from simulating the 8 ranks, which depends on theta; the fit alternates simulation and least squares until
the schedule settles. The band is a 90 % interval from the seed-to-seed spread of the logs (node speed)
and the fit's own residuals. Plain Python and numpy: no torch.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from pgttt.api.challenge import EVAL_BUDGET_S

from .cost import CHUNKED_FEATURES, PHASED_FEATURES, REFERENCE_GPUS, chunked_features, phased_work, simulate_phased
from .settings import (
    FAMILIES,
    ChunkedSettings,
    ModelShape,
    PhasedSettings,
    Settings,
    ValFamily,
    as_dict,
    family_for,
    make_settings,
)

BUDGET_S = EVAL_BUDGET_S
BAND_Z = 1.645  # a 90 % interval
FIT_ROUNDS = 5
COUNTED = {
    "chunked": "the quantized_ttt stage's timer: every sliding window scored and every chunk but the last trained "
    "on, on 8 ranks; the torch.compile of forward_logits runs inside that timer and is counted",
    "phased": "total_eval_time: eval_val_ttt_phased, i.e. LoRA scoring and training of every document on 8 ranks "
    "claiming batches first-come-first-served, the global-SGD phases and the barrier waits before them",
}
NOT_COUNTED = {
    "chunked": "artifact loading, and the stages the 04-09 family times separately and adds to its total: the "
    "quantized roundtrip eval (8-27 s in the logs) and the sliding-window eval (84-129 s)",
    "phased": "the compile warm-up before the timer (82-305 s in the logs), deserializing the artifact (16-24 s for "
    "lrzip) and the diagnostic quantized eval",
}


@dataclass(frozen=True)
class Row:
    """One configuration of the calibration table."""

    id: str
    protocol: str
    family: ValFamily
    settings: Settings
    shape: ModelShape
    gpus: int
    targets: int | None
    seconds: tuple[float, ...]
    global_s: float | None
    use: bool
    source: str
    compile_in_timer: bool = True
    sdpa: bool = False
    tail_s: float | None = None  # logged seconds after the last phase pause (the short documents)

    @property
    def config(self) -> tuple[Any, ...]:
        """What makes a configuration: rows with the same key are more seeds of it (other runs, nodes, stacks)."""
        return (
            self.protocol,
            self.family.name,
            self.settings,
            self.shape,
            self.gpus,
            self.targets,
            self.compile_in_timer,
            self.sdpa,
        )


@lru_cache(maxsize=1)
def calibration_rows() -> tuple[Row, ...]:
    """The calibration table shipped with the package (``calibration.json``)."""
    data = json.loads(resources.files(__package__).joinpath("calibration.json").read_text())
    rows = []
    for r in data["rows"]:
        shape = ModelShape(**{**{"vocab_size": FAMILIES[r["dataset"]].vocab_size}, **r.get("model", {})})
        rows.append(
            Row(
                r["id"],
                r["protocol"],
                FAMILIES[r["dataset"]],
                make_settings(r["protocol"], r["settings"]),
                shape,
                int(r.get("gpus", REFERENCE_GPUS)),
                r.get("targets"),
                tuple(r["seconds"]),
                statistics.fmean(r["global_s"]) if r.get("global_s") else None,
                bool(r["use"]),
                r["source"],
                bool(r.get("compile_in_timer", True)),
                r.get("attention") == "sdpa",
                statistics.fmean(r["tail_s"]) if r.get("tail_s") else None,
            )
        )
    return tuple(rows)


# ---- fitting -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Configuration:
    """The used rows that share one key: their seeds pooled."""

    rows: tuple[Row, ...]

    @property
    def id(self) -> str:
        return "+".join(r.id for r in self.rows)

    @property
    def first(self) -> Row:
        return self.rows[0]

    @property
    def mean_s(self) -> float:
        return statistics.fmean(s for r in self.rows for s in r.seconds)

    @property
    def global_s(self) -> float | None:
        logged = [r.global_s for r in self.rows if r.global_s]
        return statistics.fmean(logged) if logged else None

    @property
    def tail_s(self) -> float | None:
        logged = [r.tail_s for r in self.rows if r.tail_s]
        return statistics.fmean(logged) if logged else None


def configurations(protocol: str | None = None) -> list[Configuration]:
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for r in calibration_rows():
        if r.use and (protocol is None or r.protocol == protocol):
            groups.setdefault(r.config, []).append(r)
    return [Configuration(tuple(rows)) for rows in groups.values()]


@dataclass(frozen=True)
class Fit:
    protocol: str
    theta: np.ndarray
    theta_global: float = 0.0
    rel_rms: float = 0.0  # residual spread of the fit (log), corrected for the constants fitted


_PRIOR = np.array([0.005, 0.005, 0.01, 0.0075])  # s per TFLOP, per TFLOP, per step, per G adapter params
_PRIOR_GLOBAL = 0.08  # s per global-SGD chunk-epoch


@lru_cache(maxsize=256)
def _work(settings: PhasedSettings, family: ValFamily, shape: ModelShape, lengths: tuple[int, ...] | None):
    return phased_work(settings, family, shape, lengths)


def _features(
    row: Row, fit_: Fit | None, lengths: tuple[int, ...] | None = None
) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Features of the critical path, the global-SGD units and (phased) the last segment's features."""
    if isinstance(row.settings, ChunkedSettings):
        feats = chunked_features(
            row.settings, row.family, row.shape, row.gpus, row.targets, row.compile_in_timer, row.sdpa
        )
        return feats, 0.0, None
    theta, tg = (fit_.theta, fit_.theta_global) if fit_ is not None else (_PRIOR, _PRIOR_GLOBAL)
    run = simulate_phased(row.settings, _work(row.settings, row.family, row.shape, lengths), theta, tg, row.gpus)
    return run.critical, run.global_units, run.last


def _nnls_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """theta >= 0 minimising sum(((x theta - y) / y)^2): least squares with an active set."""
    a, b = x / y[:, None], np.ones_like(y)
    free = list(range(x.shape[1]))
    while True:
        theta = np.zeros(x.shape[1])
        sol, *_ = np.linalg.lstsq(a[:, free], b, rcond=None)
        theta[free] = sol
        negative = [j for j in free if theta[j] < 0]
        if not negative:
            return theta
        free.remove(min(negative, key=lambda j: theta[j]))


def fit(protocol: str, exclude: str | None = None) -> Fit:
    """Constants of one protocol family from its configurations, less the one whose id is ``exclude``."""
    configs = [c for c in configurations(protocol) if c.id != exclude]
    y = np.array([c.mean_s for c in configs])
    current: Fit | None = None
    for _ in range(1 if protocol == "chunked" else FIT_ROUNDS):
        found = [_features(c.first, current) for c in configs]
        x, units = np.array([f[0] for f in found]), np.array([f[1] for f in found])
        logged = [c.global_s / u for c, u in zip(configs, units, strict=True) if c.global_s and u > 0]
        tg = statistics.median(logged) if logged else 0.0
        # a logged tail (seconds after the last pause) is one more equation: it sets per-step against per-FLOP cost
        tails = [(f[2], c.tail_s) for c, f in zip(configs, found, strict=True) if c.tail_s and f[2] is not None]
        xs = np.array([*(x), *(t[0] for t in tails)])
        ys = np.array([*(y - tg * units), *(t[1] for t in tails)])
        current = Fit(protocol, _nnls_relative(xs, ys), tg)
    assert current is not None
    pred = x @ current.theta + current.theta_global * units
    dof = max(1, len(configs) - int(np.count_nonzero(current.theta)) - (protocol == "phased"))
    rms = math.sqrt(float(np.sum(np.log(pred / y) ** 2)) / dof)
    return Fit(protocol, current.theta, current.theta_global, rms)


@lru_cache(maxsize=4)
def fitted(protocol: str) -> Fit:
    return fit(protocol)


@lru_cache(maxsize=1)
def node_spread() -> float:
    """Spread (std of log seconds) of every seed about its configuration's pooled mean: node speed, run to run
    and stack to stack with the same settings."""
    logs = [math.log(s / c.mean_s) for c in configurations() for r in c.rows for s in r.seconds]
    return statistics.pstdev(logs)


def predict(row: Row, fit_: Fit, lengths: tuple[int, ...] | None = None) -> tuple[float, dict[str, float]]:
    """Predicted seconds for a row's settings, and their split by feature."""
    x, units, _ = _features(row, fit_, lengths)
    names = CHUNKED_FEATURES if isinstance(row.settings, ChunkedSettings) else PHASED_FEATURES
    parts = {n: float(v * t) for n, v, t in zip(names, x, fit_.theta, strict=True)}
    if units:
        parts["global_sgd"] = float(fit_.theta_global * units)
    return sum(parts.values()), parts


def leave_one_out(protocol: str | None = None) -> list[dict[str, Any]]:
    """For every configuration: the prediction of a fit without it, against its logged pooled mean."""
    out = []
    for c in configurations(protocol):
        seconds, _ = predict(c.first, fit(c.first.protocol, exclude=c.id))
        out.append(
            {
                "id": c.id,
                "protocol": c.first.protocol,
                "predicted_s": seconds,
                "logged_s": c.mean_s,
                "seeds": sum(len(r.seconds) for r in c.rows),
                "error": seconds / c.mean_s - 1.0,
            }
        )
    return out


# ---- the estimate --------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """The reference's TTT-loop seconds on 8xH100 for one setting, with its band and the budget verdict."""

    seconds: float
    low: float
    high: float
    budget_s: float
    fits_budget: bool
    confidence: float  # probability (under the band's log-normal) that fits_budget is right
    protocol: str
    family: str
    targets: int
    gpus: int
    settings: dict[str, Any]
    breakdown: dict[str, float]
    counted: str
    not_counted: str
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "fits" if self.fits_budget else "over"
        return (
            f"reference {self.protocol} on 8xH100: ~{self.seconds:.0f} s "
            f"(90 % band {self.low:.0f}-{self.high:.0f} s); {verdict} the {self.budget_s:g} s budget "
            f"({self.confidence:.0%} confident)"
        )


def estimate(
    settings: Settings,
    *,
    dataset: str | None = None,
    family: ValFamily | None = None,
    shape: ModelShape | None = None,
    budget_s: float = BUDGET_S,
    lengths: tuple[int, ...] | None = None,
) -> Estimate:
    """Predict the reference evaluator's timed TTT loop for ``settings`` on the full val set of ``dataset``."""
    fam = family or family_for(dataset)
    shape = shape or ModelShape(vocab_size=fam.vocab_size)
    f = fitted(settings.protocol)
    row = Row("estimate", settings.protocol, fam, settings, shape, REFERENCE_GPUS, None, (), None, True, "")
    seconds, parts = predict(row, f, lengths)
    spread = math.hypot(node_spread(), f.rel_rms)
    low, high = seconds * math.exp(-BAND_Z * spread), seconds * math.exp(BAND_Z * spread)
    fits = seconds <= budget_s
    p_within = statistics.NormalDist().cdf(math.log(budget_s / seconds) / spread) if seconds > 0 else 1.0
    assumptions = [
        f"{fam.name}: {fam.targets:,} targets in {fam.documents:,} documents (records.md 1.1)",
        "8 ranks of H100 80GB SXM, as the records ran; PyTorch and kernels as in their logs",
        f"model: {shape.applications} layer applications of width {shape.model_dim}, MLP {shape.mlp_mult:g}x, "
        f"vocab {shape.vocab_size}",
        f"band: seed-to-seed spread {node_spread():.1%} (node speed) and fit residuals {f.rel_rms:.1%}, 90 %",
    ]
    if isinstance(settings, PhasedSettings):
        assumptions.append(
            "document lengths: "
            + (
                "the dataset's own"
                if lengths
                else "a skewed log-normal fitted to the logged longest batch and phase pauses (budget/cost.py)"
            )
        )
    return Estimate(
        seconds,
        low,
        high,
        budget_s,
        fits,
        p_within if fits else 1.0 - p_within,
        settings.protocol,
        fam.name,
        fam.targets,
        REFERENCE_GPUS,
        as_dict(settings),
        parts,
        COUNTED[settings.protocol],
        NOT_COUNTED[settings.protocol],
        assumptions,
    )
