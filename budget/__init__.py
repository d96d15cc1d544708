"""The budget oracle: what the challenge's reference evaluators would take on 8xH100 for a TTT setting.

The 600-second rule applies to a competitor's own ``train_gpt.py`` on 8xH100, not to pgttt, so budgets are
judged by this prediction (``estimate``), from a cost model calibrated on the records' logged eval times
(``calibration.json``). No torch: the sweep client on a laptop uses it too. See docs/budget.md.
"""

from .oracle import BUDGET_S, Estimate, calibration_rows, estimate, leave_one_out
from .settings import (
    FAMILIES,
    BudgetError,
    ChunkedSettings,
    ModelShape,
    PhasedSettings,
    ValFamily,
    family_for,
    make_settings,
    settings_from_dict,
)

__all__ = [
    "BUDGET_S",
    "FAMILIES",
    "BudgetError",
    "ChunkedSettings",
    "Estimate",
    "ModelShape",
    "PhasedSettings",
    "ValFamily",
    "calibration_rows",
    "estimate",
    "family_for",
    "leave_one_out",
    "make_settings",
    "settings_from_dict",
]
