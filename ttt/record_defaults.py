"""The TTT settings each frontier record ran (spec section 1b, the logs' values), keyed by model preset.

A phased evaluation of a checkpoint of preset ``prNNNN`` fills every knob left unset (``None``) from
that record's row; a checkpoint of no record (a tiny test preset, a model.bin of unknown origin)
gets the leaderboard top's (``pr1855``, the 1.0611 record). Where a record's script default differs
from what its log ran, the row holds what ran and ``SCRIPT_DEFAULTS_DIFFER`` says so.
"""

from __future__ import annotations

from typing import Any

FALLBACK_RECORD = "pr1855"

# Shared by every per-document LoRA record (04-10 … 04-29).
_COMMON: dict[str, Any] = {
    "ttt_lora_lr": 1e-4,
    "ttt_eval_seq_len": 2048,
    "ttt_batch_size": 64,
    "ttt_grad_steps": 1,
    "ttt_optimizer": "adam",
    "ttt_beta1": 0.0,
    "ttt_eps": 1e-10,
    "ttt_k_lora": True,
    "ttt_mlp_lora": True,
    "ttt_o_lora": True,
    "global_ttt_momentum": 0.9,
    "global_ttt_epochs": 1,
    "global_ttt_lr": 1e-3,
    "global_ttt_chunk_tokens": 32768,
    "global_ttt_batch_seqs": 32,
    "global_ttt_grad_clip": 1.0,
    "global_ttt_warmup_start_lr": 0.0,
    "global_ttt_warmup_chunks": 0,
    "global_ttt_respect_doc_boundaries": True,
    "val_doc_fraction": 1.0,
}
# Records without TTT_LORA_ALPHA scale the adapters by 1: alpha = rank (resolved against the rank that runs).
NO_ALPHA = None

_LORA_0410 = {
    "ttt_lora_rank": 96,
    "ttt_lora_alpha": NO_ALPHA,
    "ttt_warm_start_a": False,
    "ttt_beta2": 0.999,
    "ttt_weight_decay": 0.5,
}
# 04-23 (#1787) and its successors #1851, #1868: alpha/r scaling, warm-started A, weight decay 1.0.
_LORA_0423 = {
    "ttt_lora_rank": 96,
    "ttt_lora_alpha": 144.0,
    "ttt_warm_start_a": True,
    "ttt_beta2": 0.999,
    "ttt_weight_decay": 1.0,
}
_PHASES_0414 = {"phased_ttt_prefix_docs": 2000, "phased_ttt_num_phases": 3}
_NO_PHASES = {"phased_ttt_prefix_docs": 0, "phased_ttt_num_phases": 1}


def _row(**values: Any) -> dict[str, Any]:
    return {**_COMMON, **values}


RECORD_TTT_DEFAULTS: dict[str, dict[str, Any]] = {
    # 04-10 VarLenAttn: eval_val_ttt_lora = the phased evaluator without phases.
    "pr1530": _row(**_LORA_0410, ttt_chunk_size=32, **_NO_PHASES),
    # 04-13: one phase after 2000 documents, global lr 0.005, 3 epochs per chunk.
    "pr1610": _row(
        **_LORA_0410,
        ttt_chunk_size=32,
        phased_ttt_prefix_docs=2000,
        phased_ttt_num_phases=1,
        global_ttt_lr=0.005,
        global_ttt_epochs=3,
    ),
    "pr1626": _row(**_LORA_0410, ttt_chunk_size=48, **_PHASES_0414),  # 04-14: 3 phases over 2000 documents
    "pr1667": _row(**_LORA_0410, ttt_chunk_size=48, **_NO_PHASES),  # 04-16: LoRA only
    "pr1729": _row(**_LORA_0410, ttt_chunk_size=48, **_PHASES_0414),  # 04-18
    "pr1736": _row(**_LORA_0410, ttt_chunk_size=48, **_PHASES_0414),  # 04-19
    "pr1769": _row(**_LORA_0410, ttt_chunk_size=48, **_PHASES_0414),  # 04-22
    "pr1787": _row(**_LORA_0423, ttt_chunk_size=48, **_PHASES_0414),  # 04-23
    # 04-27, 1.0611 (leaderboard top): rank 80, beta2 0.99, wd 0.5, 3 phases over 2500 documents.
    "pr1855": _row(
        ttt_lora_rank=80,
        ttt_lora_alpha=144.0,
        ttt_warm_start_a=True,
        ttt_beta2=0.99,
        ttt_weight_decay=0.5,
        ttt_chunk_size=48,
        phased_ttt_prefix_docs=2500,
        phased_ttt_num_phases=3,
    ),
    "pr1851": _row(**_LORA_0423, ttt_chunk_size=48, **_PHASES_0414),
    "pr1868": _row(**_LORA_0423, ttt_chunk_size=48, **_PHASES_0414),  # 04-29: #1851's code
}

# As-run values that are not the script's os.environ default (spec 1b): a rerun with defaults differs.
SCRIPT_DEFAULTS_DIFFER: dict[str, dict[str, Any]] = {
    "pr1610": {"phased_ttt_prefix_docs": 10000},
    "pr1626": {"phased_ttt_num_phases": 1},
    "pr1736": {"phased_ttt_num_phases": 1},
    "pr1769": {"phased_ttt_num_phases": 1},
    "pr1787": {"phased_ttt_num_phases": 1},
    "pr1855": {
        "ttt_lora_rank": 96,
        "ttt_beta2": 0.999,
        "ttt_weight_decay": 1.0,
        "phased_ttt_prefix_docs": 2000,
        "phased_ttt_num_phases": 1,
    },
    "pr1851": {"phased_ttt_num_phases": 1},
    "pr1868": {"phased_ttt_num_phases": 1},
}


def record_for(preset: str | None) -> tuple[str, bool]:
    """The record whose row fills unset knobs, and whether it is the preset's own (not the fallback)."""
    if preset is not None and preset in RECORD_TTT_DEFAULTS:
        return preset, True
    return FALLBACK_RECORD, False
