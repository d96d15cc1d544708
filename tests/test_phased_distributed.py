"""Two gloo ranks give the phased protocol's numbers of one process, for 8 and for 1 emulated ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from phased_dist_worker import CASES, run_case
from ttt_helpers import one_thread  # noqa: F401 (a fixture)

WORKER = Path(__file__).with_name("phased_dist_worker.py")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phased_ranks")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", str(out / "init"), str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
    return out


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
