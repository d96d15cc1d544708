"""Importing the challenge's .ptz artifacts: lossless, every packing, wrong layouts and presets refused."""

from __future__ import annotations

import hashlib
import io
import json
import lzma

import brotli
import numpy as np
import pytest
import torch

from pgttt.checkpoints.config import PRESETS
from pgttt.checkpoints.format import CheckpointError, read_model_bin
from pgttt.checkpoints.loading import build_model, load_checkpoint
from pgttt.checkpoints.model import GPT
from pgttt.checkpoints.ptz import read_ptz
from pgttt.checkpoints.quant import QuantizedTensor, quantize_rows
from pgttt.main import main
from tests.conftest import shared_path  # module-scoped use: the conftest fixtures are per test

TINY = PRESETS["tiny"]
META = {"int6": "gptq (int6)", "int8": "gptq (int8)", "float16": "passthrough (float16)"}


# ---- writing artifacts the challenge's way (independently of pgttt's reader) ------------------------
def shuffle_like_the_challenge(data: bytes, stride: int) -> bytes:
    src = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(len(src), dtype=np.uint8)
    offset = 0
    for pos in range(stride):
        chunk = src[pos::stride]
        out[offset : offset + len(chunk)] = chunk
        offset += len(chunk)
    return b"BSHF" + bytes([stride]) + out.tobytes()


def pack(obj, compressor: str = "brotli", stride: int | None = 2) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    if stride is not None:
        data = shuffle_like_the_challenge(data, stride)
    return {
        "brotli": lambda d: brotli.compress(d, quality=1),
        "xz": lambda d: lzma.compress(d, preset=1),
        "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE, preset=1),
        "none": lambda d: d,
    }[compressor](data)


def unpack_brotli_bshf(data: bytes) -> bytes:
    """The inverse, for brotli + stride-2 BSHF only (what the record writes)."""
    raw = brotli.decompress(data)
    assert raw[:5] == b"BSHF\x02"
    body = np.frombuffer(raw[5:], dtype=np.uint8)
    half = (len(body) + 1) // 2
    plain = np.empty_like(body)
    plain[0::2], plain[1::2] = body[:half], body[half:]
    return plain.tobytes()


def challenge_layout(tensors: dict[str, QuantizedTensor]) -> dict:
    w, m = {}, {}
    for name, qt in tensors.items():
        m[name] = META[qt.scheme]
        if qt.scale is None:
            w[name] = qt.q
        else:
            w[name + ".q"], w[name + ".scale"] = qt.q, qt.scale
    return {"w": w, "m": m}


def tiny_tensors(seed: int = 0) -> dict[str, QuantizedTensor]:
    """The challenge's choices on the tiny preset: matrices int6, token embedding int8, the rest float16."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in GPT(TINY).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        scheme = "float16" if len(shape) < 2 else "int8" if name.startswith("tok_emb") else "int6"
        out[name] = quantize_rows(torch.randn(shape, generator=gen) * 0.1, scheme)
    return out


def float16_artifact(config) -> bytes:
    """An artifact for any config: every tensor passthrough float16."""
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in GPT(config).state_dict().items()}
    return pack(challenge_layout({n: quantize_rows(torch.randn(s), "float16") for n, s in shapes.items()}))


@pytest.fixture(scope="module")
def tensors():
    return tiny_tensors()


@pytest.fixture
def artifact(tmp_path, tensors):
    path = tmp_path / "final_model.int6.ptz"
    path.write_bytes(pack(challenge_layout(tensors)))
    return path


# ---- lossless import ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("compressor", "stride"),
    [
        ("brotli", 2),
        ("brotli", None),
        ("xz", 2),
        ("xz", None),
        ("lzma", 2),
        ("none", 2),
        ("none", None),
        ("brotli", 3),
        ("brotli", 1),
    ],
)
def test_every_packing_imports_the_same_integers_and_scales(tmp_path, tensors, compressor, stride):
    path = tmp_path / "a.ptz"
    path.write_bytes(pack(challenge_layout(tensors), compressor, stride))
    got = read_ptz(path, TINY)
    assert list(got) == list(tensors)
    for name, qt in tensors.items():
        assert got[name].scheme == qt.scheme and torch.equal(got[name].q, qt.q) and got[name].q.dtype == qt.q.dtype
        assert (qt.scale is None and got[name].scale is None) or torch.equal(got[name].scale, qt.scale)
    ckpt = load_checkpoint(path, preset="tiny")
    assert ckpt.provenance["shuffle_stride"] == stride
    assert ckpt.provenance["compression"] == compressor


def test_ptz_with_overrides_records_them(tmp_path):
    config = PRESETS["tiny"].with_overrides({"num_layers": 3, "xsa_last_n": 3, "mlp_mult": 3.0})
    path = tmp_path / "a.ptz"
    path.write_bytes(float16_artifact(config))
    ckpt = load_checkpoint(path, preset="tiny", overrides=["num_layers=3", "xsa_last_n=3", "mlp_mult=3"])
    assert ckpt.kind == "ptz" and ckpt.config == config
    assert ckpt.provenance["overrides"] == {"num_layers": 3, "xsa_last_n": 3, "mlp_mult": 3.0}
    assert ckpt.provenance["artifact_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == ckpt.sha256


def test_ptz_needs_a_preset(artifact):
    with pytest.raises(CheckpointError, match="carries no hyperparameters: give its training log"):
        load_checkpoint(artifact)


# ---- wrong files ----------------------------------------------------------------------------------
class WritesAFile:
    """Unpickling this calls open(marker, "w"): a stand-in for code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_artifact(tmp_path, marker_name: str) -> bytes:
    return pack({"w": {"x": WritesAFile(str(tmp_path / marker_name))}, "m": {}})


