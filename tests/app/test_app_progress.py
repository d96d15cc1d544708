"""The progress a worker sends is the API's Progress shape, and the OpenAPI example is one the engine sends."""

from __future__ import annotations

from pgttt.api.schemas import PROGRESS_EXAMPLE, Job, Progress
from pgttt.app.engine_bridge import DatasetSpec, DeviceEngine
from pgttt.app.messages import RunOrder
from pgttt.app.settings import demo_dir
from pgttt.app.store import CheckpointSpec
from pgttt.ttt.config import EvalConfig


def test_the_engine_sends_the_progress_shape_of_the_example():
    demo = demo_dir()
    engine = DeviceEngine("cpu")
    engine.load(CheckpointSpec("demo", str(demo / "model.bin")))
    config = EvalConfig.from_dict({"ttt_epochs": 1, "chunk_tokens": 1024, "max_tokens": 2048}).to_dict()
    order = RunOrder("job", "demo", DatasetSpec("demo", str(demo), str(demo / "tokenizer.model")), config)
    sent: list[dict] = []
    engine.evaluate(order, lambda p, final=False: sent.append(p), None)

    assert [p["phase"] for p in sent][-1] == "done" and {"scoring", "training"} <= {p["phase"] for p in sent}
    for report in sent:
        assert Progress.model_validate(report).model_dump(exclude_unset=True) == report
    training = next(p for p in sent if p["phase"] == PROGRESS_EXAMPLE["phase"] and p["running_bpb"] is not None)
    assert set(training) == set(PROGRESS_EXAMPLE)
    assert Progress.model_json_schema()["examples"] == [PROGRESS_EXAMPLE]
    assert Job.model_json_schema()["examples"][0]["progress"] == PROGRESS_EXAMPLE
