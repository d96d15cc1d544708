"""The evaluation engine: token shards, byte accounting, sliding windows and score-first chunked TTT.

The public API for callers (the CLI, the service): ``EvalSession`` (a checkpoint loaded once,
evaluated many times), ``EvalConfig``, ``EvalResult``, ``load_val``, ``load_byte_tables``, and the
errors. The engine knows nothing of HTTP.
"""

from .bytes import ByteTables, load_byte_tables
from .config import EvalConfig
from .data import ValSet, load_val
from .engine import EvalResult, EvalSession, Progress, run_protocol
from .errors import DataError, EvalCancelled, EvalError

__all__ = [
    "ByteTables", "DataError", "EvalCancelled", "EvalConfig", "EvalError", "EvalResult", "EvalSession",
    "Progress", "ValSet", "load_byte_tables", "load_val", "run_protocol",
]
