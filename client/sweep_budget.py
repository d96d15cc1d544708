"""A sweep's points against the eval budget before any is run: the reference's predicted seconds on 8xH100.

Client-side and torch-free (:mod:`pgttt.budget`): a point's fields are its settings, its dataset name picks the
val family, the model is the records' shape (the client does not know the checkpoint's). ``max_tokens`` does
not enter: the budget is about the full val set.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgttt.budget import BudgetError, Estimate, estimate, settings_from_dict
from pgttt.client.sweep_spec import Point


@dataclass(frozen=True)
class Screened:
    point: Point
    estimate: Estimate | None
    problem: str | None = None  # why there is no estimate

    @property
    def over(self) -> bool:
        return self.estimate is not None and not self.estimate.fits_budget


def screen(points: list[Point], budget_s: float) -> list[Screened]:
    out = []
    for p in points:
        try:
            out.append(Screened(p, estimate(settings_from_dict(p.fields), dataset=p.dataset, budget_s=budget_s)))
        except BudgetError as exc:
            out.append(Screened(p, None, str(exc)))
    return out


def describe(s: Screened) -> str:
    if s.estimate is None:
        return f"{s.point.label()}: no reference estimate ({s.problem})"
    e = s.estimate
    verdict = "over" if s.over else "within"
    return (
        f"{s.point.label()}: reference ~{e.seconds:.0f} s on 8xH100 (band {e.low:.0f}-{e.high:.0f} s), "
        f"{verdict} {e.budget_s:g} s ({e.confidence:.0%} confident)"
    )
