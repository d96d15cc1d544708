"""What the commands that run the model in-process (``pgttt eval``, ``pgttt train``) share: the CPU thread
count, the ``--device`` flag checked before anything is loaded, and when to draw a progress bar."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .errors import PgtttError

if TYPE_CHECKING:
    import torch

THREADS_ENV = "PGTTT_THREADS"


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=f"CPU threads for torch (default: ${THREADS_ENV}, else $OMP_NUM_THREADS, else the physical "
        "cores this process may run on)",
    )


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (``os.sched_getaffinity``), capped by a cgroup
    CPU quota when there is one: hyper-threads of one core count once."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(
                (
                    topology.joinpath("physical_package_id").read_text().strip(),
                    topology.joinpath("core_id").read_text().strip(),
                )
            )
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology: count the CPU as a core
    count = len(cores) or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return count


def resolve_threads(flag: int | None, environ: dict[str, str] | None = None) -> tuple[int, str]:
    """The thread count and where it came from: ``--threads``, ``$PGTTT_THREADS``, ``$OMP_NUM_THREADS``, or
    the physical cores available."""
    env = os.environ if environ is None else environ
    for value, where in (
        (flag, "--threads"),
        (env.get(THREADS_ENV), THREADS_ENV),
        (env.get("OMP_NUM_THREADS"), "OMP_NUM_THREADS"),
    ):
        if value is None or value == "":
            continue
        try:
            n = int(value)
        except ValueError:
            raise PgtttError(f"{where}={value!r}: not a whole number of threads") from None
        if n < 1:
            raise PgtttError(f"{where}={n}: must be at least 1")
        return n, where
    return physical_cores(), "physical cores available"


def set_threads(flag: int | None) -> int:
    import torch

    n, _ = resolve_threads(flag)
    torch.set_num_threads(n)
    return n


def parse_device(name: str | None) -> torch.device:
    """``--device``: cpu, cuda or cuda:N, refused with a one-line message when this machine cannot run it."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise PgtttError(f"--device {name!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise PgtttError(f"--device {name!r}: not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
        raise PgtttError(f"--device {name!r}: {why} (torch {torch.__version__}); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise PgtttError(f"--device {name!r}: {torch.cuda.device_count()} GPU(s) visible (cuda:0..)")
    return device


def show_progress(quiet: bool, stream: TextIO | None = None) -> bool:
    """A progress bar only for a person watching: not with --quiet, nor when stderr is a file or a pipe."""
    stream = sys.stderr if stream is None else stream
    return not quiet and hasattr(stream, "isatty") and stream.isatty()
