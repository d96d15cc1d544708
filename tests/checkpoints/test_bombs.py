"""Issue 15: decompression bombs and oversized views cost bounded memory and end in one CheckpointError."""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import tracemalloc

import brotli
import pytest
import torch

from pgttt.checkpoints import format as fmt
from pgttt.checkpoints.config import PRESETS
from pgttt.checkpoints.format import CheckpointError, read_model_bin, save_model_bin
from pgttt.checkpoints.loading import load_checkpoint
from tests.checkpoints.test_ptz import challenge_layout, pack, tiny_tensors

BOMB = 256 << 20  # inflated size; the real ones reached 8 GiB
PEAK_LIMIT = 48 << 20  # far below the bomb: the reader stops early


def peak_while(fn) -> int:
    """Peak Python-heap bytes of a second call (the first pays one-off imports and caches)."""
    fn()
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def refused(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("compressor", ["brotli", "xz"])
def test_ptz_bomb_is_refused_with_bounded_memory(tmp_path, compressor):
    zeros = bytes(BOMB)
    data = brotli.compress(zeros, quality=1) if compressor == "brotli" else lzma.compress(zeros, preset=1)
    del zeros
    path = tmp_path / "bomb.ptz"
    path.write_bytes(data)
    messages = []
    peak = peak_while(lambda: messages.append(refused(path, preset="tiny")))
    assert "decompresses to more than" in messages[0] and "decompression bomb" in messages[0]
    assert peak < PEAK_LIMIT, peak


def reseal_with_payload(model_bin: bytes, payload: bytes, raw_bytes: int | None = None) -> bytes:
    _, version, header_len, _ = fmt._PREFIX.unpack_from(model_bin)
    header = json.loads(model_bin[fmt._PREFIX.size : fmt._PREFIX.size + header_len])
    if raw_bytes is not None:
        header["payload"]["raw_bytes"] = raw_bytes
    hb = json.dumps(header).encode()
    body = fmt._PREFIX.pack(fmt.MAGIC, version, len(hb), len(payload)) + hb + payload
    return body + hashlib.sha256(body).digest()


@pytest.fixture
def tiny_bin(tmp_path):
    path = tmp_path / "model.bin"
    save_model_bin(path, PRESETS["tiny"], tiny_tensors(), tokenizer=None, provenance={})
    return path


def test_model_bin_bomb_with_a_valid_checksum_is_refused_with_bounded_memory(tiny_bin):
    tiny_bin.write_bytes(reseal_with_payload(tiny_bin.read_bytes(), brotli.compress(bytes(BOMB), quality=1)))
    messages = []
    peak = peak_while(lambda: messages.append(refused(tiny_bin)))
    assert "payload does not decompress (decompresses to more than" in messages[0]
    assert peak < PEAK_LIMIT, peak


def test_model_bin_declaring_8_gib_is_refused_before_decompressing(tiny_bin):
    data = tiny_bin.read_bytes()
    _, _, header_len, payload_len = fmt._PREFIX.unpack_from(data)
    payload = data[fmt._PREFIX.size + header_len : fmt._PREFIX.size + header_len + payload_len]
    tiny_bin.write_bytes(reseal_with_payload(data, payload, raw_bytes=8 << 30))
    assert "raw_bytes 8589934592 is not the" in refused(tiny_bin)


def test_terabyte_view_in_a_2_kb_ptz_is_refused_not_materialised(tmp_path):
    layout = challenge_layout(tiny_tensors())
    layout["w"]["skip_gates"] = torch.zeros(1, dtype=torch.float16).expand(2**20, 2**19)
    path = tmp_path / "view.ptz"
    path.write_bytes(pack(layout))
    message = refused(path, preset="tiny")
    assert "tensor skip_gates of shape (1048576, 524288) claims 1,099,511,627,776 bytes" in message


def test_a_flipped_bit_in_a_brotli_ptz_is_not_always_detected(tmp_path):
    """What docs/model-bin.md says: a .ptz has no checksum, so a flipped bit in a value goes unnoticed
    (unlike model.bin and PGRP's lrzip streams). This pins that statement."""
    tensors = tiny_tensors()
    raw = io.BytesIO()
    torch.save(challenge_layout(tensors), raw)
    data = bytearray(raw.getvalue())
    needle = tensors["skip_weights"].q.numpy().tobytes()[:8]
    at = bytes(data).index(needle)
    data[at] ^= 0x01
    path = tmp_path / "flipped.ptz"
    path.write_bytes(brotli.compress(bytes(data), quality=1))
    got = load_checkpoint(path, preset="tiny").tensors["skip_weights"].q
    assert not torch.equal(got, tensors["skip_weights"].q)


def test_version_1_model_bin_still_reads(tiny_bin):
    data = tiny_bin.read_bytes()
    _, _, header_len, payload_len = fmt._PREFIX.unpack_from(data)
    header = json.loads(data[fmt._PREFIX.size : fmt._PREFIX.size + header_len])
    for entry in header["tensors"]:
        assert entry.pop("lqer") is None
    hb = json.dumps(header).encode()
    payload = data[fmt._PREFIX.size + header_len : fmt._PREFIX.size + header_len + payload_len]
    body = fmt._PREFIX.pack(fmt.MAGIC, 1, len(hb), len(payload)) + hb + payload
    tiny_bin.write_bytes(body + hashlib.sha256(body).digest())
    mb = read_model_bin(tiny_bin)
    for name, qt in tiny_tensors().items():
        assert torch.equal(mb.tensors[name].q, qt.q)
    header["tensors"][0]["scheme"] = "int7"
    hb = json.dumps(header).encode()
    body = fmt._PREFIX.pack(fmt.MAGIC, 1, len(hb), len(payload)) + hb + payload
    tiny_bin.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(CheckpointError, match="unknown scheme 'int7' \\(known in version 1: int6, int8, float16\\)"):
        read_model_bin(tiny_bin)
