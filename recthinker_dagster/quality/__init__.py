"""Data-quality gates: Great Expectations suites over the normalized frames and the tasks.

Importing this package is cheap; Great Expectations is imported on the first validation.
"""

from recthinker_dagster.quality.runner import QualityResult
from recthinker_dagster.quality.suites import (
    validate_interactions,
    validate_items,
    validate_sft_examples,
    validate_tasks,
    validate_users,
)
from recthinker_dagster.quality.task_checks import CHECK_COLUMNS, task_check_frame

__all__ = [
    "CHECK_COLUMNS",
    "QualityResult",
    "task_check_frame",
    "validate_interactions",
    "validate_items",
    "validate_sft_examples",
    "validate_tasks",
    "validate_users",
]
