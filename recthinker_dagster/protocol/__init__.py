"""The evaluation protocol: leave-last-out splits, sparse/dense users, candidate sets.

Pure polars/numpy and deterministic given ``ProtocolConfig.seed``; see ``tasks.py`` for
what each task's target, history and candidates are.
"""

from recthinker_dagster.protocol.config import (
    DATASET_DEFAULTS,
    MIN_INTERACTIONS,
    ProtocolConfig,
    protocol_config_for,
)
from recthinker_dagster.protocol.splits import (
    assign_groups,
    chronological,
    group_sizes,
    sample_user_pools,
    training_visible,
)
from recthinker_dagster.protocol.tasks import TASKS_SCHEMA, TaskSplits, build_task_splits

__all__ = [
    "DATASET_DEFAULTS",
    "MIN_INTERACTIONS",
    "TASKS_SCHEMA",
    "ProtocolConfig",
    "TaskSplits",
    "assign_groups",
    "build_task_splits",
    "chronological",
    "group_sizes",
    "protocol_config_for",
    "sample_user_pools",
    "training_visible",
]
