"""The challenge's fixed numbers (OpenAI's Parameter Golf), declared once; every check and projection reads them.

The full validation set's size is not here: it depends on the tokenizer, so it is a property of a dataset
family (``pgttt.budget.FAMILIES``, ``ValFamily.targets``).
"""

ARTIFACT_LIMIT_BYTES = 16_000_000  # artifact + code bytes, decimal
TRAIN_BUDGET_S = 600.0  # training wall-clock on the reference machine
EVAL_BUDGET_S = 600.0  # evaluation wall-clock on the reference machine
REFERENCE_GPUS = 8  # the reference machine: 8xH100
