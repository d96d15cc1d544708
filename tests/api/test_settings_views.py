"""Every view of the evaluation settings (engine config, ``pgttt eval`` flags, the HTTP request model and
``/openapi.json``, sweep spec types, report columns, the oracle) lists the declared knobs with the declared
defaults and bounds; a knob added to a declaration appears in all of them with no other edit."""

import argparse
import dataclasses

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pgttt.api.schemas import EvalRequest, eval_request_model
from pgttt.api.settings import EvalSettings, knob, knobs, request_knobs
from pgttt.app import errors
from pgttt.app.main import create_app
from pgttt.app.settings import Settings, demo_dir
from pgttt.budget.settings import BudgetError, ChunkedSettings, make_settings
from pgttt.client import report_rows, sweep_spec
from pgttt.ttt import cli
from pgttt.ttt.config import EvalConfig
from pgttt.ttt.errors import EvalError

BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}
PHASED_GROUPS = ("phased", "record")


def field_schema(properties: dict, name: str) -> dict:
    """The non-null branch of an optional field's JSON schema."""
    prop = properties[name]
    return next(b for b in prop.get("anyOf", [prop]) if b.get("type") != "null")


def eval_parser(settings: type = EvalSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgttt")
    cli.register(parser.add_subparsers(dest="command"), settings)
    return parser


def eval_help(settings: type, capsys) -> str:
    with pytest.raises(SystemExit):
        eval_parser(settings).parse_args(["eval", "--help"])
    return " ".join(capsys.readouterr().out.split())  # as one line, whatever the terminal's width


def outside(k) -> list:
    """Values just outside each declared bound."""
    step = 1 if k.kind is int else 1e-9
    values = [k.ge - step] if k.ge is not None else []
    values += [k.gt] if k.gt is not None else []
    values += [k.le + step] if k.le is not None else []
    values += [k.lt] if k.lt is not None else []
    return values


def test_the_engine_config_is_the_declaration():
    declared = knobs()
    assert [f.name for f in dataclasses.fields(EvalConfig)] == [k.name for k in declared] + ["defaults_filled"]
    config = EvalConfig()
    assert all(getattr(config, k.name) == k.default for k in declared)
    assert ChunkedSettings().ttt_epochs == EvalSettings.ttt_epochs  # the oracle's defaults are the engine's


@pytest.mark.parametrize("k", [k for k in knobs() if k.kind in (int, float)], ids=lambda k: k.name)
def test_every_view_refuses_just_outside_the_declared_bounds(k):
    protocol = {"protocol": "phased"} if k.group in PHASED_GROUPS else {}
    for value in outside(k):
        with pytest.raises(EvalError) as err:
            EvalConfig(**protocol, **{k.name: value})
        assert (err.value.field, err.value.value) == (k.name, value)
        assert str(err.value).startswith(f"{k.name}={value!r}:")
        if k.request:
            with pytest.raises(ValueError, match=k.name):
                EvalRequest.model_validate({"checkpoint": "c", "dataset": "d", k.name: value})
        if k.name in {f.name for f in dataclasses.fields(ChunkedSettings)} and k.kind is int:
            with pytest.raises(BudgetError) as budget:
                make_settings("chunked", {k.name: value})
            assert (budget.value.field, budget.value.value) == (k.name, value)
    within = {"stride": 1} if k.name == "seq_len" else {}  # a window of 1 token has a stride of 1
    for bound in ("ge", "le"):  # the bound itself is a setting
        if getattr(k, bound) is not None:
            config = EvalConfig(**protocol, **within, **{k.name: getattr(k, bound)})
            assert getattr(config, k.name) == getattr(k, bound)


def test_every_view_lists_the_same_fields_with_the_same_bounds(tmp_path, capsys):
    declared, requested = knobs(), request_knobs()
    # pgttt eval: a flag per knob, with its choices and its declared default in the help.
    parser = argparse.ArgumentParser()
    cli.add_setting_flags(parser)
    actions = {flag: a for a in parser._actions for flag in a.option_strings}
    text = eval_help(EvalSettings, capsys)
    for k in declared:
        action = actions[cli.flag_of(k)]
        assert action.dest == k.name and f"{cli.flag_of(k)} " in text
        assert action.choices == k.choices
        assert action.default in (None, [])  # only given flags reach the config: no retyped default
        assert k.default_text() in action.help and k.range_text() in action.help
    # The HTTP request model, as the real app's /openapi.json shows it.
    app = create_app(
        Settings(checkpoint_dirs=[demo_dir()], data_dirs=[demo_dir()], state_dir=tmp_path, devices=["cpu"])
    )
    spec = app.openapi()
    ref = spec["paths"]["/eval"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    properties = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
    base = {"checkpoint", "dataset", "gpus", "force", "wait", "wait_timeout_s"}
    assert set(properties) - base == {k.name for k in requested}
    assert {k.name for k in declared} - {k.name for k in requested} == {"compile"}  # the server chooses it
    for k in requested:
        schema = field_schema(properties, k.name)
        shown = {bound: schema[key] for bound, key in BOUNDS.items() if key in schema}
        # FastAPI's OpenAPI model holds bounds as floats (the seed's 2**63 - 1 is rounded there).
        assert shown == {b: float(getattr(k, b)) for b in BOUNDS if getattr(k, b) is not None}, k.name
        assert schema.get("enum") == (None if k.choices is None else list(k.choices)), k.name
        assert k.help in properties[k.name]["description"]
    # Sweep spec types and report columns.
    json_type = {int: int, float: float, str: str, bool: bool, tuple: list}
    assert sweep_spec.KINDS == {**{k.name: json_type[k.kind] for k in requested}, "gpus": int}
    assert report_rows.FIELD_ORDER == (*(k.name for k in requested), "gpus")


@dataclasses.dataclass(frozen=True)
class WithMadeUp(EvalConfig):
    ttt_made_up: float = knob(0.25, "a made-up knob", ge=0.0, le=2.0)


def test_a_made_up_knob_appears_in_every_view(capsys, monkeypatch):
    # The engine validates it from its declaration.
    assert WithMadeUp(ttt_made_up=2.0).ttt_made_up == 2.0
    with pytest.raises(EvalError, match=r"ttt_made_up=2\.5: must be within 0\.0\.\.2\.0") as err:
        WithMadeUp(ttt_made_up=2.5)
    assert (err.value.field, err.value.value) == ("ttt_made_up", 2.5)
    # pgttt eval --help, and the flag reaches the config.
    text = eval_help(WithMadeUp, capsys)
    assert "--ttt-made-up TTT_MADE_UP" in text and "a made-up knob; in [0.0, 2.0]; default 0.25" in text
    args = eval_parser(WithMadeUp).parse_args(
        ["eval", "--checkpoint", "m.bin", "--tokenizer", "t.model", "--val", "v", "--ttt-made-up", "1.5"]
    )
    assert cli.eval_settings(args, WithMadeUp) == {"ttt_made_up": 1.5}
    # /openapi.json with its bounds, and the error JSON naming it.
    model = eval_request_model(WithMadeUp)
    app = FastAPI()
    errors.install(app)

    @app.post("/eval")
    def post_eval(req: model) -> dict:
        return {"ttt_made_up": req.ttt_made_up}

    client = TestClient(app)
    properties = client.get("/openapi.json").json()["components"]["schemas"]["EvalRequest"]["properties"]
    assert field_schema(properties, "ttt_made_up") == {"type": "number", "minimum": 0.0, "maximum": 2.0}
    assert "a made-up knob; default 0.25" in properties["ttt_made_up"]["description"]
    ok = client.post("/eval", json={"checkpoint": "c", "dataset": "d", "ttt_made_up": 1.0})
    assert ok.json() == {"ttt_made_up": 1.0}
    refused = client.post("/eval", json={"checkpoint": "c", "dataset": "d", "ttt_made_up": 3.0}).json()["error"]
    assert (refused["code"], refused["detail"]["field"], refused["detail"]["value"]) == (
        "invalid_field",
        "ttt_made_up",
        3.0,
    )
    # Sweep specs read its type off the request model.
    monkeypatch.setattr(sweep_spec, "KINDS", sweep_spec.field_kinds(model))
    spec = {"checkpoint": "c", "dataset": "d", "grid": {"ttt_made_up": [0.5, 1]}}
    assert [p.fields for p in sweep_spec.parse_spec(spec).expand()] == [{"ttt_made_up": 0.5}, {"ttt_made_up": 1.0}]
    with pytest.raises(sweep_spec.SweepError, match="ttt_made_up must be a finite number"):
        sweep_spec.parse_spec({**spec, "grid": {"ttt_made_up": ["fast"]}})
    # Report columns: in declared order (before gpus), not after every declared field.
    monkeypatch.setattr(report_rows, "FIELD_ORDER", report_rows.field_order(WithMadeUp))
    record = {
        "key": "k",
        "checkpoint": "c",
        "dataset": "d",
        "request": {"gpus": 1, "ttt_made_up": 0.5},
        "result": {"val_bpb": 1.5, "config": {"ttt_made_up": 0.5}},
    }
    assert report_rows.build_rows([record])[1] == ["ttt_made_up", "gpus"]


def test_errors_carry_their_field_and_value():
    with pytest.raises(EvalError) as err:
        EvalConfig.from_dict({"ttt_lrr": 0.1}, where="request")
    assert (err.value.field, err.value.value) == ("ttt_lrr", 0.1)
    with pytest.raises(EvalError) as err:
        EvalConfig(seq_len=64, stride=65)
    assert (err.value.field, err.value.value) == ("stride", 65)
    with pytest.raises(EvalError) as err:
        EvalConfig(protocol="chunked", ttt_lora_rank=8)
    assert (err.value.field, err.value.value) == ("ttt_lora_rank", 8)


def test_an_untranslated_error_reaches_http_with_its_field_and_value():
    from pgttt.errors import PgtttError

    app = FastAPI()
    errors.install(app)

    @app.get("/refuse")
    def refuse() -> dict:
        raise PgtttError("ttt_lr=11.0: must be within 0.0..10.0", field="ttt_lr", value=11.0)

    answer = TestClient(app).get("/refuse")
    assert answer.status_code == 422
    assert answer.json() == {
        "error": {
            "code": "invalid_input",
            "message": "ttt_lr=11.0: must be within 0.0..10.0",
            "detail": {"field": "ttt_lr", "value": 11.0},
        }
    }
