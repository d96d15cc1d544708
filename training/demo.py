"""Build ``checkpoints/demo/`` (tokenizer, val shard, model.bin, metrics.json) from text that ships with Python.

Train documents are the standard library's docstrings (read from its sources with ``ast``, never
imported), val documents the ``pydoc`` topic texts (``pydoc_data.topics``): different documents, so
test-time training has something to adapt to. Nothing is downloaded. One command rebuilds it all::

    python -m pgttt.training.demo            # --out DIR (default: the package's checkpoints/demo)

It trains a SentencePiece BPE tokenizer (byte fallback; pad 0, bos 1, eos 2, unk 3 like the
challenge's), writes the shards as ``[BOS] + ids`` per document, trains with ``pgttt train``'s job
(``--work`` keeps its data folder, so the same run can be repeated with ``pgttt train --data``), and
records the engine's val_bpb without and with test-time training in ``metrics.json``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import platform
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

import pgttt.checkpoints
from pgttt.ttt.data import write_shard

from .config import resolve_run_config
from .job import TrainJob, run_training

DEMO_DIR = Path(pgttt.checkpoints.__file__).resolve().parent / "demo"
TOKENIZER_FILE = "tokenizer.model"
VAL_FILE = "fineweb_val_000000.bin"
TRAIN_FILE = "fineweb_train_000000.bin"
VOCAB_SIZE = 1024
BOS_ID = 1
# Whole val documents (pydoc topics in name order) while the val stream stays within this many
# tokens: over 2 * 32768, so the engine's default 32768-token chunks give 3 chunks and TTT trains on 2.
VAL_MAX_TOKENS = 75_000
# Standard-library folders whose docstrings are not prose about Python (tests, vendored tools).
SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "ensurepip"}

PRESET = "tiny"
OVERRIDES = (
    # Architecture: MLP matrices above 65,536 elements, so GPTQ writes int6 as well as the int8 embedding.
    "model_dim=128",
    "num_heads=4",
    "num_kv_heads=2",
    "mlp_mult=4.5",
    "num_layers=3",
    "rope_dims=16",
    "train_seq_len=256",
    "num_loops=1",
    "loop_start=1",
    "loop_end=1",
    "parallel_residual_start=2",
    "xsa_last_n=3",
    # Recipe: a short CPU run, progress by steps (reproducible), no compile warm-up.
    "max_wallclock_seconds=0",
    "iterations=200",
    "warmup_steps=0",
    "train_batch_tokens=4096",
    "grad_accum_micro_batches=1",
    "warmdown_frac=0.5",
    "muon_momentum_warmup_steps=60",
    "ema_decay=0.98",
    "train_log_every=50",
    "val_loss_every=0",
    "gptq_calibration_batches=16",
    "gptq_block_size=64",
    "matrix_lr=0.03",
    "tied_embed_lr=0.05",
    "scalar_lr=0.03",
    "seed=1",
)


def _docstrings(node: ast.AST) -> list[str]:
    """The docstrings of a module, its classes and functions, in source order."""
    out = []
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        doc = ast.get_docstring(node)
        if doc:
            out.append(doc)
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            out.extend(_docstrings(child))
    return out


def train_documents() -> list[str]:
    """One document per standard-library module: its docstrings, joined by blank lines."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a deliberately broken file (bad encodings, syntax tests)
        strings = _docstrings(tree)
        if strings:
            docs.append("\n\n".join(strings))
    return docs


def val_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def train_tokenizer(docs: list[str]) -> bytes:
    """A SentencePiece BPE model (the serialized proto) trained on the documents' lines."""
    lines = [line for doc in docs for line in doc.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        pad_id=0,
        bos_id=BOS_ID,
        eos_id=2,
        unk_id=3,
        character_coverage=0.9995,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def encode(sp: spm.SentencePieceProcessor, docs: list[str], max_tokens: int | None = None) -> np.ndarray:
    """``[BOS] + ids`` per document, concatenated; with ``max_tokens``, whole documents up to it."""
    parts, total = [], 0
    for doc in docs:
        ids = [BOS_ID, *sp.encode(doc)]
        if max_tokens is not None and total + len(ids) > max_tokens:
            break
        parts.append(ids)
        total += len(ids)
    return np.fromiter((t for ids in parts for t in ids), dtype=np.uint16, count=total)


def evaluate_demo(folder: Path, **settings) -> dict:
    """The engine's evaluation of the folder's model.bin on its val shard, fp32 on the CPU."""
    from pgttt.ttt.config import EvalConfig
    from pgttt.ttt.session import EvalSession

    session = EvalSession.load(folder / "model.bin", tokenizer=folder / TOKENIZER_FILE)
    config = EvalConfig(precision="fp32", compile=False, **settings)
    result = session.evaluate(folder / VAL_FILE, folder / TOKENIZER_FILE, config, device="cpu")
    keys = ("val_loss", "val_bpb", "tokens_scored", "bytes_scored")
    return {**{k: getattr(result, k) for k in keys}, "config": result.config, "seconds": result.timings["eval_s"]}


def build(out: Path, work: Path, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs = train_documents(), val_documents()
    proto = train_tokenizer(train_docs)
    (out / TOKENIZER_FILE).write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    train_tokens, val_tokens = encode(sp, train_docs), encode(sp, val_docs, VAL_MAX_TOKENS)
    write_shard(work / TRAIN_FILE, train_tokens)
    write_shard(out / VAL_FILE, val_tokens)
    shutil.copyfile(out / VAL_FILE, work / VAL_FILE)
    log(
        f"demo: {len(train_docs)} train documents, {len(train_tokens):,} tokens; "
        f"{len(val_tokens):,} val tokens; tokenizer {VOCAB_SIZE} pieces"
    )

    model_config, train_config = resolve_run_config(PRESET, list(OVERRIDES))
    job = TrainJob(
        data=work,
        tokenizer=out / TOKENIZER_FILE,
        output=out / "model.bin",
        device="cpu",
        compile=False,
        preset=PRESET,
        overrides=OVERRIDES,
    )
    run_training(model_config, train_config, job, log=log)

    sliding = evaluate_demo(out, ttt_epochs=0)
    ttt = evaluate_demo(out)
    metrics = {
        "model_sha256": hashlib.sha256((out / "model.bin").read_bytes()).hexdigest(),
        "tokenizer_sha256": hashlib.sha256(proto).hexdigest(),
        "val_tokens": len(val_tokens),
        "sliding": sliding,
        "ttt": ttt,
        "ttt_gain_bpb": sliding["val_bpb"] - ttt["val_bpb"],
        "built_with": {
            "command": "python -m pgttt.training.demo",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sentencepiece": spm.__version__,
            "train_documents": len(train_docs),
            "train_tokens": len(train_tokens),
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(
        f"demo: val_bpb {sliding['val_bpb']:.6f} sliding ({sliding['seconds']:.1f}s), "
        f"{ttt['val_bpb']:.6f} with TTT ({ttt['seconds']:.1f}s), gain {metrics['ttt_gain_bpb']:.6f}"
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgttt.training.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help=f"the demo folder (default {DEMO_DIR})")
    parser.add_argument("--work", type=Path, help="keep the training data folder here (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.work is not None:
        build(args.out, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="pgttt-demo-") as work:
            build(args.out, Path(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
