"""The bundled demo (checkpoints/demo/): its files validate, its recorded metrics reproduce, and
test-time training beats plain sliding-window scoring by the margin its README states."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import sentencepiece as spm

from pgttt.checkpoints.loading import load_checkpoint
from pgttt.training import demo
from pgttt.training.demo import DEMO_DIR, TOKENIZER_FILE, VAL_FILE
from pgttt.ttt.data import open_shard, write_shard

METRICS = json.loads((DEMO_DIR / "metrics.json").read_text())


def test_committed_files_validate():
    ckpt = load_checkpoint(DEMO_DIR / "model.bin", tokenizer=DEMO_DIR / TOKENIZER_FILE)
    assert ckpt.config.vocab_size == demo.VOCAB_SIZE and ckpt.config.train_seq_len == 256
    assert ckpt.provenance["source"] == "pgttt train" and list(ckpt.provenance["overrides"]) == list(demo.OVERRIDES)
    schemes = {qt.scheme for qt in ckpt.tensors.values()}
    assert schemes == {"int6", "int8", "float16"}  # GPTQ wrote both bit widths
    assert hashlib.sha256((DEMO_DIR / "model.bin").read_bytes()).hexdigest() == METRICS["model_sha256"]

    sp = spm.SentencePieceProcessor(model_file=str(DEMO_DIR / TOKENIZER_FILE))
    assert sp.vocab_size() == demo.VOCAB_SIZE
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.id_to_piece(sp.piece_to_id("\u2581")) == "\u2581"
    assert sp.is_byte(sp.piece_to_id("<0xE2>"))  # byte fallback

    val = np.asarray(open_shard(DEMO_DIR / VAL_FILE, vocab_size=demo.VOCAB_SIZE))
    assert len(val) == METRICS["val_tokens"] and val[0] == demo.BOS_ID
    assert len(val) - 1 > 2 * 32768  # three 32768-token chunks: TTT trains on two


def test_demo_folder_is_small():
    total = sum(p.stat().st_size for p in DEMO_DIR.iterdir())
    assert total < 2_000_000


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sliding", "ttt"])
def test_recorded_metrics_reproduce(kind):
    recorded = METRICS[kind]
    settings = {k: v for k, v in recorded["config"].items() if k not in ("precision", "compile")}
    result = demo.evaluate_demo(DEMO_DIR, **settings)
    assert result["tokens_scored"] == recorded["tokens_scored"] and result["bytes_scored"] == recorded["bytes_scored"]
    assert result["val_bpb"] == pytest.approx(recorded["val_bpb"], abs=1e-6)


def test_ttt_beats_sliding_by_the_stated_margin():
    readme = (DEMO_DIR / "README.md").read_text()
    margin = float(re.search(r"lowers val_bpb by at least ([0-9.]+)", readme).group(1))
    assert METRICS["sliding"]["config"]["ttt_epochs"] == 0
    ttt = METRICS["ttt"]["config"]
    assert (ttt["ttt_epochs"], ttt["chunk_tokens"], ttt["ttt_lr"], ttt["stride"]) == (3, 32768, 0.005, 64)
    # The recorded numbers are checked against the engine by test_recorded_metrics_reproduce.
    assert METRICS["sliding"]["val_bpb"] - METRICS["ttt"]["val_bpb"] >= margin > 0


def test_val_and_train_documents_differ():
    val = demo.val_documents()
    train = demo.train_documents()
    assert len(val) > 50 and len(train) > 300
    assert not set(val) & set(train)
    assert all(isinstance(doc, str) and doc.strip() for doc in val + train)


def test_shards_hold_documents_as_bos_plus_ids(tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_DIR / TOKENIZER_FILE))
    docs = ["First document.", "Second, longer document with more words."]
    tokens = demo.encode(sp, docs)
    write_shard(tmp_path / "s.bin", tokens)
    back = np.asarray(open_shard(tmp_path / "s.bin", vocab_size=demo.VOCAB_SIZE))
    first = sp.encode(docs[0])
    assert back.tolist() == [1, *first, 1, *sp.encode(docs[1])]
    assert demo.encode(sp, docs, max_tokens=len(first) + 1).tolist() == [1, *first]  # whole documents only
