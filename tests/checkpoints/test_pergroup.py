"""The PGRP per-group container: lossless and bit-exact on a tiny artifact with every kind, and a table of
damaged or hostile files, each refused with one clear error before anything large is allocated."""

from __future__ import annotations

import io
import os
import shutil
import struct
import time

import brotli
import pytest
import torch

from pgttt.checkpoints import lrzip
from pgttt.checkpoints.config import PRESETS
from pgttt.checkpoints.format import CheckpointError
from pgttt.checkpoints.loading import load_checkpoint
from pgttt.checkpoints.pergroup import GROUP_ORDER
from pgttt.checkpoints.ptz import read_ptz
from tests.helpers.artifact import (
    GROUPS,
    pack_pergroup,
    pack_streams,
    record_quantize,
    record_reconstruct,
    unpack_streams,
)

pytestmark = pytest.mark.skipif(shutil.which("lrzip") is None, reason="needs the lrzip program (apt-get install lrzip)")
CONFIG = PRESETS["tiny-frontier"]
SYM = "blocks.1.attn.c_q.weight"


@pytest.fixture(scope="module")
def record():
    w, m = record_quantize(CONFIG, seed=3, sym_lqer=SYM)
    return w, m, pack_pergroup(w, m, CONFIG.num_layers)


def test_pergroup_is_lossless_and_dequantizes_bit_exact(tmp_path, record):
    w, m, data = record
    path = tmp_path / "final_model.int6.ptz"
    path.write_bytes(data)
    got = read_ptz(path, CONFIG)
    expected = record_reconstruct(w, m)
    assert set(got) == set(expected)
    for name, qt in got.items():
        key = ".gq" if m[name] == "gate_int8_row" else ".q"
        if m[name] != "passthrough (float16)":
            assert torch.equal(qt.q, w[name + key]), name
        assert qt.dequantize().dtype == torch.float32
        assert torch.equal(qt.dequantize(), expected[name]), name
    assert got["tok_emb.weight"].scheme == "int7" and got["tok_emb.weight"].lqer.kind == "asym"
    assert got["blocks.0.mlp.fc.weight"].lqer.group == 64 and got[SYM].lqer.kind == "sym"
    assert got["blocks.2.attn.attn_gate_w"].scheme == "gate_int8_row"
    # The LQER term is really there: without it the weight differs.
    plain = got["tok_emb.weight"].q.float() * got["tok_emb.weight"].scale.float()[:, None]
    assert not torch.equal(plain, expected["tok_emb.weight"])
    assert load_checkpoint(path, preset="tiny-frontier").provenance["compression"] == "pergroup"


# ---- damaged and hostile files ------------------------------------------------------------------
def edit_stream(index, change):
    def make(data):
        streams = unpack_streams(data)
        streams[index] = change(streams[index])
        return pack_streams(streams)

    return make


def edit_remainder(change):
    def rewrite(stream):
        obj = torch.load(io.BytesIO(brotli.decompress(stream)), weights_only=True)
        change(obj)
        buf = io.BytesIO()
        torch.save(obj, buf)
        return brotli.compress(buf.getvalue(), quality=1)

    return edit_stream(7, rewrite)


def set_count(n):
    return lambda d: d[:4] + struct.pack("<I", n) + d[8:]


def set_length(index, value):
    return lambda d: d[: 8 + 4 * index] + struct.pack("<I", value) + d[12 + 4 * index :]


class RunsCode:
    def __reduce__(self):
        return (print, ("pwned",))


def pickle_with_code(stream):
    buf = io.BytesIO()
    torch.save({"r": {"x": RunsCode()}, "m": {}, "s": {}}, buf)
    return brotli.compress(buf.getvalue())


def duplicate_row(perm_stream):
    raw = bytearray(brotli.decompress(perm_stream))
    raw[2:4] = raw[0:2]  # the first permutation lists row perm[0] twice
    return brotli.compress(bytes(raw))


def out_of_range_row(perm_stream):
    raw = bytearray(brotli.decompress(perm_stream))
    raw[0:2] = struct.pack("<H", 65535)
    return brotli.compress(bytes(raw))


def lrzip_size(value):
    return lambda s: s[:6] + value.to_bytes(8, "little") + s[14:]


def flip_middle(s):
    i = len(s) // 2
    return s[:i] + bytes([s[i] ^ 0x01]) + s[i + 1 :]


def meta(name, value):
    return edit_remainder(lambda o: o["m"].__setitem__(name, value))


def shapes(group, value):
    return edit_remainder(lambda o: o["s"].__setitem__(group, value))


def remainder_tensor(name, value):
    return edit_remainder(lambda o: o["r"].__setitem__(name, value))


