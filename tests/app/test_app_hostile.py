"""The service against hostile and unlucky input (issue 15): odd names and paths, huge numbers, deep JSON,
the key checked before the body, settings that only fail in the worker, the wrong vocabulary, files that
kill their reader, a changed file, two servers on one state dir, and /docs without internet."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from pgttt.app.catalog import Catalog
from pgttt.app.main import create_app
from pgttt.app.settings import Settings
from pgttt.app.store import StoreError, lock_state_dir
from pgttt.checkpoints.config import PRESETS
from pgttt.checkpoints.model import GPT, init_weights
from pgttt.main import main
from tests.helpers.app import DEMO, QUICK, write_model_bin, write_ptz

JSON = {"content-type": "application/json"}


def write_ptz_vocab(path: Path, vocab_size: int) -> Path:
    config = dataclasses.replace(PRESETS["tiny"], vocab_size=vocab_size)
    w = {n: t.detach().to(torch.float16) for n, t in init_weights(GPT(config), 0).state_dict().items()}
    buf = io.BytesIO()
    torch.save({"w": w, "m": dict.fromkeys(w, "passthrough (float16)")}, buf)
    path.write_bytes(buf.getvalue())
    path.with_name(path.name + ".json").write_text(
        json.dumps({"preset": "tiny", "overrides": {"vocab_size": vocab_size}})
    )
    return path


def write_ptz_view(path: Path) -> Path:
    """A small .ptz holding, besides the tiny model, a float16 view of 1 TiB (stride 0 over one element)."""
    w = {n: t.detach().to(torch.float16) for n, t in init_weights(GPT(PRESETS["tiny"]), 0).state_dict().items()}
    w["huge"] = torch.zeros(1, dtype=torch.float16).as_strided((1 << 20, 1 << 19), (0, 0))
    buf = io.BytesIO()
    torch.save({"w": w, "m": dict.fromkeys(w, "passthrough (float16)")}, buf)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """The app with its catalog found but no workers started: jobs queue and never run (fast)."""
    root = tmp_path_factory.mktemp("hostile")
    ckpts = root / "ckpts"
    write_ptz(ckpts / "plain.ptz")  # registered below
    write_ptz_vocab(ckpts / "wide.ptz", 2048)  # its sidecar names no tokenizer
    write_ptz_view(ckpts / "view.ptz")  # registered below
    settings = Settings(
        checkpoint_dirs=[DEMO, ckpts],
        data_dirs=[DEMO],
        state_dir=root / "state",
        devices=["cpu"],
        warmup=False,
        validate_timeout_s=120,
    )
    app = create_app(settings)
    service = app.state.service
    catalog = Catalog([DEMO, ckpts, settings.upload_dir], [DEMO])
    catalog.discover()
    service.catalog = catalog
    yield SimpleNamespace(
        client=TestClient(app, raise_server_exceptions=False), service=service, root=root, ckpts=ckpts
    )
    service.store.close()
    service._state_lock.close()


def hostile_requests():
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        # echoed in the error body, which then failed to encode: 500
        (
            "POST",
            "/eval",
            {"content": b'{"checkpoint": "\\ud800", "dataset": "demo"}', "headers": JSON},
            422,
            "checkpoint",
        ),
        ("POST", "/checkpoints", {"content": b'{"name": "x\\ud800", "path": "a.bin"}', "headers": JSON}, 422, "name"),
        ("POST", "/checkpoints", {"content": b'{"name": "x", "path": "\\ud800.bin"}', "headers": JSON}, 422, "path"),
        ("GET", f"/jobs?offset={2**63}", {}, 422, "offset"),  # SQLite's OverflowError: 500
        ("GET", f"/jobs?offset={2**64 + 1}", {}, 422, "offset"),
        ("POST", "/checkpoints", {"json": {"name": "x", "path": "a\0.bin"}}, 422, "path"),  # ValueError: 500
        ("POST", "/checkpoints", {"json": {"name": "x", "path": "a" * 5000}}, 422, "path"),
        ("POST", "/checkpoints", {"json": {"name": "x", "path": "a" * 300 + ".bin"}}, 422, "path"),  # ENAMETOOLONG
        ("POST", "/checkpoints", {"content": deep, "headers": JSON}, 400, None),  # RecursionError: 500
        ("POST", "/eval", {"content": deep, "headers": JSON}, 400, None),
        ("POST", "/checkpoints", {"json": {"name": "evil\n", "path": "plain.ptz", "preset": "tiny"}}, 422, "name"),
        # the docs promise a 422 at submission; it was a 202, then a failure in the worker
        ("POST", "/eval", {"json": {**QUICK, "max_tokens": 128}}, 422, "max_tokens"),
        ("POST", "/eval", {"json": {**QUICK, "max_tokens": None, "seq_len": 1 << 20, "stride": 64}}, 422, None),
        # a vocab-2048 model on the vocab-1024 demo data: a number, and a meaningless one
        ("POST", "/eval", {"json": {**QUICK, "checkpoint": "wide"}}, 422, "dataset"),
    ]


@pytest.mark.parametrize(
    "method,url,kwargs,status,field",
    hostile_requests(),
    ids=[f"{i:02d}-{r[4] or r[3]}" for i, r in enumerate(hostile_requests())],
)
def test_hostile_requests_get_a_4xx_naming_the_field(api, method, url, kwargs, status, field):
    r = api.client.request(method, url, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"code", "message", "detail"} and error["message"]
    if field is not None:
        assert error["detail"]["field"] == field, error
    assert api.client.get(f"/jobs?offset={2**63 - 1}").status_code == 200


def test_vocabulary_mismatch_names_both(api):
    r = api.client.post("/eval", json={**QUICK, "checkpoint": "wide"})
    message = r.json()["error"]["message"]
    assert r.status_code == 422 and "1024" in message and "2048" in message
    assert api.client.post("/eval", json={**QUICK, "seed": 5}).status_code == 202  # the demo's own: accepted


def test_the_key_is_checked_before_the_body(tmp_path):
    app = create_app(
        Settings(checkpoint_dirs=[DEMO], data_dirs=[DEMO], state_dir=tmp_path, devices=["cpu"], api_key="s3cret")
    )
    c = TestClient(app)
    for url in ("/eval", "/checkpoints"):
        r = c.post(url, content=b'{"checkpoint": ', headers=JSON)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", url  # was 400
        r = c.post(url, content=b'{"checkpoint": ', headers={**JSON, "X-API-Key": "s3cret"})
        assert r.status_code == 400, url
    assert c.get("/healthz").status_code == 200 and c.get("/openapi.json").status_code == 200
    app.state.service.store.close()
    app.state.service._state_lock.close()


def test_docs_are_served_from_the_package(api):
    html = api.client.get("/docs").text
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", html)
    assert urls and all(u.startswith("/") for u in urls), urls  # was cdn.jsdelivr.net: blank offline
    for url in urls:
        assert api.client.get(url).status_code == 200, url
    assert "swagger-ui-bundle.js" in html and "openapi.json" in html


# ---- files that kill their reader ---------------------------------------------------------------


@pytest.mark.parametrize(
    "target,needle",
    [
        ("hog_memory", "ran out of memory"),
        ("die", "died from SIGKILL"),
        ("hang", "took over"),
        ("strange_error", "OverflowError"),
    ],
)
def test_a_file_that_kills_its_reader_is_a_422_and_the_server_stays_up(api, target, needle, monkeypatch):
    registrar = api.service.registrar
    monkeypatch.setattr(registrar, "inspect_target", f"tests.helpers.app:{target}")
    if target == "hang":
        monkeypatch.setattr(api.service.settings, "validate_timeout_s", 3.0)
    r = api.client.post(
        "/checkpoints",
        data={"name": f"bomb-{target}", "preset": "tiny"},
        files={"file": ("bomb.ptz", b"\x28\xb5\x2f\xfd" * 512)},
    )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["detail"]["field"] == "file" and needle in error["message"] and "bomb-" in error["message"]
    # Quarantined: nothing reached the folder searched at start, nothing is left in quarantine.
    upload_dir = api.service.settings.upload_dir
    assert not list(upload_dir.glob("bomb*")) and not list(registrar.incoming.glob("*"))
    r = api.client.post("/checkpoints", json={"name": f"reg-{target}", "path": "plain.ptz", "preset": "tiny"})
    assert r.status_code == 422 and needle in r.json()["error"]["message"], r.text
    assert api.client.get("/healthz").status_code == 200 and api.client.get("/checkpoints").status_code == 200


def test_a_tensor_view_of_a_tebibyte_is_a_422_then_a_listed_problem(api):
    r = api.client.post("/checkpoints", json={"name": "view", "path": "view.ptz", "preset": "tiny"})
    assert r.status_code == 422 and "view.ptz" in r.json()["error"]["message"], r.text  # was a 500
    (api.ckpts / "view.ptz.json").write_text(json.dumps({"preset": "tiny"}))
    try:
        again = Catalog([api.ckpts], [DEMO])
        again.discover()  # a RuntimeError here left the server 503 not_ready on every request after a restart
        assert "wide" in again.checkpoints and "view" not in again.checkpoints
        assert any("view.ptz" in p for p in again.problems)
    finally:
        (api.ckpts / "view.ptz.json").unlink()


def test_discovery_lists_any_failing_file_as_a_problem(tmp_path, monkeypatch):
    from pgttt.app import engine_bridge
    from tests.helpers import app as app_helpers

    real = engine_bridge.inspect_checkpoint
    write_model_bin(tmp_path / "good.bin")
    write_ptz(tmp_path / "view.ptz")
    (tmp_path / "view.ptz.json").write_text(json.dumps({"preset": "tiny"}))
    monkeypatch.setattr(
        engine_bridge,
        "inspect_checkpoint",
        lambda spec: app_helpers.strange_error(spec) if "view" in spec.path else real(spec),
    )
    catalog = Catalog([tmp_path], [DEMO])
    catalog.discover()  # an OverflowError here made the server 503 not_ready on every request
    assert sorted(catalog.checkpoints) == ["good"] and "demo" in catalog.datasets
    assert any("view.ptz" in p and "OverflowError" in p for p in catalog.problems)


def test_a_changed_ptz_is_refused_at_the_next_start(api):
    c, service = api.client, api.service
    r = c.post("/checkpoints", json={"name": "plain", "path": "plain.ptz", "preset": "tiny"})
    assert r.status_code == 201, r.text
    sha = r.json()["sha256"]
    assert [s.sha256 for s in service.store.registrations() if s.name == "plain"] == [sha]
    r = c.post(
        "/checkpoints",
        data={"name": "up", "preset": "tiny"},
        files={"file": ("up.ptz", (api.ckpts / "plain.ptz").read_bytes())},
    )
    assert r.status_code == 201 and r.json()["sha256"] == sha, r.text
    uploaded = Path(r.json()["path"])
    assert json.loads(uploaded.with_name("up.ptz.json").read_text())["sha256"] == sha
    for path in (api.ckpts / "plain.ptz", uploaded):  # one flipped bit in a tensor's bytes: still a valid .ptz
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    again = Catalog([DEMO, api.ckpts, service.settings.upload_dir], [DEMO])
    again.discover(service.store.registrations())
    assert "plain" not in again.checkpoints and "up" not in again.checkpoints
    changed = [p for p in again.problems if "changed since it was registered" in p]
    assert len(changed) == 2, again.problems


# ---- one server per state dir -----------------------------------------------------------------


def test_a_second_server_on_one_state_dir_refuses_to_start(tmp_path, capsys):
    held = lock_state_dir(tmp_path)  # as a running pgttt serve holds it
    try:
        with pytest.raises(StoreError, match=rf"{re.escape(str(tmp_path))}.*pid {os.getpid()}"):
            create_app(Settings(checkpoint_dirs=[DEMO], data_dirs=[DEMO], state_dir=tmp_path, devices=["cpu"]))
        assert main(["serve", "--state-dir", str(tmp_path), "--devices", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "in use by another pgttt serve" in err and f"pid {os.getpid()}" in err and str(tmp_path) in err
    finally:
        held.close()
    app = create_app(Settings(checkpoint_dirs=[DEMO], data_dirs=[DEMO], state_dir=tmp_path, devices=["cpu"]))
    app.state.service.store.close()
    app.state.service._state_lock.close()
