"""Decoding lrzip (``LRZI``) streams with the ``lrzip`` program, bounded in output, memory and time.

The 2026-04-27 record's per-group container holds complete ``lrzip -z -L 9`` files (ZPAQ back-end);
there is no Python decoder, so, like the record, we run ``lrzip -d``. Each run gets a private temp
dir (always removed), no config file (``LRZIP=NOCONFIG``, ``HOME`` in that dir), an output-file size
limit of the size the container declares plus one byte (``RLIMIT_FSIZE``: a longer output kills it),
an address-space limit and a timeout. lrzip checks its own MD5 of the data, so a corrupt stream fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MAGIC = b"LRZI"
# The debian package of bookworm (the version the record and the compat artifact used).
INSTALL_HINT = "install the lrzip program (Debian/Ubuntu: apt-get install lrzip; version 0.651 is known to work)"
# Per stream. On a busy 2-core machine one 11.5 MB group took 6 min; on an idle core about 80 s.
TIMEOUT_S = 1200.0
MEMORY_LIMIT_BYTES = 2 << 30
_HEADER_BYTES = 14  # magic, major, minor, uint64 LE expected size (lrzip 0.6 format)


class LrzipError(Exception):
    """A stream that cannot be decoded; the message says why (no lrzip, corrupt, too long, too slow)."""


def lrzip_program() -> str | None:
    return shutil.which("lrzip")


def declared_size(data: bytes) -> int | None:
    """The uncompressed size an lrzip 0.6 header announces, or None if it has none."""
    if len(data) < _HEADER_BYTES or not data.startswith(MAGIC) or data[4] != 0 or data[5] < 6:
        return None
    return int.from_bytes(data[6:14], "little")


def decode(
    data: bytes, expected_size: int, *, timeout_s: float | None = None, memory_limit: int | None = None
) -> bytes:
    """The decoded bytes of one lrzip file, which must be exactly ``expected_size`` long."""
    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    memory_limit = MEMORY_LIMIT_BYTES if memory_limit is None else memory_limit
    program = lrzip_program()
    if program is None:
        raise LrzipError(f"the lrzip program is not installed; {INSTALL_HINT}")
    if not data.startswith(MAGIC):
        raise LrzipError(f"not an lrzip stream (first bytes {data[:4].hex()}, expected {MAGIC!r})")
    announced = declared_size(data)
    if announced is None:
        raise LrzipError("lrzip header is truncated or of an unsupported version (need lrzip 0.6 format)")
    if announced != expected_size:
        raise LrzipError(f"lrzip header announces {announced} bytes, the container's shapes need {expected_size}")
    with tempfile.TemporaryDirectory(prefix="pgttt-lrzip-") as tmp:
        src, dst = Path(tmp, "in.lrz"), Path(tmp, "out.bin")
        src.write_bytes(data)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "LRZIP": "NOCONFIG"}
        # Its own session, so that a timeout kills lrzip and anything it started, and no pipe stays open.
        proc = subprocess.Popen(
            _limited(expected_size + 1, memory_limit) + [program, "-q", "-d", "-f", "-o", str(dst), str(src)],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise LrzipError(f"lrzip took longer than {timeout_s:g} s") from None
        if proc.returncode == -signal.SIGXFSZ:
            raise LrzipError(f"lrzip output runs past the {expected_size} bytes the container declares")
        if proc.returncode != 0:
            detail = " ".join((stderr or stdout).decode(errors="replace").split())[-200:]
            raise LrzipError(f"lrzip failed (exit status {proc.returncode}): {detail or 'no message'}")
        size = dst.stat().st_size if dst.exists() else -1
        if size != expected_size:
            raise LrzipError(f"lrzip produced {max(size, 0)} bytes, the container's shapes need {expected_size}")
        return dst.read_bytes()


def decode_all(
    jobs: list[tuple[bytes, int]], *, workers: int | None = None, decoder: Callable[[bytes, int], bytes] | None = None
) -> list[bytes]:
    """Decode several streams in parallel (one lrzip process each); the first failure is raised."""
    decoder = decoder or decode
    if not jobs:
        return []
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(decoder, *job) for job in jobs]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure, start no further stream


# The limits are set by a tiny Python launcher that then execs lrzip: a preexec_fn is unsafe in a
# process with threads (the server's, or decode_all's own).
_LAUNCHER = (
    "import os, resource, signal, sys\n"
    "f, m = int(sys.argv[1]), int(sys.argv[2])\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (f, f))\n"
    "resource.setrlimit(resource.RLIMIT_AS, (m, m))\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)\n"  # Python ignores it, and exec would keep that
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


def _limited(max_file_bytes: int, memory_limit: int) -> list[str]:
    return [sys.executable, "-I", "-c", _LAUNCHER, str(max_file_bytes), str(memory_limit)]
