"""This evaluation projected onto the challenge's full val set on 8 GPUs: pgttt's speed, and the reference's.

The challenge's eval budget: the full val split (its first 50,000 documents) on 8 GPUs within 600 seconds. Its
size is per tokenizer family (``pgttt.budget.FAMILIES``: 40,540,160 SP8192 targets, 47,851,520 CaseOps).
"""

from __future__ import annotations

import math
from typing import Any

from pgttt.api import challenge
from pgttt.budget import BudgetError, ModelShape, estimate, family_for, settings_from_dict

from .data import ValSet

BUDGET_GPUS = challenge.REFERENCE_GPUS
BUDGET_S = challenge.EVAL_BUDGET_S


def dataset_family_hint(valset: ValSet) -> str:
    """What names the val set's family for the full-val projection: a byte sidecar means CaseOps, whatever the
    folder is called; otherwise the shards' paths (``fineweb10B_sp1024/...`` -> sp1024)."""
    if valset.sidecar is not None:
        return "caseops"
    return " ".join(str(f) for f in valset.files)


def project_full_eval(
    tokens_per_second: float,
    world_size: int,
    config: dict[str, Any] | None = None,
    dataset: str | None = None,
    model_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Two projections of this evaluation onto the challenge's full val set on 8 GPUs.

    ``pgttt``: this run's throughput on 8 GPUs of the kind it ran on (linear in GPUs). ``reference``: the record's
    own script on 8xH100 (``pgttt.budget``), which is what the 600 s rule is about, so it decides ``fits_budget``.
    """
    family = family_for(dataset)
    per_gpu = tokens_per_second / world_size
    seconds = family.targets / (per_gpu * BUDGET_GPUS) if per_gpu > 0 else math.inf
    pgttt = {
        "tokens": family.targets,
        "family": family.name,
        "gpus": BUDGET_GPUS,
        "seconds": seconds,
        "tokens_per_second_per_gpu": per_gpu,
        "assumes": "this run's tokens/s per device, on the same kind of device, scaling linearly to 8 "
        "(optimistic for TTT: smaller per-device training batches run slower per token)",
    }
    reference = None
    if config is not None:
        shape = ModelShape.from_model_config(model_config) if model_config else None
        try:
            reference = estimate(settings_from_dict(config), family=family, shape=shape, budget_s=BUDGET_S).to_dict()
        except BudgetError:
            reference = None  # settings the oracle cannot price: pgttt's projection decides, and says so
    fits = reference["fits_budget"] if reference is not None else seconds <= BUDGET_S
    return {
        "pgttt": pgttt,
        "reference": reference,
        "budget_s": BUDGET_S,
        "fits_budget": fits,
        "decided_by": "reference" if reference is not None else "pgttt",
    }