HOSTILE = [
    ("magic only", lambda d: d[:4], "PGRP container truncated: 4 bytes"),
    ("cut inside the stream table", lambda d: d[:20], "truncated inside its stream table"),
    ("truncated body", lambda d: d[:-100], "run past the end of the file"),
    ("trailing bytes", lambda d: d + b"\0" * 3, "leave trailing bytes"),
    ("stream count 1000", set_count(1000), "declares 1000 streams; the record's layout has 9"),
    ("stream count 2**32-1", set_count(2**32 - 1), "declares 4294967295 streams"),
    ("stream length beyond the file", set_length(0, 2**31), "run past the end of the file"),
    ("empty remainder", edit_stream(7, lambda s: b""), "remainder stream (7) is empty"),
    ("corrupt remainder", edit_stream(7, lambda s: s[:10] + bytes(50)), "PGRP remainder stream: brotli data is"),
    (
        "remainder bomb",
        edit_stream(7, lambda s: brotli.compress(bytes(256 << 20), quality=1)),
        "decompresses to more than",
    ),
    ("remainder pickle runs code", edit_stream(7, pickle_with_code), "refused to unpickle"),
    ("remainder without shapes", edit_remainder(lambda o: o.pop("s")), "must be a dict with keys ['m', 'r', 's']"),
    (
        "declared shape disagrees",
        shapes("attn.c_k.weight.q", [(33, 64)] + [(32, 64)] * 3),
        "PGRP declares blocks.0.attn.c_k.weight.q with shape (33, 64); the architecture has shape (32, 64)",
    ),
    (
        "declared terabyte tensor",
        shapes("_tok_emb.weight.q", [(2**20, 2**20)]),
        "PGRP declares tok_emb.weight.q with shape (1048576, 1048576)",
    ),
    ("unknown group", shapes("attn.c_z.weight.q", [(2, 2)]), "unknown groups ['attn.c_z.weight.q']"),
    ("a layer missing", shapes("mlp.proj.weight.q", [(64, 128)] * 3), "declares 3 tensors; the architecture has 4"),
    ("shapes for an empty stream", edit_stream(6, lambda s: b""), "declares 4 shapes but its stream is empty"),
    ("permutation lists a row twice", edit_stream(8, duplicate_row), "is not a permutation of 0..1023"),
    ("permutation row out of range", edit_stream(8, out_of_range_row), "is not a permutation"),
    (
        "permutations too short",
        edit_stream(8, lambda s: brotli.compress(brotli.decompress(s)[:-2])),
        "permutation stream holds",
    ),
    ("permutations missing", edit_stream(8, lambda s: b""), "permutation stream (8) is empty"),
    ("group stream not lrzip", edit_stream(0, lambda s: b"GARBAGE" * 10), "not an lrzip stream"),
    ("lrzip header announces another size", edit_stream(0, lrzip_size(10**12)), "lrzip header announces"),
    ("lrzip stream truncated", edit_stream(0, lambda s: s[: len(s) // 2]), "PGRP group stream: lrzip failed"),
    ("lrzip stream with a flipped bit", edit_stream(0, flip_middle), "PGRP group stream: lrzip"),
    (
        "LQER factor of the wrong shape",
        remainder_tensor("tok_emb.weight.lqA_a", torch.zeros(1023, 4, dtype=torch.int8)),
        "tok_emb.weight: LQER a has shape (1023, 4), expected (1024, 4)",
    ),
    (
        "LQER group scales that do not divide B",
        remainder_tensor("tok_emb.weight.lqBs_a", torch.ones(5).half()),
        "not a whole number of groups",
    ),
    (
        "LQER asym A out of range",
        remainder_tensor("blocks.0.mlp.fc.weight.lqA_a", torch.full((128, 4), 2, dtype=torch.int8)),
        "LQER A values exceed [-2, 1]",
    ),
    (
        "gate value -128",
        remainder_tensor("blocks.1.attn.attn_gate_w.gq", torch.full((4, 6), -128, dtype=torch.int8)),
        "gate_int8_row values exceed +-127",
    ),
    ("unknown category", meta("blocks.0.mlp.fc.weight", "gptq (int5)+lqer_asym"), "unknown quantization meta"),
    (
        "terabyte view in the remainder",
        remainder_tensor("skip_gates", torch.zeros(1, dtype=torch.float16).expand(2**20, 2**19)),
        "a view larger than its data",
    ),
]


@pytest.mark.parametrize(("make", "fragment"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_pergroup_file_is_refused(tmp_path, record, make, fragment):
    path = tmp_path / "final_model.int6.ptz"
    path.write_bytes(make(record[2]))
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        read_ptz(path, CONFIG)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message, message
    assert "\n" not in message
    assert time.perf_counter() - start < 60


def test_without_lrzip_a_pgrp_artifact_is_refused_saying_so(tmp_path, record, monkeypatch):
    path = tmp_path / "final_model.int6.ptz"
    path.write_bytes(record[2])
    monkeypatch.setenv("PATH", str(tmp_path))  # no lrzip on it
    with pytest.raises(
        CheckpointError,
        match=r"PGRP \(per-group lrzip\) artifact and the lrzip program is not "
        r"installed; install the lrzip program \(Debian/Ubuntu: apt-get",
    ):
        read_ptz(path, CONFIG)


def test_lrzip_output_beyond_the_declared_size_is_cut_off():
    data = unpack_streams(pack_pergroup(*record_quantize(CONFIG, seed=1)[:2], CONFIG.num_layers))[1]
    size = lrzip.declared_size(data)
    lied = data[:6] + (size // 4).to_bytes(8, "little") + data[14:]
    with pytest.raises(lrzip.LrzipError, match=f"runs past the {size // 4} bytes"):
        lrzip.decode(lied, size // 4)


def test_lrzip_timeout_is_one_clear_error(tmp_path, monkeypatch):
    # A stand-in lrzip that never finishes: a real small stream can decode within any short timeout.
    fake = tmp_path / "lrzip"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    stream = lrzip.MAGIC + bytes([0, 6]) + (100).to_bytes(8, "little") + bytes(16)
    start = time.monotonic()
    with pytest.raises(lrzip.LrzipError, match=r"lrzip took longer than 0\.2 s"):
        lrzip.decode(stream, 100, timeout_s=0.2)
    assert time.monotonic() - start < 30  # killed, not waited for


def test_group_order_is_the_records():
    assert GROUPS == list(GROUP_ORDER)
