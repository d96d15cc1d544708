"""Paired comparison of two evaluations that scored the same units: Δval_bpb with a bootstrap interval.

Both results scored the same documents (or chunks) of one checkpoint on one val set, so their per-unit loss
sums pair up: Δ = bpb(B) - bpb(A) from the totals, and a percentile interval from resampling units with
replacement, the same draw for A and B (``bootstrap``). Negative Δ: B is better. Results of different
checkpoints, val sets or unit sets are refused (``CompareError`` names the field). Torch-free: the server's
``GET /jobs/{a}/compare/{b}`` and ``pgttt compare`` both use it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pgttt.api.units import UnitsError, UnitSums
from pgttt.errors import PgtttError

LN2 = math.log(2.0)
RESAMPLES = 2000
CONFIDENCE = 0.95
TOP = 5
MAX_RESAMPLES = 100_000
# Index draws per block of resamples: bounds the memory of one block (8 bytes each) whatever the unit count.
_BLOCK_DRAWS = 1 << 22
# A units file whose total loss gives another val_bpb than its result's belongs to another result.
_BPB_RTOL = 1e-6


class CompareError(PgtttError):
    """Two results that cannot be compared unit by unit; ``field`` names what differs, ``a``/``b`` its values."""

    def __init__(self, field: str, message: str, a: Any = None, b: Any = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.a, self.b = field, a, b


@dataclass(frozen=True)
class Side:
    """One result as a comparison needs it: a label, what it evaluated, its resolved config and its units."""

    label: str
    units: UnitSums
    checkpoint: str | None = None  # the name, used when a sha256 is missing
    checkpoint_sha256: str | None = None
    val_fingerprint: str | None = None
    tokenizer_sha256: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    val_bpb: float | None = None  # what the result says, checked against the units' totals

    @classmethod
    def from_result(cls, label: str, result: dict[str, Any], units: UnitSums, checkpoint: str | None = None) -> Side:
        """From an engine result (``EvalResult.to_dict()``, as a job or ``pgttt eval --json`` has it)."""
        identity = result.get("identity") or {}
        return cls(
            label,
            units,
            checkpoint or identity.get("checkpoint"),
            identity.get("checkpoint_sha256"),
            identity.get("val_fingerprint"),
            identity.get("tokenizer_sha256"),
            result.get("config") or {},
            result.get("val_bpb"),
        )

    @property
    def bpb(self) -> float:
        loss, _, nbytes = self.units.total
        return loss / LN2 / nbytes


@dataclass(frozen=True)
class Contributor:
    """One unit's share of Δ: ``delta_bpb`` is its loss difference over all the bytes (they sum to Δ)."""

    first_token: int
    tokens: int
    bytes: int
    delta_loss: float  # nats, B minus A
    delta_bpb: float
    bpb_a: float | None  # the unit's own bits per byte (None: it has no bytes)
    bpb_b: float | None


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    kind: str
    units: int
    tokens: int
    bytes: int
    bpb_a: float
    bpb_b: float
    delta_bpb: float  # bpb_b - bpb_a
    low: float  # the paired bootstrap interval of delta_bpb
    high: float
    confidence: float
    resamples: int
    seed: int
    improved: float  # share of units whose loss B lowered
    worsened: float
    contributors: list[Contributor]
    differs: dict[str, list[Any]]  # config fields whose values differ: [A's, B's]

    @property
    def verdict(self) -> str:
        if self.high < 0:
            return "B is better: the interval is below 0"
        if self.low > 0:
            return "B is worse: the interval is above 0"
        return "no clear difference: the interval holds 0"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Comparison:
        data = {k: v for k, v in data.items() if k != "verdict"}
        return cls(**{**data, "contributors": [Contributor(**c) for c in data["contributors"]]})

    def table(self) -> str:
        """A short text report: both sides, Δ with its interval, the shares, what differs, the largest units."""
        pct = f"{self.confidence:.0%}"
        lines = [
            f"A  {self.a}  val_bpb {self.bpb_a:.8f}",
            f"B  {self.b}  val_bpb {self.bpb_b:.8f}",
            f"Δval_bpb (B - A) {self.delta_bpb:+.6f}  {pct} interval [{self.low:+.6f}, {self.high:+.6f}]  "
            f"(paired bootstrap over {self.units} {self.kind}s, {self.resamples} resamples, seed {self.seed})",
            f"{self.verdict}; B lowered the loss of {self.improved:.1%} of {self.kind}s, raised it on "
            f"{self.worsened:.1%}",
        ]
        if self.differs:
            lines.append("differs: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in self.differs.items()))
        if self.contributors:
            lines += [
                f"largest contributors ({self.kind}s by |Δ| share):",
                f"  {'first_token':>11} {'tokens':>7} {'bytes':>7} {'bpb A':>8} {'bpb B':>8} {'Δ share':>10}",
            ]
            for c in self.contributors:
                lines.append(
                    f"  {c.first_token:>11} {c.tokens:>7} {c.bytes:>7} {_bpb(c.bpb_a):>8} {_bpb(c.bpb_b):>8} "
                    f"{c.delta_bpb:>+10.6f}"
                )
        return "\n".join(lines)


def _bpb(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def check_comparable(a: Side, b: Side) -> None:
    """Refuse (CompareError naming the field) what a paired comparison cannot pair."""
    if a.checkpoint_sha256 and b.checkpoint_sha256:
        if a.checkpoint_sha256 != b.checkpoint_sha256:
            raise CompareError(
                "checkpoint",
                f"A is sha256 {a.checkpoint_sha256[:12]}, B is sha256 "
                f"{b.checkpoint_sha256[:12]}: a paired comparison needs one checkpoint",
                a.checkpoint_sha256,
                b.checkpoint_sha256,
            )
    elif a.checkpoint != b.checkpoint:
        raise CompareError(
            "checkpoint",
            f"A is {a.checkpoint!r}, B is {b.checkpoint!r}: a paired comparison needs one checkpoint",
            a.checkpoint,
            b.checkpoint,
        )
    for name in ("val_fingerprint", "tokenizer_sha256"):
        va, vb = getattr(a, name), getattr(b, name)
        if va != vb:
            raise CompareError(
                "dataset",
                f"A's {name} is {str(va)[:12]}, B's is {str(vb)[:12]}: the results scored different val sets",
                va,
                vb,
            )
    for side in (a, b):
        if len(side.units) == 0:
            raise CompareError("units", f"{side.label} has no units")
        if side.units.total[2] <= 0:
            raise CompareError("units", f"{side.label}: its units hold no bytes")
        if side.val_bpb is not None and not math.isclose(side.bpb, side.val_bpb, rel_tol=_BPB_RTOL):
            raise CompareError(
                "units",
                f"{side.label}: its units' totals give val_bpb {side.bpb:.8f}, the result "
                f"says {side.val_bpb:.8f}: the units file is not this result's",
                side.bpb,
                side.val_bpb,
            )
    ua, ub = a.units, b.units
    if ua.kind != ub.kind:
        raise CompareError(
            "units.kind", f"A scored {ua.kind}s, B scored {ub.kind}s (different protocols)", ua.kind, ub.kind
        )
    if ua.identity() != ub.identity():
        if len(ua) != len(ub):
            why = f"A has {len(ua)} {ua.kind}s, B has {len(ub)}"
        else:
            name, i = next(
                (n, int(np.flatnonzero(getattr(ua, n) != getattr(ub, n))[0]))
                for n in ("first_token", "tokens", "bytes")
                if not np.array_equal(getattr(ua, n), getattr(ub, n))
            )
            why = f"{ua.kind} {i} has {name} {getattr(ua, name)[i]} in A, {getattr(ub, name)[i]} in B"
        raise CompareError(
            "units",
            f"the results scored different {ua.kind}s ({why}; different documents, max_tokens/max_docs or chunking)",
            ua.identity(),
            ub.identity(),
        )


def bootstrap(
    delta_loss: np.ndarray, nbytes: np.ndarray, resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """The percentile interval of Δbpb = Σ delta_loss / (ln 2 Σ bytes) over units drawn with replacement (one draw
    for both sides: they share the units, so their bytes are the same). Vectorised in blocks of resamples."""
    n = len(delta_loss)
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    block = max(1, _BLOCK_DRAWS // n)
    for start in range(0, resamples, block):
        k = min(block, resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        with np.errstate(divide="ignore", invalid="ignore"):  # a draw of only byte-less units: no ratio
            stats[start : start + k] = delta_loss[idx].sum(axis=1) / nbytes[idx].sum(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.nanquantile(stats / LN2, [tail, 1.0 - tail])
    return float(low), float(high)


def compare(
    a: Side, b: Side, *, resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0, top: int = TOP
) -> Comparison:
    """B against A: Δval_bpb from the totals, its paired bootstrap interval, shares, the largest contributors."""
    if not 1 <= resamples <= MAX_RESAMPLES:
        raise CompareError("resamples", f"{resamples}: must be within 1..{MAX_RESAMPLES}", resamples)
    if not 0 < confidence < 1:
        raise CompareError("confidence", f"{confidence}: must be strictly between 0 and 1", confidence)
    if top < 0:
        raise CompareError("top", f"{top}: must be 0 or more", top)
    check_comparable(a, b)
    u = a.units
    d = b.units.loss_sum - a.units.loss_sum
    _, tokens, nbytes = u.total
    low, high = bootstrap(d, u.bytes, resamples, confidence, seed)
    share = d / (LN2 * nbytes)
    order = np.argsort(-np.abs(share), kind="stable")[:top]
    with np.errstate(divide="ignore", invalid="ignore"):
        unit_a = a.units.loss_sum / (LN2 * u.bytes)
        unit_b = b.units.loss_sum / (LN2 * u.bytes)
    contributors = [
        Contributor(
            int(u.first_token[i]),
            int(u.tokens[i]),
            int(u.bytes[i]),
            float(d[i]),
            float(share[i]),
            _finite(unit_a[i]),
            _finite(unit_b[i]),
        )
        for i in order
    ]
    differs = {
        k: [a.config.get(k), b.config.get(k)]
        for k in sorted(set(a.config) | set(b.config))
        if a.config.get(k) != b.config.get(k)
    }
    return Comparison(
        a.label,
        b.label,
        u.kind,
        len(u),
        tokens,
        nbytes,
        a.bpb,
        b.bpb,
        b.bpb - a.bpb,
        low,
        high,
        confidence,
        resamples,
        seed,
        float(np.mean(d < 0)),
        float(np.mean(d > 0)),
        contributors,
        differs,
    )


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# ---- result files ---------------------------------------------------------------------------------------------
def units_path(json_path: str | Path) -> Path:
    """Where ``pgttt eval --json OUT.json`` puts the units: ``OUT.units.npz`` beside it."""
    json_path = Path(json_path)
    stem = json_path.name[: -len(".json")] if json_path.name.endswith(".json") else json_path.name
    return json_path.with_name(stem + ".units.npz")


def load_side(path: str | Path) -> Side:
    """A result JSON written by ``pgttt eval --json OUT.json`` and the units file it names."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except OSError as exc:
        raise CompareError("result", f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CompareError("result", f"{path}: not JSON: {exc}") from None
    entry = result.get("units") if isinstance(result, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise CompareError("units", f"{path}: names no units file (written by `pgttt eval --json OUT.json`?)")
    file = path.parent / entry["file"]
    if Path(entry["file"]).name != entry["file"]:
        raise CompareError("units", f"{path}: units file {entry['file']!r} is not a file name beside it")
    try:
        units = UnitSums.load(file)
    except OSError as exc:
        raise CompareError("units", f"{file}: cannot read: {exc.strerror or exc}") from None
    except UnitsError as exc:
        raise CompareError("units", str(exc)) from None
    return Side.from_result(str(path), result, units)
