"""The record presets: parameter counts of spec section 3, the pr1855 state dict of spec 4.1, and the
knobs each record ran (spec 1a)."""

from __future__ import annotations

import pytest
import torch

from pgttt.checkpoints.config import PRESETS, preset
from pgttt.checkpoints.format import expected_shapes
from pgttt.checkpoints.model import GPT

# Spec section 3 (and 5 for 04-09): parameters of each record family.
COUNTS = {
    "pg-2026-04-09": 35_944_536,
    "pr1493": 35_944_536,
    "pr1530": 35_944_602,
    "pr1610": 35_944_602,
    "pr1626": 35_944_602,
    "pr1729": 35_944_602,
    "pr1667": 35_945_671,
    "pr1736": 35_989_658,
    "pr1769": 35_989_658,
    "pr1787": 35_945_658,
    "pr1851": 35_945_671,
    "pr1855": 35_945_671,
    "pr1868": 35_945_671,
}


@pytest.mark.parametrize(("name", "count"), COUNTS.items())
def test_record_presets_have_the_spec_parameter_counts(name, count):
    with torch.device("meta"):
        model = GPT(preset(name))
    assert sum(p.numel() for p in model.parameters()) == count == preset(name).num_parameters()


def spec_pr1855_shapes() -> dict[str, tuple[int, ...]]:
    """Spec 4.1: the unbanked state dict of the 04-27 artifact."""
    shapes = {
        "tok_emb.weight": (8192, 512),
        "skip_weights": (8, 512),
        "skip_gates": (8, 512),
        "smear_gate.weight": (1, 12),
        "smear_lambda": (1,),
        "parallel_post_lambdas": (11, 2, 2),
        "parallel_resid_lambdas": (11, 2),
    }
    for i in range(11):
        shapes |= {
            f"blocks.{i}.attn.q_gain": (8,),
            f"blocks.{i}.attn_scale": (512,),
            f"blocks.{i}.mlp_scale": (512,),
            f"blocks.{i}.resid_mix": (2, 512),
            f"blocks.{i}.attn.c_q.weight": (512, 512),
            f"blocks.{i}.attn.c_k.weight": (256, 512),
            f"blocks.{i}.attn.c_v.weight": (256, 512),
            f"blocks.{i}.attn.proj.weight": (512, 512),
            f"blocks.{i}.attn.attn_gate_w": (8, 12),
            f"blocks.{i}.mlp.fc.weight": (2048, 512),
            f"blocks.{i}.mlp.proj.weight": (512, 2048),
        }
    return shapes


def test_pr1855_state_dict_is_the_artifacts():
    shapes = expected_shapes(preset("pr1855"))
    assert shapes == spec_pr1855_shapes()
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 35_945_671


def test_gate_names_per_family():
    assert "blocks.0.attn.attn_gate_proj.weight" in expected_shapes(preset("pr1667"))  # AttnOutGate (8, 12)
    assert expected_shapes(preset("pr1667"))["blocks.0.attn.attn_gate_proj.weight"] == (8, 12)
    assert expected_shapes(preset("pr1736"))["blocks.0.attn.attn_gate_w"] == (8, 512)  # dense GatedAttn
    assert "smear_gate.weight" not in expected_shapes(preset("pr1787"))
    assert "parallel_post_lambdas" not in expected_shapes(preset("pg-2026-04-09"))


@pytest.mark.parametrize(
    ("name", "knobs"),
    [
        ("pr1530", {"parallel_start_layer": 8, "rope_yarn": False, "smear_gate_enabled": False, "attn_gate": None}),
        ("pr1667", {"smear_gate_enabled": True, "smear_gate_bos_mask": False, "attn_gate": "attn_out"}),
        ("pr1736", {"smear_gate_enabled": False, "attn_gate": "dense"}),
        ("pr1787", {"attn_gate": "sparse", "sparse_attn_gate_scale": 1.0, "smear_gate_enabled": False}),
        ("pr1851", {"attn_gate": "sparse", "sparse_attn_gate_scale": 1.0, "smear_gate_bos_mask": True}),
        (
            "pr1855",
            {
                "attn_gate": "sparse",
                "sparse_attn_gate_scale": 0.5,
                "smear_gate_enabled": True,
                "smear_gate_bos_mask": True,
                "gate_window": 12,
                "parallel_final_lane": "mean",
            },
        ),
        ("pg-2026-04-09", {"family": "2026-04-09", "rope_yarn": True, "parallel_residual_start": 7}),
    ],
)
def test_presets_carry_what_the_records_ran(name, knobs):
    config = PRESETS[name]
    assert {k: getattr(config, k) for k in knobs} == knobs
    assert config.layer_schedule() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert config.xsa_layers() == range(11)
