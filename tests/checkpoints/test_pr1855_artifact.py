"""The compat artifact in the 2026-04-27 record's PGRP container: import -> inspect, and every weight equal to
spec 4.1's reconstruction bit for bit. lrzip runs once per session (about 200 s of CPU on 2 cores)."""

from __future__ import annotations

import io
import json
import shutil

import brotli
import numpy as np
import pytest
import torch

from pgttt.checkpoints import lrzip
from pgttt.checkpoints.config import PRESETS
from pgttt.checkpoints.format import read_model_bin
from pgttt.main import main
from tests.checkpoints.test_hparams_log import write_log
from tests.conftest import shared_path
from tests.helpers.artifact import GROUPS, SORTED_GROUPS, record_reconstruct, unpack_streams

pytestmark = pytest.mark.skipif(shutil.which("lrzip") is None, reason="needs the lrzip program (apt-get install lrzip)")
PARAMS = 35_945_671
ARCH = {
    k: v
    for k, v in PRESETS["pr1855"].to_dict().items()
    if k not in ("family", "parallel_residual_start", "smear_gate_bos_mask")
}
QUANT = {
    "embed_bits": 7,
    "matrix_bits": 6,
    "lqer_enabled": True,
    "lqer_top_k": 3,
    "lqer_rank": 4,
    "gated_attn_quant_gate": True,
    "ttt_lora_rank": 80,
    "compressor": "pergroup",
}


@pytest.fixture(scope="session")
def imported(tmp_path_factory, pr1855_import):
    """Import again through the CLI with a record-format log; lrzip's outputs come from the session's first
    import (``pr1855_import``, which ran the real program on the same streams), so lrzip runs once."""
    artifact = shared_path("compat", "pr1855", "r0427_s42.int6.ptz")
    tmp = tmp_path_factory.mktemp("pr1855-log")
    log = write_log(tmp / "train_seed42.log", ARCH, QUANT, params=PARAMS)
    outputs = pr1855_import[1]
    real = lrzip.decode
    lrzip.decode = lambda data, size, **kw: outputs[bytes(data)] if bytes(data) in outputs else real(data, size, **kw)
    try:
        out = tmp / "model.bin"
        tokenizer = shared_path("data", "tokenizers", "fineweb_8192_bpe.model")
        assert main(["import", str(artifact), "--log", str(log), "--tokenizer", str(tokenizer), "-o", str(out)]) == 0
    finally:
        lrzip.decode = real
    return artifact, out, outputs


def plain_decode(artifact, outputs) -> tuple[dict, dict]:
    """Spec 4.2 written out: groups column-major, rows un-permuted, remainder and categories."""
    streams = unpack_streams(artifact.read_bytes())
    obj = torch.load(io.BytesIO(brotli.decompress(streams[7])), weights_only=True)
    w, perms, at = dict(obj["r"]), np.frombuffer(brotli.decompress(streams[8]), dtype="<u2"), 0
    for i, group in enumerate(GROUPS):
        raw, offset = np.frombuffer(outputs[streams[i]], dtype=np.int8), 0
        names = [group[1:]] if group.startswith("_") else [f"blocks.{j}.{group}" for j in range(11)]
        for name, (rows, cols) in zip(names, obj["s"][group], strict=True):
            q = raw[offset : offset + rows * cols].reshape(cols, rows).T
            offset += rows * cols
            if group in SORTED_GROUPS:
                perm = perms[at : at + rows].astype(np.int64)
                at += rows
                original = np.empty_like(q)
                original[perm] = q  # stored row k is original row perm[k]
                q = original
            w[name] = torch.from_numpy(np.ascontiguousarray(q))
    return w, obj["m"]


def test_import_then_inspect_reports_the_records_parameters(imported, capsys):
    _, out, _ = imported
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == PARAMS and report["preset"] == "pr1855"
    assert {e["name"] for e in report["lqer"]} == {
        "tok_emb.weight",
        "blocks.0.attn.c_q.weight",
        "blocks.0.mlp.fc.weight",
    }
    assert report["quantization"]["int7"]["tensors"] == 1 and report["quantization"]["gate_int8_row"]["tensors"] == 11
    assert report["provenance"]["compression"] == "pergroup"


def test_every_weight_is_the_records_reconstruction_bit_for_bit(imported):
    artifact, out, outputs = imported
    w, m = plain_decode(artifact, outputs)
    expected = record_reconstruct(w, m)
    mb = read_model_bin(out)
    assert set(mb.tensors) == set(expected)
    for name, qt in mb.tensors.items():
        assert torch.equal(qt.dequantize(), expected[name]), name