def test_a_pickle_that_runs_code_is_refused_not_executed(tmp_path):
    # The payload is really dangerous: an ordinary unpickle creates the marker file.
    torch.load(io.BytesIO(unpack_brotli_bshf(evil_artifact(tmp_path, "marker-sanity"))), weights_only=False)
    assert (tmp_path / "marker-sanity").exists()

    path = tmp_path / "evil.ptz"
    path.write_bytes(evil_artifact(tmp_path, "marker"))
    with pytest.raises(CheckpointError, match=r"refused to unpickle: .* could run code \(it references io\.open\)"):
        load_checkpoint(path, preset="tiny")
    assert not (tmp_path / "marker").exists()


def without_scale(tensors):
    layout = challenge_layout(tensors)
    del layout["w"]["blocks.0.mlp.fc.weight.scale"]
    return layout


def with_stray_tensor(tensors):
    layout = challenge_layout(tensors)
    layout["w"]["leftover"] = torch.zeros(3)
    return layout


def with_meta(tensors, name, meta):
    layout = challenge_layout(tensors)
    layout["m"][name] = meta
    return layout


def with_int6_value(tensors, value):
    bad = dict(tensors)
    qt = bad["blocks.2.attn.c_v.weight"]
    q = qt.q.clone()
    q[0, 0] = value
    bad["blocks.2.attn.c_v.weight"] = QuantizedTensor("int6", q, qt.scale)
    return challenge_layout(bad)


def with_dtype(tensors):
    layout = challenge_layout(tensors)
    layout["w"]["blocks.0.attn_scale"] = layout["w"]["blocks.0.attn_scale"].float()
    return layout


def old_record_layout(tensors):
    return {"quantized": {"tok_emb.weight": tensors["tok_emb.weight"].q}, "scales": {}, "passthrough": {}}


WRONG = [
    ("wrong preset", lambda t: pack(challenge_layout(t)), "tiny-flat", [], "missing keys: lm_head.weight"),
    (
        "wrong preset lists unexpected keys",
        lambda t: pack(challenge_layout(t)),
        "tiny-flat",
        [],
        "unexpected keys: skip_gates, blocks.3.attn_scale",
    ),
    (
        "wrong override: layers",
        lambda t: pack(challenge_layout(t)),
        "tiny",
        ["num_layers=3", "xsa_last_n=3"],
        "unexpected keys: blocks.3.attn_scale",
    ),
    (
        "wrong override: shapes",
        lambda t: pack(challenge_layout(t)),
        "tiny",
        ["mlp_mult=3"],
        "shape mismatches (file vs config): blocks.0.mlp.fc.weight (128, 64) vs (192, 64)",
    ),
    (
        "older record layout",
        lambda t: pack(old_record_layout(t)),
        "tiny",
        [],
        "unsupported payload layout: an older record's layout with top-level keys "
        "['passthrough', 'quantized', 'scales']",
    ),
    (
        "plain state dict",
        lambda t: pack({n: qt.dequantize() for n, qt in t.items()}),
        "tiny",
        [],
        "a plain state dict of 43 tensors",
    ),
    (
        "unknown top-level keys",
        lambda t: pack({"model": 1, "step": 2}),
        "tiny",
        [],
        "unsupported payload layout: top-level keys ['model', 'step']",
    ),
    ("not a dict", lambda t: pack([t["skip_weights"].q]), "tiny", [], "unsupported payload layout: a list, not a dict"),
    (
        "unknown meta string",
        lambda t: pack(with_meta(t, "blocks.1.mlp.fc.weight", "gptq (int4)")),
        "tiny",
        [],
        "unknown quantization meta 'gptq (int4)' (e.g. for blocks.1.mlp.fc.weight)",
    ),
    (
        "quantized entry without scales",
        lambda t: pack(without_scale(t)),
        "tiny",
        [],
        "m describes blocks.0.mlp.fc.weight as 'gptq (int6)' but w has no blocks.0.mlp.fc.weight.scale",
    ),
    (
        "stray tensor",
        lambda t: pack(with_stray_tensor(t)),
        "tiny",
        [],
        "w holds tensors that m does not describe: leftover",
    ),
    (
        "int6 value out of range",
        lambda t: pack(with_int6_value(t, 32)),
        "tiny",
        [],
        "blocks.2.attn.c_v.weight: int6 values exceed +-31",
    ),
    (
        "int6 value -128",
        lambda t: pack(with_int6_value(t, -128)),
        "tiny",
        [],
        "blocks.2.attn.c_v.weight: int6 values exceed +-31",
    ),
    (
        "passthrough not float16",
        lambda t: pack(with_dtype(t)),
        "tiny",
        [],
        "blocks.0.attn_scale: float16 passthrough holds torch.float32",
    ),
    ("random bytes", lambda t: bytes(range(7, 250)) * 10, "tiny", [], "not PGRP, brotli, xz or lzma compressed"),
    ("corrupt xz", lambda t: b"\xfd7zXZ\x00" + bytes(100), "tiny", [], "xz data is corrupt"),
    (
        "truncated brotli artifact",
        lambda t: pack(challenge_layout(t))[:5000],
        "tiny",
        [],
        "not PGRP, brotli, xz or lzma compressed",
    ),
    ("BSHF with stride 0", lambda t: b"BSHF\x00" + bytes(10), "tiny", [], "without a valid stride byte"),
    (
        "compressed data that is not torch.save",
        lambda t: brotli.compress(b"hello, world" * 10),
        "tiny",
        [],
        "decompressed data is not a torch.save archive",
    ),
]


