"""Validate a checkpoint from a request in a child process with a memory cap and a time limit.

A hostile file (a decompression bomb, a tensor view of a terabyte, a parser that never ends) then costs
a child, not the server: a child that runs out of memory, is killed, or overruns its time is reported
as ``IsolationError`` naming the file and what happened. The cap is on address space (RLIMIT_AS) above
what the child holds once torch is imported, so it means the same on a CPU and a CUDA build.
"""

from __future__ import annotations

import multiprocessing
import resource
import signal
from pathlib import Path
from typing import Any

from pgttt.errors import PgtttError

SPAWN = multiprocessing.get_context("spawn")
INSPECT = "pgttt.app.engine_bridge:inspect_checkpoint"


class IsolationError(PgtttError):
    """Validating a file killed its child process (memory, time, a crash)."""


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _child(target: str, spec: Any, memory_bytes: int, conn: Any) -> None:
    import importlib

    module, _, name = target.partition(":")
    function = getattr(importlib.import_module(module), name)  # torch is imported here, before the cap
    limit = _vm_size() + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        conn.send(("ok", function(spec)))
    except MemoryError:
        conn.send(("memory", None))
    except PgtttError as exc:
        try:
            conn.send(("refused", exc))  # its type tells the server which field it is about
        except Exception:  # noqa: BLE001 - an exception that does not pickle: its message
            conn.send(("refused", str(exc)))
    except BaseException as exc:  # noqa: BLE001 - any failure of a hostile file is the file's
        conn.send(("refused", f"{type(exc).__name__}: {exc}"))


def run_isolated(spec: Any, *, memory_bytes: int, timeout_s: float, target: str = INSPECT) -> Any:
    """``target(spec)`` (a "module:function") in a child process; IsolationError if the child does not
    come back with an answer, PgtttError with the child's message if the file was refused."""
    what = Path(getattr(spec, "path", str(spec))).name
    receiver, sender = SPAWN.Pipe(duplex=False)
    child = SPAWN.Process(target=_child, args=(target, spec, memory_bytes, sender), daemon=True, name="pgttt-validate")
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            child.kill()
            raise IsolationError(f"{what}: validation took over {timeout_s:g} s and was stopped")
        try:
            kind, payload = receiver.recv()
        except (EOFError, OSError):
            child.join(5)
            raise IsolationError(f"{what}: validation {_death(child.exitcode, memory_bytes)}") from None
    finally:
        receiver.close()
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join(5)
    if kind == "memory":
        raise IsolationError(f"{what}: validation ran out of memory (limit {memory_bytes >> 20} MiB)")
    if kind == "refused":
        raise payload if isinstance(payload, PgtttError) else PgtttError(payload)
    return payload


def _death(code: int | None, memory_bytes: int) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = f" (out of memory? limit {memory_bytes >> 20} MiB)" if name in ("SIGKILL", "SIGSEGV", "SIGABRT") else ""
        return f"died from {name}{hint}"
    return f"exited with status {code} without an answer"
