"""The compliance record: a log of what was scored and trained on, and the check of the rules.

Spans are half-open ranges of token positions in the val stream. A ``score`` span ``[a, b)`` says
the predictions of ``val[a:b]`` were scored; a ``train`` span says an update read ``val[a:b]``
(inputs and targets). The check, at the end of an evaluation: the scored spans cover positions
``1 .. T`` exactly once (``val[0]`` is context only, never predicted), the tokens counted as scored
equal ``T``, and every train span lies within ``val[0]`` plus the spans scored before it (rule 3 of
the challenge's reading: no token influences the weights before its own score is final).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Literal

MAX_VIOLATIONS = 10


@dataclass(frozen=True)
class Span:
    kind: Literal["score", "train"]
    chunk: int
    start: int
    end: int


@dataclass
class ComplianceLog:
    events: list[Span] = field(default_factory=list)
    observed_scored: int = 0  # tokens the scoring batches actually counted (their masks), not the plan

    def score(self, chunk: int, spans: list[tuple[int, int]], observed: int) -> None:
        self.events.extend(Span("score", chunk, a, b) for a, b in spans)
        self.observed_scored += observed

    def train(self, chunk: int, spans: list[tuple[int, int]]) -> None:
        self.events.extend(Span("train", chunk, a, b) for a, b in spans)

    @classmethod
    def merge(cls, logs: list[ComplianceLog]) -> ComplianceLog:
        """One log from every rank's: all scoring of a chunk precedes its first update, because the
        gradient all-reduce waits for every rank, so events are ordered by (chunk, score before train)."""
        events = sorted((e for log in logs for e in log.events), key=lambda e: (e.chunk, e.kind != "score"))
        return cls(events, sum(log.observed_scored for log in logs))


class _Covered:
    """A union of disjoint half-open intervals, kept sorted and merged."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, a: int, b: int) -> None:
        i = bisect.bisect_left(self.ends, a)  # first interval that ends at or after a
        j = bisect.bisect_right(self.starts, b)  # intervals before j start at or before b
        if i < j:
            a, b = min(a, self.starts[i]), max(b, self.ends[j - 1])
        self.starts[i:j], self.ends[i:j] = [a], [b]

    def contains(self, a: int, b: int) -> bool:
        i = bisect.bisect_right(self.starts, a) - 1
        return i >= 0 and self.ends[i] >= b


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _minus(spans: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of merged ``spans`` outside merged ``cut``."""
    out = []
    for a, b in spans:
        for c, d in cut:
            if d <= a or c >= b:
                continue
            if c > a:
                out.append((a, c))
            a = max(a, d)
        if a < b:
            out.append((a, b))
    return out


def _coverage_violations(scores: list[Span], expected: list[tuple[int, int]]) -> list[str]:
    """Scored spans against the positions that must each be scored once (``expected``, any order)."""
    violations, reached = [], None
    for e in scores:
        if reached is not None and e.start < reached:
            violations.append(f"positions {e.start}..{min(e.end, reached) - 1} scored more than once (chunk {e.chunk})")
        reached = e.end if reached is None else max(reached, e.end)
    union, want = _merged([(e.start, e.end) for e in scores]), _merged(expected)
    violations += [f"positions {a}..{b - 1} never scored" for a, b in _minus(want, union)]
    violations += [f"positions {a}..{b - 1} scored outside the evaluated targets" for a, b in _minus(union, want)]
    return violations


def check_compliance(
    log: ComplianceLog, total_targets: int, expected: list[tuple[int, int]] | None = None
) -> dict[str, Any]:
    """The compliance record of an evaluation of ``total_targets`` targets: positions ``1 .. T``, or the
    spans ``expected`` (the phased protocol's selected documents) holding that many positions."""
    violations: list[str] = []
    scores = sorted((e for e in log.events if e.kind == "score"), key=lambda e: (e.start, e.end))
    trains = [e for e in log.events if e.kind == "train"]
    span_tokens = sum(e.end - e.start for e in scores)

    position = total_targets + 1 if expected is not None else 1  # the next position that must be scored
    if expected is not None:
        violations += _coverage_violations(scores, expected)
        scores_in_order: list[Span] = []
    else:
        scores_in_order = scores
    for e in scores_in_order:
        if e.start > position:
            violations.append(f"positions {position}..{e.start - 1} never scored")
        elif e.start < position:
            twice = f"{e.start}..{min(e.end, position) - 1}"
            violations.append(f"positions {twice} scored more than once (chunk {e.chunk})")
        position = max(position, e.end)
    if position < total_targets + 1:
        violations.append(f"positions {position}..{total_targets} never scored")
    elif position > total_targets + 1:
        violations.append(f"positions {total_targets + 1}..{position - 1} scored beyond the end of the stream")
    if log.observed_scored != total_targets or span_tokens != total_targets:
        violations.append(
            f"{log.observed_scored} tokens counted by the scoring batches and {span_tokens} in scored spans, "
            f"for {total_targets} targets"
        )
    exactly_once = not violations

    covered = _Covered()
    covered.add(0, 1)  # val[0] is context, never predicted
    before_update = True
    for e in log.events:
        if e.kind == "score":
            covered.add(e.start, e.end)
        elif not covered.contains(e.start, e.end):
            before_update = False
            violations.append(
                f"chunk {e.chunk} trained on positions {e.start}..{e.end - 1} before they were all scored"
            )

    return {
        "scored_exactly_once": exactly_once,
        "score_before_update": before_update,
        "targets": total_targets,
        "scored_tokens": log.observed_scored,
        "score_spans": len(scores),
        "train_spans": len(trains),
        "trained_positions": sum(e.end - e.start for e in trains),
        "violations": violations[:MAX_VIOLATIONS],
        "violation_count": len(violations),
    }


def verdict(record: dict[str, Any]) -> str:
    """The summary line's word on a record of ``check_compliance``."""
    ok = record["scored_exactly_once"] and record["score_before_update"]
    return f"compliance {'ok' if ok else 'VIOLATED'}"
