"""Two gloo ranks on the CPU give the numbers (and TTT weights) of one process, within float noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.ttt import one_thread, run_two_ranks  # noqa: F401 (one_thread: a fixture)
from tests.helpers.ttt_dist_worker import CASES, run_case

WORKER = "tests.helpers.ttt_dist_worker"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    return run_two_ranks(WORKER, tmp_path_factory.mktemp("ranks"), timeout=180)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one(two_ranks, name):
    single, model = run_case(name)
    ranks = [json.loads((two_ranks / f"{name}.{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank ends with the all-reduced sums and the merged compliance record
    double = ranks[0]
    assert (double["tokens"], double["bytes"], double["chunks"]) == (single["tokens"], single["bytes"],
                                                                    single["chunks"])
    assert double["val_bpb"] == pytest.approx(single["val_bpb"], rel=0, abs=1e-6)
    assert double["loss_sum"] == pytest.approx(single["loss_sum"], rel=1e-7)
    assert double["compliance"]["scored_exactly_once"] and double["compliance"]["score_before_update"]
    assert double["compliance"]["score_spans"] == 2 * single["compliance"]["score_spans"]  # one per rank and chunk
    for r in range(2):
        weights = torch.load(two_ranks / f"{name}.{r}.pt", weights_only=True)
        for key, value in model.state_dict().items():
            where = f"rank {r} {key}"
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, w=where: f"{w}: {m}")
