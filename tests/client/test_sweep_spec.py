"""Sweep specs: validation with errors naming the key, expansion (grid, points, random, seeds), request keys."""

from __future__ import annotations

import hashlib
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgttt.client.sweep_spec import Point, SweepError, load_sweep, parse_spec, request_key


def spec(**extra) -> dict:
    return {"checkpoint": "demo", "dataset": "demo", **extra}


def test_grid_is_the_cartesian_product_first_key_slowest():
    points = parse_spec(
        spec(grid={"ttt_epochs": [0, 1, 3], "chunk_tokens": [8192, 32768]}, fixed={"max_tokens": 65536})
    ).expand()
    assert [(p.fields["ttt_epochs"], p.fields["chunk_tokens"]) for p in points] == [
        (0, 8192),
        (0, 32768),
        (1, 8192),
        (1, 32768),
        (3, 8192),
        (3, 32768),
    ]
    assert all(p.fields["max_tokens"] == 65536 and p.checkpoint == "demo" and p.dataset == "demo" for p in points)
    assert len({p.key for p in points}) == 6


def test_every_setting_the_server_takes_is_sweepable_with_its_type():
    # The phased protocol's knobs come from the HTTP request model: no list here to keep in step with it.
    from pgttt.api.schemas import EvalRequest
    from pgttt.client import sweep_spec

    settings = set(EvalRequest.model_fields) - {"checkpoint", "dataset", "force", "wait", "wait_timeout_s"}
    assert set(sweep_spec.KINDS) == settings
    points = parse_spec(
        spec(
            fixed={"protocol": "phased", "ttt_warm_start_a": False},
            grid={"ttt_chunk_size": [32, 48], "ttt_lora_lr": [1e-4, 3]},
        )
    ).expand()
    assert [(p.fields["ttt_chunk_size"], p.fields["ttt_lora_lr"]) for p in points] == [
        (32, 1e-4),
        (32, 3.0),
        (48, 1e-4),
        (48, 3.0),
    ]
    assert all(p.fields["ttt_warm_start_a"] is False and p.fields["protocol"] == "phased" for p in points)
    with pytest.raises(SweepError, match="ttt_k_lora must be true or false"):
        parse_spec(spec(fixed={"ttt_k_lora": 1}))
    with pytest.raises(SweepError, match="ttt_chunk_size must be an integer"):
        parse_spec(spec(grid={"ttt_chunk_size": [4.5]}))


def test_explicit_points_follow_the_grid_and_duplicates_are_dropped():
    points = parse_spec(
        spec(grid={"ttt_epochs": [0, 1]}, points=[{"ttt_epochs": 1}, {"ttt_epochs": 2, "ttt_lr": 0.01}])
    ).expand()
    assert [p.fields for p in points] == [{"ttt_epochs": 0}, {"ttt_epochs": 1}, {"ttt_epochs": 2, "ttt_lr": 0.01}]


def test_no_varied_field_is_one_point_of_engine_defaults():
    (point,) = parse_spec(spec()).expand()
    assert point.fields == {} and point.label() == "(engine defaults)"


def test_seeds_repeat_every_point_and_checkpoints_multiply():
    points = parse_spec(spec(checkpoint=["a", "b"], grid={"ttt_epochs": [1, 2]}, seeds=[0, 1, 2])).expand()
    assert len(points) == 2 * 2 * 3
    assert [(p.checkpoint, p.fields["ttt_epochs"], p.fields["seed"]) for p in points[:4]] == [
        ("a", 1, 0),
        ("a", 1, 1),
        ("a", 1, 2),
        ("a", 2, 0),
    ]


def test_random_samples_are_reproducible_within_bounds_and_typed():
    random_spec = {
        "samples": 20,
        "seed": 7,
        "fields": {
            "ttt_lr": {"loguniform": [1e-4, 1e-1]},
            "ttt_momentum": {"uniform": [0.8, 0.95]},
            "chunk_tokens": {"loguniform": [4096, 65536]},
            "ttt_epochs": {"uniform": [1, 4]},
            "optimizer": {"choice": ["sgd", "adamw"]},
        },
    }
    first = parse_spec(spec(random=random_spec)).expand()
    again = parse_spec(spec(random=random_spec)).expand()
    other = parse_spec(spec(random={**random_spec, "seed": 8})).expand()
    assert [p.fields for p in first] == [p.fields for p in again]
    assert [p.fields for p in first] != [p.fields for p in other]
    assert len(first) == 20
    for p in first:
        f = p.fields
        assert 1e-4 <= f["ttt_lr"] <= 1e-1 and 0.8 <= f["ttt_momentum"] <= 0.95
        assert isinstance(f["chunk_tokens"], int) and 4096 <= f["chunk_tokens"] <= 65536
        assert isinstance(f["ttt_epochs"], int) and 1 <= f["ttt_epochs"] <= 4
        assert f["optimizer"] in ("sgd", "adamw")
        assert f["ttt_lr"] == float(f"{f['ttt_lr']:.6g}")  # readable, stable values
    # log-uniform: about half the samples below the geometric midpoint (1e-2.5), not almost none
    below = sum(p.fields["ttt_lr"] < 10**-2.5 for p in first)
    assert 4 <= below <= 16
    assert {p.fields["optimizer"] for p in first} == {"sgd", "adamw"}


