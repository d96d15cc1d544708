"""``POST /estimate``: the reference evaluator's predicted TTT-loop seconds on 8xH100, without running anything."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from pgttt.api.schemas import error_responses
from pgttt.budget import BUDGET_S, BudgetError, estimate, make_settings
from pgttt.budget.settings import ChunkedSettings, PhasedSettings

from ..errors import invalid_field
from .deps import require_key

router = APIRouter(tags=["estimate"])
_KNOBS = {
    "chunked": set(ChunkedSettings.__dataclass_fields__) - {"protocol"},
    "phased": set(PhasedSettings.__dataclass_fields__) - {"protocol"},
}


class EstimateRequest(BaseModel):
    """The settings to price; knobs omitted take the record's values (chunked: 04-09's, phased: 1.0611's)."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"protocol": "chunked", "dataset": "sp8192", "ttt_epochs": 4, "chunk_tokens": 65536},
                {"protocol": "phased", "dataset": "caseops", "ttt_chunk_size": 32},
            ]
        },
    )

    protocol: Literal["chunked", "phased"] = "chunked"
    dataset: str = Field("sp8192", description="sp8192, caseops, sp4096, sp1024, or a dataset name containing one")
    budget_s: float = Field(BUDGET_S, gt=0)
    ttt_epochs: int | None = None
    chunk_tokens: int | None = None
    batch_seqs: int | None = None
    stride: int | None = None
    seq_len: int | None = None
    ttt_lora_rank: int | None = None
    ttt_chunk_size: int | None = None
    ttt_eval_seq_len: int | None = None
    ttt_batch_size: int | None = None
    ttt_grad_steps: int | None = None
    phased_ttt_prefix_docs: int | None = None
    phased_ttt_num_phases: int | None = None
    global_ttt_epochs: int | None = None
    global_ttt_chunk_tokens: int | None = None
    global_ttt_batch_seqs: int | None = None


class EstimateResponse(BaseModel):
    seconds: float = Field(description="predicted TTT-loop seconds of the record's script on 8xH100")
    low: float = Field(description="90 % band, low end")
    high: float
    budget_s: float
    fits_budget: bool = Field(description="decided by the reference prediction, not by pgttt's speed")
    confidence: float = Field(description="probability under the band that fits_budget is right")
    protocol: str
    family: str
    targets: int
    gpus: int
    settings: dict[str, Any]
    breakdown: dict[str, float]
    counted: str
    not_counted: str
    assumptions: list[str]


@router.post(
    "/estimate",
    response_model=EstimateResponse,
    dependencies=[Depends(require_key)],
    responses=error_responses(401, 422),
    summary="Predict the reference evaluator's TTT-loop seconds on 8xH100 for a setting (no job)",
)
async def post_estimate(body: EstimateRequest) -> EstimateResponse:
    values = body.model_dump(exclude={"protocol", "dataset", "budget_s"}, exclude_none=True)
    wrong = sorted(set(values) - _KNOBS[body.protocol])
    if wrong:
        raise invalid_field(wrong[0], f"{wrong[0]}: not a knob of the {body.protocol} protocol", values[wrong[0]])
    try:
        result = estimate(make_settings(body.protocol, values), dataset=body.dataset, budget_s=body.budget_s)
    except BudgetError as exc:
        raise invalid_field(exc.field or "settings", str(exc), exc.value) from exc
    return EstimateResponse(**result.to_dict())
