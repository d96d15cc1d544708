"""Two gloo ranks on the CPU give the numbers (and TTT weights) of one process, within float noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pgttt.api.units import UnitSums
from tests.helpers.ttt import assert_units_add_up, one_thread, run_two_ranks  # noqa: F401 (one_thread: a fixture)
from tests.helpers.ttt_dist_worker import CASES, doc_masked_stream, run_case, run_doc_masked_case

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
    assert (double["tokens"], double["bytes"], double["chunks"]) == (
        single["tokens"],
        single["bytes"],
        single["chunks"],
    )
    assert double["val_bpb"] == pytest.approx(single["val_bpb"], rel=0, abs=1e-6)
    assert double["loss_sum"] == pytest.approx(single["loss_sum"], rel=1e-7)
    assert double["compliance"]["scored_exactly_once"] and double["compliance"]["score_before_update"]
    assert double["compliance"]["score_spans"] == 2 * single["compliance"]["score_spans"]  # one per rank and chunk
    units = UnitSums(**double["units"])  # one per chunk, on every rank: the chunk's all-reduced sums
    assert_units_add_up(units, double["loss_sum"], double["tokens"], double["bytes"])
    for key in ("kind", "first_token", "tokens", "bytes"):
        assert double["units"][key] == single["units"][key], key
    assert double["units"]["loss_sum"] == pytest.approx(single["units"]["loss_sum"], rel=1e-7)
    for r in range(2):
        weights = torch.load(two_ranks / f"{name}.{r}.pt", weights_only=True)
        for key, value in model.state_dict().items():
            where = f"rank {r} {key}"
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, w=where: f"{w}: {m}")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_doc_masked_units_are_gathered_and_a_split_document_is_one_unit(two_ranks):
    ranks = [json.loads((two_ranks / f"doc_masked.{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    double = ranks[0]
    units = UnitSums(**double["units"])
    assert_units_add_up(units, double["loss_sum"], double["tokens"], double["bytes"])
    ids = doc_masked_stream()
    bos = np.flatnonzero(ids[:-1] == 1)
    # The two ranks score every target (9 sequences of 16, batches of 1): one unit per document, the one
    # read by inputs 63 and 64 (rank 0's last target, rank 1's first) among them, whole.
    assert double["tokens"] == 144 and units.first_token.tolist() == (bos + 1).tolist()
    assert units.tokens.tolist() == np.diff(np.append(bos, 144)).tolist()
    assert any(b < 64 < e for b, e in zip(bos, np.append(bos[1:], 144), strict=True))
    single = run_doc_masked_case()  # one rank scores the same sequences: the same documents, within float noise
    assert single["units"]["tokens"] == double["units"]["tokens"]
    assert single["units"]["loss_sum"] == pytest.approx(double["units"]["loss_sum"], rel=1e-6)
