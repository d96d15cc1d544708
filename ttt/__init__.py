"""The evaluation engine: token shards and byte sidecars, byte accounting, sliding windows, score-first
chunked TTT, the phased per-document LoRA TTT, and the frontier records' document-masked pass.

The public API for callers (the CLI, the service): ``EvalSession`` (a checkpoint loaded once,
evaluated many times), ``EvalConfig``, ``EvalResult``, ``load_val``, ``load_byte_tables``, and the
errors. The engine knows nothing of HTTP. Each protocol is a module (``chunked``, ``phased``,
``doc_masked``) behind the interface of ``protocol``; ``session`` runs them.
"""

from .bytes import ByteTables, load_byte_tables
from .chunked import run_chunked
from .config import EvalConfig
from .data import ByteSource, SidecarBytes, ValSet, load_val
from .doc_masked import run_doc_masked
from .errors import DataError, EvalCancelled, EvalError
from .protocol import Progress
from .session import EvalResult, EvalSession

__all__ = [
    "ByteSource",
    "ByteTables",
    "DataError",
    "EvalCancelled",
    "EvalConfig",
    "EvalError",
    "EvalResult",
    "EvalSession",
    "Progress",
    "SidecarBytes",
    "ValSet",
    "load_byte_tables",
    "load_val",
    "run_chunked",
    "run_doc_masked",
]
