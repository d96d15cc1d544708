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


def check_compliance(log: ComplianceLog, total_targets: int) -> dict[str, Any]:
    """The compliance record of an evaluation of ``total_targets`` targets (positions ``1 .. T``)."""
    violations: list[str] = []
    scores = sorted((e for e in log.events if e.kind == "score"), key=lambda e: (e.start, e.end))
    trains = [e for e in log.events if e.kind == "train"]
    span_tokens = sum(e.end - e.start for e in scores)

    position = 1  # the next position that must be scored
    for e in scores:
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
