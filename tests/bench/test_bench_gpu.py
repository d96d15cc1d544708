"""``bench/bench_gpu.py``'s "x ref" ratios: only against the reference's seconds on the same GPU kind."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import shared_path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu() -> dict:
    return json.loads(shared_path("compat", "expected.json").read_text())["gpu_bf16"]


@pytest.mark.parametrize(
    ("name", "kind"),
    [("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA A100-SXM4-80GB", "A100"), ("Tesla T4", None)],
)
def test_gpu_kind_from_the_device_name(bench, name, kind):
    assert bench.gpu_kind(name) == kind


def test_h200_ratios_use_the_h200_reference(bench, gpu):
    ref = bench.reference_seconds(gpu, "H200")
    assert ref == {"compat sliding": 9.86, "compat ttt 3/32K": 17.0, "2M stream ttt 3/32K": 89.3}
    # The side-by-side run on one H200 (2026-12-02): pgttt 33.6 s, 7.41 s, 10.09 s.
    ratios = {
        k: round(ref[k] / s, 2)
        for k, s in (("2M stream ttt 3/32K", 33.6), ("compat sliding", 7.41), ("compat ttt 3/32K", 10.09))
    }
    assert ratios == {"2M stream ttt 3/32K": 2.66, "compat sliding": 1.33, "compat ttt 3/32K": 1.68}
    assert bench.reference_first_call_seconds(gpu, "H200") == 107.5


def test_h100_ratios_use_the_h100_reference(bench, gpu):
    ref = bench.reference_seconds(gpu, "H100")
    assert ref == {
        "compat sliding": 10.9,
        "compat ttt 3/32K": 19.3,
        "compat ttt 4/64K": 20.9,
        "2M stream ttt 3/32K": 100.3,
    }
    assert bench.reference_first_call_seconds(gpu, "H100") is None


def test_no_ratio_for_a_kind_without_figures(bench, gpu):
    assert bench.reference_seconds(gpu, "A100") is None
    assert bench.reference_seconds(gpu, None) is None
    without = {k: v for k, v in gpu.items() if k != "reference_h200"}
    assert bench.reference_seconds(without, "H200") is None


def test_the_script_holds_no_reference_figures(bench):
    text = BENCH.read_text()
    for figure in ("100.3", "89.3", "9.86", "17.0", "10.9", "19.3", "55_000", "55000"):
        assert figure not in text
