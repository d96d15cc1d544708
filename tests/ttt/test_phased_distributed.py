"""Two gloo ranks give the phased protocol's numbers of one process, for 8 and for 1 emulated ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgttt.api.units import UnitSums
from tests.helpers.phased_dist_worker import CASES, run_case
from tests.helpers.ttt import assert_units_add_up, one_thread, run_two_ranks  # noqa: F401 (one_thread: a fixture)

WORKER = "tests.helpers.phased_dist_worker"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    return run_two_ranks(WORKER, tmp_path_factory.mktemp("phased_ranks"), timeout=300)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one(two_ranks, name):
    single = run_case(name)
    ranks = [json.loads((two_ranks / f"{name}.{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank ends with every batch's sums and the merged ledger
    double = ranks[0]
    assert double["trained"][0]  # a phase trained, so its gradients crossed the ranks
    for key in ("tokens", "bytes", "counts", "pauses", "trained"):
        assert double[key] == single[key], key
    assert [b[:2] for b in double["batches"]] == [list(b[:2]) for b in single["batches"]]
    assert double["val_bpb"] == pytest.approx(single["val_bpb"], rel=0, abs=1e-6)
    assert double["compliance"]["scored_exactly_once"] and double["compliance"]["score_before_update"]
    units = UnitSums(**double["units"])  # every rank's documents, gathered in stream order
    assert_units_add_up(units, double["loss_sum"], double["tokens"], double["bytes"])
    assert len(units) == double["counts"]["documents"]
    for key in ("kind", "first_token", "tokens", "bytes"):
        assert double["units"][key] == single["units"][key], key
    assert double["units"]["loss_sum"] == pytest.approx(single["units"]["loss_sum"], rel=1e-6)
