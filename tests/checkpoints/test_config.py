"""ModelConfig: presets, parameter counts, overrides, and errors that name the offending key."""

from __future__ import annotations

import pytest
import torch

from pgttt.checkpoints.config import PRESETS, ConfigError, ModelConfig, parse_override, preset, resolve_config
from pgttt.checkpoints.model import GPT
from pgttt.errors import PgtttError


def module_parameters(config: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(config).parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_formula_matches_module(name):
    config = PRESETS[name]
    config.validate()
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.num_parameters() == module_parameters(config)


def test_record_preset_has_35_944_536_parameters():
    config = preset("pg-2026-04-09")
    assert config.num_parameters() == 35_944_536
    assert module_parameters(config) == 35_944_536


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("num_layers=9", ("num_layers", 9)),
        (" mlp_mult = 3 ", ("mlp_mult", 3.0)),
        ("ln_scale=false", ("ln_scale", False)),
        ("tie_embeddings=1", ("tie_embeddings", True)),
        ("rope_base=5e5", ("rope_base", 500000.0)),
    ],
)
def test_parse_override(text, expected):
    key, value = parse_override(text)
    assert (key, value) == expected
    assert type(value) is type(expected[1])


def test_resolve_config_applies_overrides_as_list_or_dict():
    from_list = resolve_config("tiny", ["num_layers=5", "xsa_last_n=2"])
    from_dict = resolve_config("tiny", {"num_layers": 5, "xsa_last_n": 2})
    assert from_list == from_dict
    assert (from_list.num_layers, from_list.xsa_last_n, from_list.model_dim) == (5, 2, PRESETS["tiny"].model_dim)
    assert resolve_config(None) == PRESETS["pg-2026-04-09"]


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: parse_override("num_layer=9"), "num_layer"),
        (lambda: parse_override("num_layers"), "expected key=value"),
        (lambda: parse_override("num_layers=nine"), "num_layers"),
        (lambda: parse_override("ln_scale=maybe"), "ln_scale"),
        (lambda: resolve_config("tiny", ["num_heads=3"]), "num_heads=3: must divide model_dim=64"),
        (lambda: resolve_config("tiny", ["num_kv_heads=3"]), "num_kv_heads=3: must divide num_heads=4"),
        (lambda: resolve_config(None, {"model_dim": 520}), "head dim model_dim/num_heads=65 must be even"),
        (lambda: resolve_config(None, {"loop_start": 12}), "loop_start=12"),
        (lambda: resolve_config(None, {"loop_end": 11}), "loop_end=11"),
        (lambda: resolve_config(None, {"xsa_last_n": 70000}), "xsa_last_n=70000"),
        (lambda: resolve_config(None, {"rope_dims": 15}), "rope_dims=15"),
        (lambda: resolve_config(None, {"vocab_size": 70000}), "vocab_size=70000"),
        (lambda: ModelConfig.from_dict({"num_layers": "11"}), "num_layers='11': must be an integer"),
        (lambda: ModelConfig.from_dict({"tie_embeddings": 1}), "tie_embeddings=1: must be true or false"),
        (lambda: ModelConfig.from_dict({"mlp_mult": "4"}), "mlp_mult='4': must be a number"),
        (lambda: ModelConfig.from_dict({"num_layers": 11, "dropout": 0.1}), "unknown architecture key(s) dropout"),
        (lambda: ModelConfig.from_dict([1, 2]), "expected a mapping"),
        (lambda: preset("gpt2"), "unknown preset 'gpt2'"),
    ],
)
def test_config_errors_name_the_key(make, fragment):
    with pytest.raises(ConfigError) as info:
        make()
    assert fragment in str(info.value)
    assert isinstance(info.value, PgtttError)
