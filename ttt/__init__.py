"""The evaluation engine: token shards and byte sidecars, byte accounting, sliding windows, score-first
chunked TTT, and the frontier records' document-masked pass.

The public API for callers (the CLI, the service): ``EvalSession`` (a checkpoint loaded once,
evaluated many times), ``EvalConfig``, ``EvalResult``, ``load_val``, ``load_byte_tables``, and the
errors. The engine knows nothing of HTTP.
"""

from .bytes import ByteTables, load_byte_tables
from .config import EvalConfig
from .data import ByteSource, SidecarBytes, ValSet, load_val
from .doc_masked import run_doc_masked
from .engine import EvalResult, EvalSession, Progress, run_protocol
from .errors import DataError, EvalCancelled, EvalError

__all__ = [
    "ByteSource", "ByteTables", "DataError", "EvalCancelled", "EvalConfig", "EvalError", "EvalResult",
    "EvalSession", "Progress", "SidecarBytes", "ValSet", "load_byte_tables", "load_val", "run_doc_masked",
    "run_protocol",
]