@pytest.mark.parametrize(("make", "preset", "overrides", "fragment"), [c[1:] for c in WRONG], ids=[c[0] for c in WRONG])
def test_wrong_artifact_is_refused(tmp_path, tensors, make, preset, overrides, fragment):
    path = tmp_path / "final_model.int6.ptz"
    path.write_bytes(make(tensors))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, preset=preset, overrides=overrides)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message
    assert "\n" not in message


def test_wrong_preset_message_says_why(artifact):
    with pytest.raises(CheckpointError, match="wrong preset, log or overrides"):
        read_ptz(artifact, PRESETS["tiny-flat"])


# ---- the compat artifact (25 MB, the 2026-04-09 record's layout) -------------------------------------
@pytest.fixture(scope="module")
def compat_imported(tmp_path_factory):
    """Import the compat artifact through the CLI once; the artifact's own tensors, read independently."""
    artifact = shared_path("compat", "pg0409_s42.int6.ptz")
    tokenizer = shared_path("data", "tokenizers", "fineweb_8192_bpe.model")
    out = tmp_path_factory.mktemp("compat") / "model.bin"
    assert (
        main(["import", str(artifact), "--preset", "pg-2026-04-09", "--tokenizer", str(tokenizer), "-o", str(out)]) == 0
    )
    obj = torch.load(io.BytesIO(unpack_brotli_bshf(artifact.read_bytes())), weights_only=True)
    return artifact, out, obj["w"], obj["m"]


def test_compat_artifact_import_is_lossless(compat_imported):
    artifact, out, w, m = compat_imported
    mb = read_model_bin(out)
    assert mb.config == PRESETS["pg-2026-04-09"] and len(mb.tensors) == len(m) == 113
    assert mb.tokenizer is not None and mb.tokenizer.vocab_size == 8192
    assert mb.provenance["artifact_sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert mb.provenance["source"] == "import" and mb.provenance["preset"] == "pg-2026-04-09"
    for name, meta in m.items():
        if meta == "passthrough (float16)":
            expected = w[name].float()
        else:
            expected = w[name + ".q"].float() * w[name + ".scale"].float()[:, None]
            assert torch.equal(mb.tensors[name].q, w[name + ".q"]) and torch.equal(
                mb.tensors[name].scale, w[name + ".scale"]
            )
        assert torch.equal(mb.tensors[name].dequantize(), expected), name
    model = build_model(load_checkpoint(out), precision="fp32", device="cpu")
    assert torch.equal(
        model.blocks[4].mlp.fc.weight,
        w["blocks.4.mlp.fc.weight.q"].float() * w["blocks.4.mlp.fc.weight.scale"].float()[:, None],
    )


def test_compat_inspect_reports_the_parameter_count(compat_imported, capsys):
    artifact, out, _, _ = compat_imported
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == 35_944_536 and report["preset"] == "pg-2026-04-09"
    assert report["quantization"]["int8"]["tensors"] == 1 and report["quantization"]["int6"]["tensors"] == 66
    assert main(["inspect", str(artifact), "--preset", "pg-2026-04-09"]) == 0
    text = capsys.readouterr().out
    assert "parameters    35,944,536" in text
    assert "25,052,636 artifact + 0 code (--code-bytes not given: code counted as 0)" in text
    assert "OVER the limit by 9,052,636" in text