def test_random_combines_with_fixed_and_seeds():
    points = parse_spec(
        spec(
            fixed={"ttt_epochs": 2},
            seeds=[0, 1],
            random={"samples": 3, "seed": 0, "fields": {"ttt_lr": {"uniform": [0.001, 0.01]}}},
        )
    ).expand()
    assert len(points) == 6 and all(p.fields["ttt_epochs"] == 2 for p in points)
    assert (
        points[0].fields["ttt_lr"] == points[1].fields["ttt_lr"]
        and points[0].fields["seed"] != points[1].fields["seed"]
    )


def test_float_fields_given_as_ints_hash_like_floats():
    a = parse_spec(spec(fixed={"ttt_lr": 1, "grad_clip": 2})).expand()[0]
    b = parse_spec(spec(fixed={"ttt_lr": 1.0, "grad_clip": 2.0})).expand()[0]
    assert a.key == b.key and isinstance(a.fields["ttt_lr"], float)


def test_request_key_is_the_hash_of_canonical_json():
    # The key names results in results.jsonl files on disk: changing how it is computed breaks resuming.
    canonical = '{"checkpoint":"demo","config":{"chunk_tokens":32768,"ttt_epochs":3,"ttt_lr":0.005},"dataset":"demo"}'
    expected = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert request_key("demo", "demo", {"ttt_lr": 0.005, "ttt_epochs": 3, "chunk_tokens": 32768}) == expected
    assert (
        request_key("démo", "d", {})
        == hashlib.sha256('{"checkpoint":"démo","config":{},"dataset":"d"}'.encode()).hexdigest()[:16]
    )


@given(
    st.dictionaries(
        st.sampled_from(["ttt_epochs", "chunk_tokens", "stride", "seed"]), st.integers(0, 10**6), min_size=1
    )
)
def test_request_key_ignores_field_order_and_sees_every_value(fields):
    shuffled = list(fields.items())
    random.Random(len(fields)).shuffle(shuffled)
    assert request_key("c", "d", fields) == request_key("c", "d", dict(shuffled))
    name = next(iter(fields))
    assert request_key("c", "d", {**fields, name: fields[name] + 1}) != request_key("c", "d", fields)
    assert request_key("c", "d", fields) != request_key("c", "e", fields) != request_key("x", "d", fields)


def test_point_fields_are_sorted_so_records_read_the_same():
    p = Point.make("c", "d", {"ttt_lr": 0.01, "chunk_tokens": 8})
    assert list(p.fields) == ["chunk_tokens", "ttt_lr"] and p.key == request_key(
        "c", "d", {"ttt_lr": 0.01, "chunk_tokens": 8}
    )


