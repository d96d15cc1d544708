"""The phased protocol's knobs: the records' as-run defaults, their provenance, and refused combinations."""

from __future__ import annotations

import dataclasses

import pytest

from pgttt.checkpoints.config import PRESETS
from pgttt.ttt.config import PHASED_KNOBS, EvalConfig
from pgttt.ttt.errors import EvalError
from pgttt.ttt.record_defaults import RECORD_TTT_DEFAULTS

TINY = PRESETS["tiny"]


def phased(**knobs) -> EvalConfig:
    return EvalConfig(protocol="phased", **knobs)


def test_every_record_row_sets_every_knob():
    for name, row in RECORD_TTT_DEFAULTS.items():
        assert set(row) == set(PHASED_KNOBS), name


def test_a_preset_gets_its_records_as_run_values():
    cfg = phased().resolved(TINY, "cpu", preset="pr1855")
    assert cfg.record_defaults == "pr1855"
    # 1.0611 ran rank 80, beta2 0.99, wd 0.5, 3 phases over 2500 documents (its script defaults differ).
    assert (cfg.ttt_lora_rank, cfg.ttt_beta2, cfg.ttt_weight_decay) == (80, 0.99, 0.5)
    assert (cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases, cfg.ttt_chunk_size) == (2500, 3, 48)
    assert cfg.lora_scale == pytest.approx(1.8)
    assert cfg.defaults_filled == PHASED_KNOBS
    old = phased().resolved(TINY, "cpu", preset="pr1610")  # 04-13: one phase, global lr 0.005, 3 epochs
    assert (old.ttt_chunk_size, old.phased_ttt_num_phases) == (32, 1)
    assert (old.global_ttt_lr, old.global_ttt_epochs) == (0.005, 3)
    assert old.ttt_warm_start_a is False and old.lora_scale == 1.0  # no alpha: scale 1


def test_given_knobs_win_and_provenance_survives_re_resolution():
    cfg = phased(ttt_lora_rank=8, ttt_lora_alpha=16.0, emulate_ranks=1).resolved(TINY, "cpu")
    assert cfg.record_defaults == "pr1855"  # a preset of no record: the leaderboard top's values
    assert "ttt_lora_rank" not in cfg.defaults_filled and "ttt_chunk_size" in cfg.defaults_filled
    assert cfg.lora_scale == 2.0
    assert cfg.resolved(TINY, "cpu") == cfg
    assert EvalConfig.from_dict(cfg.to_dict()) == cfg
    # A record without alpha scales by 1 at whatever rank runs.
    assert phased(record_defaults="pr1530", ttt_lora_rank=8).resolved(TINY, "cpu").lora_scale == 1.0


@pytest.mark.parametrize(
    ("knobs", "field", "message"),
    [
        (dict(ttt_lora_rank=0), "ttt_lora_rank", "within 1..4096"),
        (dict(ttt_lora_alpha=0.0), "ttt_lora_alpha", "must be positive"),
        (dict(ttt_beta2=1.0), "ttt_beta2", "(exclusive)"),
        (dict(ttt_eps=0.0), "ttt_eps", "must be positive"),
        (dict(ttt_optimizer="lion"), "ttt_optimizer", "expected one of adam, sgd"),
        (dict(ttt_warm_start_a=1), "ttt_warm_start_a", "true or false"),
        (dict(val_doc_fraction=1.5), "val_doc_fraction", "within 0.0..1.0"),
        (dict(phased_ttt_num_phases=0), "phased_ttt_num_phases", "within 1.."),
        (dict(emulate_ranks=0), "emulate_ranks", "within 1.."),
        (dict(max_docs=0), "max_docs", "within 1.."),
        (dict(record_defaults="pr9999"), "record_defaults", "expected one of pr1530"),
        (dict(ttt_chunk_size=600, ttt_eval_seq_len=512), "ttt_chunk_size", "must not exceed ttt_eval_seq_len=512"),
    ],
)
def test_bad_knobs_name_the_field(knobs, field, message):
    with pytest.raises(EvalError) as err:
        phased(**knobs)
    assert str(err.value).startswith(f"{field}=")
    assert message in str(err.value)


def test_impossible_combinations_after_resolution():
    with pytest.raises(EvalError, match="ttt_chunk_size=4096: must not exceed ttt_eval_seq_len=2048"):
        phased(ttt_chunk_size=4096).resolved(TINY, "cpu")
    with pytest.raises(EvalError, match="global_ttt_chunk_tokens=100: must be at least seq_len=128"):
        phased(global_ttt_chunk_tokens=100).resolved(TINY, "cpu")
    phased(global_ttt_chunk_tokens=100, phased_ttt_prefix_docs=0).resolved(TINY, "cpu")  # no phases: fine


def test_phased_knobs_are_refused_by_the_chunked_protocol():
    with pytest.raises(EvalError, match=r"ttt_lora_rank=8: only the phased protocol reads it \(protocol='chunked'\)"):
        EvalConfig(ttt_lora_rank=8)
    chunked = EvalConfig().resolved(TINY, "cpu")
    assert all(getattr(chunked, k) is None for k in PHASED_KNOBS)
    assert dataclasses.replace(chunked, protocol="phased").resolved(TINY, "cpu").record_defaults == "pr1855"
