"""model.bin: bit-exact round trips, atomic writes, every kind of damage refused, load_checkpoint/build_model."""

from __future__ import annotations

import hashlib
import json
import os

import brotli
import pytest
import torch

from pgttt.checkpoints import format as fmt
from pgttt.checkpoints.config import PRESETS, ModelConfig
from pgttt.checkpoints.format import (
    CheckpointError,
    TokenizerIdentity,
    parameter_count,
    quantization_summary,
    read_model_bin,
    save_model_bin,
    tokenizer_identity,
)
from pgttt.checkpoints.loading import build_model, load_checkpoint
from pgttt.checkpoints.model import GPT
from pgttt.checkpoints.quant import QuantizedTensor, quantize_rows

TOKENIZER = TokenizerIdentity(sha256="ab" * 32, vocab_size=1000, name="test.model")


def quantized_state(config: ModelConfig, seed: int = 0) -> dict[str, QuantizedTensor]:
    """Random weights with every scheme present: matrices int6 (token embedding int8), the rest float16."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in GPT(config).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=gen) * 0.1
        scheme = "float16" if len(shape) < 2 else "int8" if name.startswith("tok_emb") else "int6"
        out[name] = quantize_rows(w, scheme)
    return out


def assert_identical(a: dict[str, QuantizedTensor], b: dict[str, QuantizedTensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].scheme == b[name].scheme, name
        assert a[name].q.dtype == b[name].q.dtype and torch.equal(a[name].q, b[name].q), name
        if a[name].scale is None:
            assert b[name].scale is None, name
        else:
            assert b[name].scale.dtype == torch.float16 and torch.equal(a[name].scale, b[name].scale), name


@pytest.fixture(scope="module")
def tiny_tensors():
    return quantized_state(PRESETS["tiny"])


@pytest.fixture
def tiny_bin(tmp_path, tiny_tensors):
    path = tmp_path / "model.bin"
    save_model_bin(path, PRESETS["tiny"], tiny_tensors, tokenizer=TOKENIZER, provenance={"source": "test"})
    return path


# ---- round trips ------------------------------------------------------------------------------
# One name per distinct architecture: aliases (pr1493, pr1610, ...) hold the same config and would only add time.
@pytest.mark.parametrize("name", list({config: name for name, config in reversed(PRESETS.items())}.values()))
def test_round_trip_is_bit_exact_for_every_preset(tmp_path, name):
    config = PRESETS[name]
    tensors = quantized_state(config, seed=1)
    path = tmp_path / "model.bin"
    provenance = {"source": "test", "steps": 3, "nested": {"lr": 0.01}}
    save_model_bin(path, config, tensors, tokenizer=TOKENIZER, provenance=provenance)
    mb = read_model_bin(path)
    assert mb.config == config and mb.tokenizer == TOKENIZER and mb.provenance == provenance
    assert_identical(tensors, mb.tensors)
    assert mb.size_bytes == path.stat().st_size and path.stat().st_mode & 0o777 == 0o644
    assert mb.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert parameter_count(mb.tensors) == config.num_parameters()


def test_without_tokenizer_and_in_any_tensor_order(tmp_path, tiny_tensors):
    path = tmp_path / "model.bin"
    shuffled = dict(reversed(list(tiny_tensors.items())))
    save_model_bin(path, PRESETS["tiny"], shuffled, tokenizer=None, provenance={})
    mb = read_model_bin(path)
    assert mb.tokenizer is None
    assert_identical(tiny_tensors, mb.tensors)  # stored in state-dict order


def test_summary_counts_schemes(tiny_tensors):
    summary = quantization_summary(tiny_tensors)
    config = PRESETS["tiny"]
    assert list(summary) == ["int6", "int8", "float16"]
    assert summary["int8"] == {"tensors": 1, "parameters": 1024 * 64, "bytes": 1024 * 64 + 2 * 1024}
    assert sum(s["parameters"] for s in summary.values()) == config.num_parameters()
    assert sum(s["tensors"] for s in summary.values()) == len(tiny_tensors)


# ---- writing safely -----------------------------------------------------------------------------
def test_failed_write_leaves_no_partial_file(tmp_path, tiny_tensors, monkeypatch):
    path = tmp_path / "model.bin"
    save_model_bin(path, PRESETS["tiny"], tiny_tensors, tokenizer=None, provenance={"run": 1})
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fmt.os, "fsync", broken_fsync)
    with pytest.raises(CheckpointError, match="cannot write: No space left on device"):
        save_model_bin(path, PRESETS["tiny"], tiny_tensors, tokenizer=None, provenance={"run": 2})
    with pytest.raises(CheckpointError, match="cannot write"):
        save_model_bin(tmp_path / "new.bin", PRESETS["tiny"], tiny_tensors, tokenizer=None, provenance={})
    assert sorted(os.listdir(tmp_path)) == ["model.bin"]  # no temp file, no new.bin
    assert path.read_bytes() == before


def test_save_refuses_invalid_tensors(tmp_path, tiny_tensors):
    bad = dict(tiny_tensors)
    qt = bad["blocks.0.mlp.fc.weight"]
    bad["blocks.0.mlp.fc.weight"] = QuantizedTensor("int6", torch.full_like(qt.q, 40), qt.scale)
    with pytest.raises(CheckpointError, match="refusing to write: blocks.0.mlp.fc.weight: int6 values exceed"):
        save_model_bin(tmp_path / "m.bin", PRESETS["tiny"], bad, tokenizer=None, provenance={})
    with pytest.raises(CheckpointError, match="missing keys: skip_weights"):
        partial = {k: v for k, v in tiny_tensors.items() if k != "skip_weights"}
        save_model_bin(tmp_path / "m.bin", PRESETS["tiny"], partial, tokenizer=None, provenance={})
    with pytest.raises(CheckpointError, match="provenance is not JSON"):
        save_model_bin(tmp_path / "m.bin", PRESETS["tiny"], tiny_tensors, tokenizer=None, provenance={"x": object()})
    assert not any(tmp_path.iterdir())


# ---- damaged and wrong files ----------------------------------------------------------------------
def reseal(body: bytes) -> bytes:
    """A body (everything before the checksum) with a valid checksum appended."""
    return body + hashlib.sha256(body).digest()


def repack(data: bytes, edit) -> bytes:
    """Decode a model.bin, let ``edit(header, raw) -> raw`` change it, re-encode with a valid checksum."""
    _, _, header_len, _ = fmt._PREFIX.unpack_from(data)
    start = fmt._PREFIX.size
    header = json.loads(data[start : start + header_len])
    raw = fmt.byte_unshuffle(brotli.decompress(data[start + header_len : -32]), 2)
    raw = edit(header, bytearray(raw))
    header["payload"]["raw_bytes"] = len(raw)
    return fmt._encode(header, bytes(raw))


def flip(offset_of):
    def damage(data: bytes) -> bytes:
        i = offset_of(data)
        return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :]

    return damage


def header_len(data: bytes) -> int:
    return fmt._PREFIX.unpack_from(data)[2]


def tensor_entry(header: dict, name: str) -> dict:
    return next(t for t in header["tensors"] if t["name"] == name)


def drop_last_tensor(header, raw):
    last = header["tensors"].pop()
    return raw[: last["q"][0]]


def add_extra_tensor(header, raw):
    header["tensors"].append(
        {"name": "extra.weight", "scheme": "float16", "shape": [2], "q": [len(raw), 4], "scale": None, "lqer": None}
    )
    return raw + bytes(4)


def short_scales(header, raw):
    entry = tensor_entry(header, "blocks.1.attn.c_q.weight")
    entry["scale"][1] -= 2
    return raw


def int6_value(value):
    def edit(header, raw):
        raw[tensor_entry(header, "blocks.1.attn.c_q.weight")["q"][0] + 5] = value & 0xFF
        return raw

    return edit


def set_header(key, value):
    def edit(header, raw):
        header[key] = value
        return raw

    return edit


def set_config(**changes):
    def edit(header, raw):
        header["config"].update(changes)
        return raw

    return edit


def future_version(data: bytes) -> bytes:
    body = bytearray(data[:-32])
    body[8:12] = (fmt.FORMAT_VERSION + 1).to_bytes(4, "little")
    return reseal(bytes(body))


def bad_json_header(data: bytes) -> bytes:
    body = bytearray(data[:-32])
    body[fmt._PREFIX.size] = ord("[")  # '{' -> '[': no longer a JSON object
    return reseal(bytes(body))


DAMAGE = [
    ("truncated in the prefix", lambda d: d[:20], "truncated: 20 bytes"),
    ("truncated in the header", lambda d: d[: fmt._PREFIX.size + 10], "truncated: the prefix announces"),
    ("truncated in the payload", lambda d: d[: len(d) // 2], "truncated: the prefix announces"),
    ("truncated in the checksum", lambda d: d[:-5], "truncated: the prefix announces"),
    ("trailing bytes", lambda d: d + b"\0", "has trailing bytes"),
    ("bit flip in the header", flip(lambda d: fmt._PREFIX.size + 40), "checksum mismatch"),
    ("bit flip in the payload", flip(lambda d: fmt._PREFIX.size + header_len(d) + 100), "checksum mismatch"),
    ("bit flip in the checksum", flip(lambda d: len(d) - 1), "checksum mismatch"),
    ("bit flip in a length field", flip(lambda d: 13), "the prefix announces"),
    ("wrong magic", lambda d: b"\x89PNG\r\n\x1a\n" + d[8:], "not a pgttt model.bin (wrong magic"),
    ("bit flip in the magic", flip(lambda d: 0), "wrong magic"),
    ("future format version", future_version, "format version 3 is newer than this pgttt reads"),
    ("header is not a JSON object", bad_json_header, "header is not valid JSON"),
    ("header missing a tensor", lambda d: repack(d, drop_last_tensor), "missing keys: blocks.3.mlp.proj.weight"),
    ("header with an extra tensor", lambda d: repack(d, add_extra_tensor), "unexpected keys: extra.weight"),
    (
        "header config disagrees with tensors",
        lambda d: repack(d, set_config(model_dim=32, num_heads=2)),
        "shape mismatches (file vs config): skip_weights (3, 64) vs (3, 32)",
    ),
    ("header config invalid", lambda d: repack(d, set_config(num_heads=3)), "num_heads=3: must divide model_dim"),
    (
        "scales do not match rows",
        lambda d: repack(d, short_scales),
        "tensor blocks.1.attn.c_q.weight scales (one per row): byte span",
    ),
    ("int6 value above +31", lambda d: repack(d, int6_value(32)), "blocks.1.attn.c_q.weight: int6 values exceed +-31"),
    ("int6 value -128", lambda d: repack(d, int6_value(-128)), "blocks.1.attn.c_q.weight: int6 values exceed +-31"),
    (
        "unknown compression",
        lambda d: repack(d, set_header("payload", {"compression": "zstd", "shuffle_stride": 2, "raw_bytes": 0})),
        "unsupported payload compression 'zstd'",
    ),
    ("unexpected header key", lambda d: repack(d, set_header("optimizer", {})), "header must have exactly the keys"),
    ("tokenizer entry malformed", lambda d: repack(d, set_header("tokenizer", {"sha256": 1})), "header tokenizer"),
]


@pytest.mark.parametrize(("damage", "fragment"), [c[1:] for c in DAMAGE], ids=[c[0] for c in DAMAGE])
def test_damaged_model_bin_is_refused(tiny_bin, damage, fragment):
    tiny_bin.write_bytes(damage(tiny_bin.read_bytes()))
    with pytest.raises(CheckpointError) as info:
        read_model_bin(tiny_bin)
    message = str(info.value)
    assert message.startswith(f"{tiny_bin}: ") and fragment in message
    assert "\n" not in message


def test_repack_without_damage_reads_back(tiny_bin, tiny_tensors):
    """The damage helpers re-encode faithfully, so each refusal above is caused by its one change."""
    tiny_bin.write_bytes(repack(tiny_bin.read_bytes(), lambda header, raw: raw))
    assert_identical(tiny_tensors, read_model_bin(tiny_bin).tensors)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.mkdir(), "is a directory, not a file"),
        (lambda p: None, "no such file"),
    ],
    ids=["empty file", "a directory", "missing file"],
)
def test_unreadable_paths_are_refused(tmp_path, make, fragment):
    path = tmp_path / "model.bin"
    make(path)
    with pytest.raises(CheckpointError, match=f"^{path}: {fragment}"):
        read_model_bin(path)
    with pytest.raises(CheckpointError, match=fragment):
        load_checkpoint(path)


# ---- tokenizer identity -------------------------------------------------------------------------
def test_tokenizer_identity(sp1024_tokenizer):
    identity = tokenizer_identity(sp1024_tokenizer)
    assert identity.vocab_size == 1024 and identity.name == "fineweb_1024_bpe.model"
    assert identity.sha256 == hashlib.sha256(sp1024_tokenizer.read_bytes()).hexdigest()


def test_not_a_tokenizer_is_refused(tmp_path):
    path = tmp_path / "fake.model"
    path.write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match=f"{path}: not a SentencePiece model"):
        tokenizer_identity(path)


# ---- load_checkpoint / build_model ------------------------------------------------------------------
def test_load_checkpoint_model_bin(tiny_bin, tiny_tensors):
    ckpt = load_checkpoint(tiny_bin)
    assert ckpt.kind == "model.bin" and ckpt.config == PRESETS["tiny"] and ckpt.tokenizer == TOKENIZER
    assert ckpt.provenance == {"source": "test"} and ckpt.size_bytes == tiny_bin.stat().st_size
    assert_identical(tiny_tensors, ckpt.tensors)


def test_model_bin_refuses_preset_and_overrides(tiny_bin):
    for kwargs in ({"preset": "tiny"}, {"overrides": ["num_layers=4"]}):
        with pytest.raises(CheckpointError, match="a preset, log or overrides are not allowed"):
            load_checkpoint(tiny_bin, **kwargs)


def test_tokenizer_checked_against_checkpoint(tmp_path, tiny_tensors, sp1024_tokenizer, sp8192_tokenizer):
    path = tmp_path / "model.bin"
    identity = tokenizer_identity(sp1024_tokenizer)
    save_model_bin(path, PRESETS["tiny"], tiny_tensors, tokenizer=identity, provenance={})
    assert load_checkpoint(path, tokenizer=sp1024_tokenizer).tokenizer == identity
    with pytest.raises(CheckpointError, match="tokenizer fineweb_8192_bpe.model .* is not the one this checkpoint"):
        load_checkpoint(path, tokenizer=sp8192_tokenizer)
    save_model_bin(path, PRESETS["tiny"], tiny_tensors, tokenizer=None, provenance={})
    with pytest.raises(CheckpointError, match="has 8192 tokens, more than the model's vocab_size=1024"):
        load_checkpoint(path, tokenizer=sp8192_tokenizer)


def test_build_model_holds_the_dequantized_weights(tiny_bin, tiny_tensors):
    ckpt = load_checkpoint(tiny_bin)
    model = build_model(ckpt, precision="fp32", device="cpu")
    assert not model.training
    state = model.state_dict()
    for name, qt in tiny_tensors.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], qt.dequantize()), name
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()
    bf16 = build_model(ckpt, precision="bf16", device="cpu")
    assert bf16.tok_emb.weight.dtype == torch.bfloat16 and bf16.blocks[0].attn.c_q.weight.dtype == torch.float32


def test_built_models_are_independent_of_each_other_and_the_checkpoint(tiny_bin):
    ckpt = load_checkpoint(tiny_bin)
    first = build_model(ckpt, precision="fp32", device="cpu")
    second = build_model(ckpt, precision="fp32", device="cpu")
    q_before = ckpt.tensors["tok_emb.weight"].q.clone()
    with torch.no_grad():
        for p in first.parameters():
            p.add_(1.0)
    assert torch.equal(second.tok_emb.weight, ckpt.tensors["tok_emb.weight"].dequantize())
    assert torch.equal(ckpt.tensors["tok_emb.weight"].q, q_before)
    assert all(p.requires_grad for p in second.parameters())
