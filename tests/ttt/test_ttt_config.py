"""EvalConfig: defaults, bounds that name the field, resolution for a model and device, adapted parameters."""

from __future__ import annotations

import json

import pytest

from pgttt.checkpoints.config import PRESETS
from pgttt.ttt.config import EvalConfig
from pgttt.ttt.errors import EvalError


def test_defaults_are_the_challenge_settings():
    cfg = EvalConfig()
    assert (cfg.stride, cfg.ttt_epochs, cfg.chunk_tokens, cfg.ttt_lr, cfg.ttt_momentum, cfg.batch_seqs) == (
        64,
        3,
        32768,
        0.005,
        0.9,
        32,
    )
    assert (cfg.grad_clip, cfg.lr_schedule, cfg.optimizer) == (1.0, "cosine", "sgd")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("seq_len", 0, "within 1..65536"),
        ("seq_len", 65537, "within 1..65536"),
        ("seq_len", 2.5, "must be an integer"),
        ("stride", 0, "within 1..65536"),
        ("ttt_epochs", -1, "within 0..100"),
        ("ttt_epochs", 101, "within 0..100"),
        ("ttt_epochs", True, "must be an integer"),
        ("chunk_tokens", 0, "within 1.."),
        ("ttt_lr", -0.1, "within 0.0..10.0"),
        ("ttt_lr", float("nan"), "must be finite"),
        ("ttt_momentum", 1.0, "(exclusive)"),
        ("batch_seqs", 0, "within 1..4096"),
        ("grad_clip", 0.0, "must be positive"),
        ("lr_schedule", "linear", "expected one of cosine, constant"),
        ("optimizer", "lion", "expected one of sgd, adamw"),
        ("adapt_include", ("",), "non-empty strings"),
        ("max_tokens", 0, "within 1.."),
        ("precision", "fp16", "expected one of bf16, fp32"),
        ("seed", -1, "within 0.."),
        ("compile", "yes", "true or false (or none"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(EvalError) as err:
        EvalConfig(**{field: value})
    assert str(err.value).startswith(f"{field}={value!r}:")
    assert message in str(err.value)


def test_stride_cannot_exceed_seq_len():
    with pytest.raises(EvalError, match="stride=65: must not exceed seq_len=64"):
        EvalConfig(seq_len=64, stride=65)
    tiny = PRESETS["tiny"]  # train_seq_len 128
    with pytest.raises(EvalError, match=r"stride=200: must not exceed seq_len=128 \(the checkpoint's train_seq_len\)"):
        EvalConfig(stride=200).resolved(tiny, "cpu")


def test_resolved_fills_every_default():
    cfg = EvalConfig().resolved(PRESETS["pg-2026-04-09"], "cpu")
    assert (cfg.seq_len, cfg.precision, cfg.compile) == (2048, "fp32", False)
    cuda = EvalConfig().resolved(PRESETS["tiny"], "cuda")
    assert (cuda.seq_len, cuda.precision, cuda.compile) == (128, "bf16", True)
    explicit = EvalConfig(seq_len=96, precision="fp32", compile=False).resolved(PRESETS["tiny"], "cuda")
    assert (explicit.seq_len, explicit.precision, explicit.compile) == (96, "fp32", False)


def test_round_trips_through_json():
    cfg = EvalConfig(seq_len=128, adapt_exclude=["tok_emb.*"], max_tokens=1000)
    assert cfg.adapt_exclude == ("tok_emb.*",)
    again = EvalConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(EvalError, match="unknown setting.*ttt_lrr"):
        EvalConfig.from_dict({"ttt_lrr": 0.1})


def test_lr_schedule():
    cosine = EvalConfig(ttt_lr=0.01)
    assert [round(cosine.lr_at(c, 5), 12) for c in range(5)] == [0.01, 0.008535533906, 0.005, 0.001464466094, 0.0]
    assert cosine.lr_at(0, 1) == 0.01
    assert EvalConfig(ttt_lr=0.01, lr_schedule="constant").lr_at(3, 5) == 0.01


def test_adapted_parameters():
    names = ["tok_emb.weight", "blocks.0.attn.c_q.weight", "blocks.0.attn_scale", "blocks.1.mlp.fc.weight"]
    assert EvalConfig().adapted(names) == names
    assert EvalConfig(adapt_exclude=("tok_emb.*",)).adapted(names) == names[1:]
    assert EvalConfig(adapt_include=("blocks.*.weight",), adapt_exclude=("*.attn.*",)).adapted(names) == [names[3]]
    with pytest.raises(EvalError, match="adapt_include: pattern 'block.*' matches no parameter"):
        EvalConfig(adapt_include=("block.*",)).adapted(names)