@pytest.mark.parametrize(
    "data, message",
    [
        ([1, 2], "expected a mapping"),
        ({"dataset": "demo"}, "checkpoint: missing"),
        (spec(grdi={"ttt_epochs": [1]}), "grdi: unknown key (did you mean 'grid'?)"),
        (spec(checkpoint=""), "checkpoint: expected a name"),
        (spec(dataset=[1]), "dataset: expected a name"),
        (spec(grid={"ttt_epoch": [1]}), "grid.ttt_epoch: unknown evaluation field (did you mean 'ttt_epochs'?)"),
        (spec(grid={"ttt_epochs": 3}), "grid.ttt_epochs: expected a non-empty list"),
        (spec(grid={"ttt_epochs": []}), "grid.ttt_epochs: expected a non-empty list"),
        (spec(grid={"ttt_lr": [0.01, "fast"]}), "grid.ttt_lr[1]: ttt_lr must be a finite number, got 'fast'"),
        (spec(grid={"ttt_lr": [float("nan")]}), "grid.ttt_lr[0]: ttt_lr must be a finite number"),
        (spec(grid={"ttt_epochs": [1, 2.5]}), "grid.ttt_epochs[1]: ttt_epochs must be an integer, got 2.5"),
        (spec(grid={"ttt_epochs": [True]}), "grid.ttt_epochs[0]: ttt_epochs must be an integer"),
        (spec(fixed={"optimizer": 3}), "fixed.optimizer: optimizer must be a string"),
        (spec(fixed={"adapt_include": [""]}), "fixed.adapt_include: adapt_include must be a list of parameter-name"),
        (spec(fixed={"compile": True}), "fixed.compile: unknown evaluation field"),
        (spec(fixed=[1]), "fixed: expected a mapping"),
        (spec(points={"ttt_epochs": 1}), "points: expected a list of mappings"),
        (spec(points=[{}]), "points[0]: expected a non-empty mapping"),
        (spec(points=[{"ttt_epochs": "x"}]), "points[0].ttt_epochs: ttt_epochs must be an integer"),
        (spec(fixed={"ttt_epochs": 1}, grid={"ttt_epochs": [2]}), "grid.ttt_epochs: also set in fixed"),
        (spec(fixed={"ttt_lr": 0.1}, points=[{"ttt_lr": 0.2}]), "points[0].ttt_lr: also set in fixed"),
        (spec(grid={"seed": [1]}, seeds=[0, 1]), "grid.seed: also given by seeds"),
        (spec(fixed={"seed": 1}, seeds=[0]), "fixed.seed: also given by seeds"),
        (spec(seeds=[0, -1]), "seeds: expected a list of non-negative integers"),
        (spec(force="yes"), "force: expected true or false"),
        (spec(random=[1]), "random: expected a mapping"),
        (
            spec(random={"samples": 0, "seed": 0, "fields": {"ttt_lr": {"uniform": [0, 1]}}}),
            "random.samples: expected a",
        ),
        (spec(random={"samples": 2, "fields": {"ttt_lr": {"uniform": [0, 1]}}}), "random.seed: expected an integer"),
        (spec(random={"samples": 2, "seed": 0, "field": {}}), "random.field: unknown key (did you mean 'fields'?)"),
        (spec(random={"samples": 2, "seed": 0, "fields": {}}), "random.fields: expected a mapping"),
        (
            spec(random={"samples": 2, "seed": 0, "fields": {"ttt_lr": {"normal": [0, 1]}}}),
            "random.fields.ttt_lr: expected one of",
        ),
        (
            spec(random={"samples": 2, "seed": 0, "fields": {"ttt_lr": {"uniform": [1, 0]}}}),
            "random.fields.ttt_lr.uniform: expected [low, high]",
        ),
        (
            spec(random={"samples": 2, "seed": 0, "fields": {"ttt_lr": {"loguniform": [0, 1]}}}),
            "random.fields.ttt_lr.loguniform: low=0.0: must be positive",
        ),
        (
            spec(random={"samples": 2, "seed": 0, "fields": {"optimizer": {"uniform": [0, 1]}}}),
            "optimizer is not numeric: use choice",
        ),
        (
            spec(random={"samples": 2, "seed": 0, "fields": {"optimizer": {"choice": []}}}),
            "random.fields.optimizer.choice: expected a non-empty list",
        ),
        (
            spec(random={"samples": 2, "seed": 0, "fields": {"optimizer": {"choice": ["sgd", 1]}}}),
            "random.fields.optimizer.choice[1]: optimizer must be a string",
        ),
        (
            spec(fixed={"ttt_lr": 0.1}, random={"samples": 2, "seed": 0, "fields": {"ttt_lr": {"uniform": [0, 1]}}}),
            "random.fields.ttt_lr: also set in fixed",
        ),
    ],
)
def test_bad_specs_name_the_key(data, message):
    with pytest.raises(SweepError) as info:
        parse_spec(data, where="s.yaml")
    assert str(info.value).startswith("s.yaml: ") and message in str(info.value)


def test_load_spec_reads_yaml_and_names_the_file(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("checkpoint: demo\ndataset: demo\ngrid:\n  ttt_epochs: [0, 1]\n  ttt_lr: [1e-3, 0.005]\n")
    points = load_sweep(path).expand()
    assert len(points) == 4 and points[0].fields == {"ttt_epochs": 0, "ttt_lr": 0.001}
    assert not any(isinstance(p.fields["ttt_lr"], str) for p in points)  # YAML 1.1 reads "1e-3" as a string
    path.write_text("checkpoint: [demo\n")
    with pytest.raises(SweepError, match="sweep.yaml: not valid YAML"):
        load_sweep(path)
    with pytest.raises(SweepError, match="missing.yaml: cannot read the sweep spec"):
        load_sweep(tmp_path / "missing.yaml")


def test_loguniform_int_samples_cover_the_range():
    points = parse_spec(
        spec(random={"samples": 200, "seed": 1, "fields": {"chunk_tokens": {"loguniform": [1024, 1048576]}}})
    ).expand()
    logs = [math.log2(p.fields["chunk_tokens"]) for p in points]
    assert min(logs) < 11 and max(logs) > 19  # spread over the decades, not clumped at the top
