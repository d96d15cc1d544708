"""Builders and waiting helpers shared by the service's tests (``tests/test_app_*.py``)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

from pgttt.app.engine_bridge import DeviceEngine
from pgttt.app.settings import demo_dir
from pgttt.checkpoints.config import PRESETS
from pgttt.checkpoints.format import save_model_bin
from pgttt.checkpoints.model import GPT, init_weights
from pgttt.checkpoints.quant import default_scheme, quantize_rows

DEMO = demo_dir()  # the demo checkpoint, tokenizer and val shard shipped in the package
# Small evaluations of the demo checkpoint: fast on two CPU cores.
QUICK = {
    "checkpoint": "demo",
    "dataset": "demo",
    "ttt_epochs": 1,
    "chunk_tokens": 256,
    "max_tokens": 512,
    "batch_seqs": 8,
}
# Long enough to be caught running (many TTT epochs), cancelled or killed long before it ends.
LONG = {"checkpoint": "demo", "dataset": "demo", "ttt_epochs": 100, "chunk_tokens": 1024, "max_tokens": 8192}


def tiny_tensors(seed: int = 0) -> dict:
    model = init_weights(GPT(PRESETS["tiny"]), seed)
    return {n: quantize_rows(p.detach(), default_scheme(n, p.detach())) for n, p in model.state_dict().items()}


def write_model_bin(path: Path, seed: int = 0) -> Path:
    """A tiny-preset model.bin with no tokenizer recorded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model_bin(path, PRESETS["tiny"], tiny_tensors(seed), tokenizer=None, provenance={"source": "test"})
    return path


def write_ptz(path: Path, seed: int = 0) -> Path:
    """A tiny-preset challenge artifact ({"w", "m"}; uncompressed torch.save, which the reader accepts)."""
    model = init_weights(GPT(PRESETS["tiny"]), seed)
    w = {n: t.detach().to(torch.float16) for n, t in model.state_dict().items()}
    m = dict.fromkeys(w, "passthrough (float16)")
    buf = io.BytesIO()
    torch.save({"w": w, "m": m}, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def wait_for(condition: Callable[[], Any], timeout: float = 60.0, what: str = "condition", poll: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def wait_job(client: httpx.Client, job_id: str, states=("succeeded", "failed", "cancelled"), timeout=120.0) -> dict:
    def check():
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["state"] in states else None

    return wait_for(check, timeout, f"job {job_id} to reach {states}")


def wait_ready(client: httpx.Client, timeout: float = 120.0) -> dict:
    return wait_for(lambda: (r := client.get("/readyz")).status_code == 200 and r.json(), timeout, "/readyz")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Server:
    """A real ``pgttt serve`` process on a free localhost port, with its defaults: the bundled demo."""

    def __init__(self, state_dir: Path, *args: str) -> None:
        self.state_dir, self.args = state_dir, args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = state_dir / "server.log"

    def start(self) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGTTT_")}
        env["PGTTT_STATE_DIR"] = str(self.state_dir)
        command = [
            sys.executable,
            "-m",
            "pgttt.main",
            "serve",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *self.args,
        ]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for(self._healthy, 60, f"pgttt serve on {self.url} (log: {self.log})", poll=0.1)
        return self

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"pgttt serve exited with {self.process.returncode}:\n{self.log.read_text()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self, sig: int | None = None) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if sig is None:
            self.process.terminate()
        else:
            self.process.send_signal(sig)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class EngineSlowToWarmTheRest(DeviceEngine):
    """The real engine, whose compile of what its start left out (``warmup_rest``) takes 5 s more and writes a
    line to the file ``$PGTTT_TEST_REST_LOG`` each call."""

    def warmup_rest(self) -> None:
        with open(os.environ["PGTTT_TEST_REST_LOG"], "a") as log:
            log.write(f"{time.time()}\n")
        time.sleep(5)
        super().warmup_rest()


class EngineThatCannotStart:
    """A worker engine whose start always fails, as on a device that is out of memory."""

    def __init__(self, device: str) -> None:
        raise RuntimeError(f"out of memory on {device} (a test engine that never starts)")


# Stand-ins for validating a hostile file in the server's child process (``Registrar.inspect_target``).
def hog_memory(spec: Any) -> None:
    """A decompression bomb: asks for far more memory than any limit allows."""
    return bytearray(1 << 40)


def die(spec: Any) -> None:
    """A reader that crashes the process (or is killed by the OOM killer)."""
    os.kill(os.getpid(), 9)


def hang(spec: Any) -> None:
    """A parser that never ends."""
    time.sleep(3600)


def strange_error(spec: Any) -> None:
    """A reader failing with something that is not one of ours (as a 1 TiB tensor view did)."""
    raise OverflowError(f"{spec.path}: storage of 1099511627776 bytes")
