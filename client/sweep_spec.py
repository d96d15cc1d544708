"""A sweep's spec: the YAML file, its validation, and its expansion into points.

A spec names checkpoint(s) and dataset(s) and the values to try for any evaluation field: a grid (cartesian
product), explicit points and random samples, each repeated per seed. Every point is keyed by a hash of its
request (:func:`request_key`), which is how a results file knows what already ran. Every error names the file
and the key; only types are checked here (the server checks ranges). No HTTP, no torch.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import random
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from pgttt.api.schemas import EvalRequest
from pgttt.errors import PgtttError

# The evaluation fields a point may set and the JSON type each takes, read off the HTTP request model (so a knob
# the server accepts is sweepable without an edit here); the server checks ranges and answers 422 naming the
# field, so only types are checked here, before anything is submitted.
_NOT_SETTINGS = ("checkpoint", "dataset", "force", "wait", "wait_timeout_s")


def field_kinds(model: type[BaseModel] = EvalRequest) -> dict[str, type]:
    """Each evaluation field of a request model and its JSON type: int, float, str (choices too), bool or list."""

    def base(annotation: Any) -> Any:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        kind = typing.get_origin(args[0]) or args[0] if args else annotation
        return str if kind is typing.Literal else kind

    return {n: base(f.annotation) for n, f in model.model_fields.items() if n not in _NOT_SETTINGS}


KINDS: dict[str, type] = field_kinds()
SPEC_KEYS = ("checkpoint", "dataset", "fixed", "grid", "points", "random", "seeds", "force")
DISTRIBUTIONS = ("uniform", "loguniform", "choice")


class SweepError(PgtttError):
    """A sweep that cannot run: a bad spec, a server that refuses, servers that disagree or are all gone."""


@dataclass(frozen=True)
class Point:
    """One evaluation to run: checkpoint, dataset and the request fields, with the key that identifies it."""

    checkpoint: str
    dataset: str
    fields: dict[str, Any]
    key: str

    @classmethod
    def make(cls, checkpoint: str, dataset: str, fields: dict[str, Any]) -> Point:
        return cls(checkpoint, dataset, dict(sorted(fields.items())), request_key(checkpoint, dataset, fields))

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.fields.items()) or "(engine defaults)"


def request_key(checkpoint: str, dataset: str, fields: dict[str, Any]) -> str:
    """A stable hash of a request: SHA-256 of its canonical JSON (sorted keys, no spaces), 16 hex digits."""
    canonical = json.dumps(
        {"checkpoint": checkpoint, "dataset": dataset, "config": fields},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SweepSpec:
    """A validated spec. ``expand()`` gives its points in a fixed order, duplicates removed."""

    checkpoints: tuple[str, ...]
    datasets: tuple[str, ...]
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]
    points: tuple[dict[str, Any], ...]
    samples: tuple[dict[str, Any], ...]
    seeds: tuple[int, ...]
    force: bool = False

    def expand(self) -> list[Point]:
        varied: list[dict[str, Any]] = []
        if self.grid:
            names = list(self.grid)
            varied += [dict(zip(names, combo, strict=True)) for combo in itertools.product(*self.grid.values())]
        varied += [dict(p) for p in self.points] + [dict(s) for s in self.samples]
        varied = varied or [{}]
        seeds: list[dict[str, Any]] = [{"seed": s} for s in self.seeds] or [{}]
        out: dict[str, Point] = {}
        for checkpoint, dataset, fields_, seed in itertools.product(self.checkpoints, self.datasets, varied, seeds):
            point = Point.make(checkpoint, dataset, {**self.fixed, **fields_, **seed})
            out.setdefault(point.key, point)
        return list(out.values())


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec (YAML); every error names the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SweepError(f"{path}: cannot read the sweep spec: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML: {exc}") from exc
    return parse_spec(data, where=str(path))


def parse_spec(data: Any, *, where: str = "spec") -> SweepSpec:
    """Validate a spec already parsed from YAML/JSON (see :func:`load_sweep`)."""

    def fail(key: str, problem: str) -> SweepError:
        return SweepError(f"{where}: {key}: {problem}")

    if not isinstance(data, dict):
        raise SweepError(f"{where}: expected a mapping with keys {', '.join(SPEC_KEYS)}, got {_kind(data)}")
    for key in data:
        if key not in SPEC_KEYS:
            raise fail(str(key), f"unknown key{_suggest(key, SPEC_KEYS)}; known: {', '.join(SPEC_KEYS)}")
    for key in ("checkpoint", "dataset"):
        if key not in data:
            raise SweepError(f"{where}: {key}: missing (name a {key} the server knows, or a list of them)")

    def names(key: str) -> tuple[str, ...]:
        value = data[key]
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) and v for v in items):
            raise fail(key, f"expected a name or a non-empty list of names, got {value!r}")
        return tuple(dict.fromkeys(items))

    def mapping(key: str) -> dict[str, Any]:
        value = data.get(key) or {}
        if not isinstance(value, dict):
            raise fail(key, f"expected a mapping of field: value, got {_kind(value)}")
        return value

    fixed = {name: _check_value(f"fixed.{name}", name, v, fail) for name, v in mapping("fixed").items()}

    grid: dict[str, list[Any]] = {}
    for name, values in mapping("grid").items():
        _check_name(f"grid.{name}", name, fail)
        if not isinstance(values, list) or not values:
            raise fail(f"grid.{name}", f"expected a non-empty list of values, got {values!r}")
        grid[name] = [_check_value(f"grid.{name}[{i}]", name, v, fail) for i, v in enumerate(values)]

    points_raw = data.get("points") or []
    if not isinstance(points_raw, list):
        raise fail("points", f"expected a list of mappings (field: value), got {_kind(points_raw)}")
    points = []
    for i, point in enumerate(points_raw):
        if not isinstance(point, dict) or not point:
            raise fail(f"points[{i}]", f"expected a non-empty mapping of field: value, got {point!r}")
        points.append({name: _check_value(f"points[{i}].{name}", name, v, fail) for name, v in point.items()})

    samples = _parse_random(data.get("random"), fail)

    seeds_raw = data.get("seeds") or []
    if not isinstance(seeds_raw, list) or not all(_is_int(s) and s >= 0 for s in seeds_raw):
        raise fail("seeds", f"expected a list of non-negative integers, got {seeds_raw!r}")
    force = data.get("force", False)
    if not isinstance(force, bool):
        raise fail("force", f"expected true or false, got {force!r}")

    # A field set in two places would be ambiguous: say where.
    varied_sources = [("grid", set(grid))] + [(f"points[{i}]", set(p)) for i, p in enumerate(points)]
    varied_sources += [("random.fields", set(samples[0]) if samples else set())]
    for source, keys in varied_sources:
        for name in sorted(keys & set(fixed)):
            raise fail(f"{source}.{name}", "also set in fixed: set it in one place")
        if seeds_raw and "seed" in keys:
            raise fail(f"{source}.seed", "also given by seeds: set it in one place")
    if seeds_raw and "seed" in fixed:
        raise fail("fixed.seed", "also given by seeds: set it in one place")
    return SweepSpec(
        checkpoints=names("checkpoint"),
        datasets=names("dataset"),
        fixed=fixed,
        grid=grid,
        points=tuple(points),
        samples=tuple(samples),
        seeds=tuple(dict.fromkeys(seeds_raw)),
        force=force,
    )


def _parse_random(spec: Any, fail: Callable[[str, str], SweepError]) -> list[dict[str, Any]]:
    """Random points: ``{samples: N, seed: S, fields: {name: {uniform|loguniform: [lo, hi]} | {choice: [...]}}}``.
    Fields are drawn in name order from one ``random.Random(seed)``; floats keep 6 significant digits."""
    if spec is None:
        return []
    if not isinstance(spec, dict):
        raise fail("random", f"expected a mapping with samples, seed and fields, got {_kind(spec)}")
    for key in spec:
        if key not in ("samples", "seed", "fields"):
            raise fail(f"random.{key}", f"unknown key{_suggest(key, ('samples', 'seed', 'fields'))}")
    samples, seed, fields_ = spec.get("samples"), spec.get("seed"), spec.get("fields")
    if not _is_int(samples) or samples < 1:
        raise fail("random.samples", f"expected a positive integer, got {samples!r}")
    if not _is_int(seed):
        raise fail("random.seed", f"expected an integer (the samples are drawn from it), got {seed!r}")
    if not isinstance(fields_, dict) or not fields_:
        raise fail("random.fields", f"expected a mapping of field: distribution, got {fields_!r}")
    draws: dict[str, Callable[[random.Random], Any]] = {}
    for name in sorted(fields_):
        draws[name] = _distribution(f"random.fields.{name}", name, fields_[name], fail)
    rng = random.Random(seed)
    return [{name: draw(rng) for name, draw in draws.items()} for _ in range(samples)]


def _distribution(
    key: str, name: str, spec: Any, fail: Callable[[str, str], SweepError]
) -> Callable[[random.Random], Any]:
    _check_name(key, name, fail)
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise fail(
            key, f"expected one of {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, {{choice: [...]}}; got {spec!r}"
        )
    ((kind, args),) = spec.items()
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise fail(f"{key}.choice", f"expected a non-empty list of values, got {args!r}")
        values = [_check_value(f"{key}.choice[{i}]", name, v, fail) for i, v in enumerate(args)]
        return lambda rng: rng.choice(values)
    if KINDS[name] not in (int, float):
        raise fail(f"{key}.{kind}", f"{name} is not numeric: use choice")
    if not (isinstance(args, list) and len(args) == 2 and all(a is not None for a in args)):
        raise fail(f"{key}.{kind}", f"expected [low, high], got {args!r}")
    low, high = (_check_value(f"{key}.{kind}[{i}]", name, a, fail) for i, a in enumerate(args))
    if low > high:
        raise fail(f"{key}.{kind}", f"expected [low, high] with low <= high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise fail(f"{key}.loguniform", f"low={low!r}: must be positive")
    integer = KINDS[name] is int

    def draw(rng: random.Random) -> Any:
        if kind == "uniform":
            x = rng.uniform(low, high)
        else:
            x = math.exp(rng.uniform(math.log(low), math.log(high)))
        return min(max(round(x), low), high) if integer else float(f"{x:.6g}")

    return draw


def _check_name(key: str, name: Any, fail: Callable[[str, str], SweepError]) -> None:
    if name not in KINDS:
        raise fail(key, f"unknown evaluation field{_suggest(name, KINDS)}; known: {', '.join(KINDS)}")


def _check_value(key: str, name: str, value: Any, fail: Callable[[str, str], SweepError]) -> Any:
    """The value in canonical JSON type for the field (ints stay ints, numbers become floats), or an error."""
    _check_name(key, name, fail)
    if value is None:
        return None  # sent as null: the engine's own default ("what the checkpoint or device implies")
    kind = KINDS[name]
    if kind is int:
        if not _is_int(value):
            raise fail(key, f"{name} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        if not _is_number(value) or not math.isfinite(value):
            raise fail(key, f"{name} must be a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise fail(key, f"{name} must be a string, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise fail(key, f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(value, str):  # a list field: one pattern, or a list of them
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise fail(key, f"{name} must be a list of parameter-name patterns, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _suggest(word: Any, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
