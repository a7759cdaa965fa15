"""The agent's recommendation tools and the indexes behind them.

Visibility (what the tools may know)
------------------------------------
Every index is built from one frame, ``index_interactions(train_interactions, tasks)``:
the training-visible interactions (each user's validation and test targets already
removed by the protocol) minus every task's own target interaction (only train tasks'
targets are still there). Hence, for EVERY task (train, valid, eval):

- the task user's data in every per-user index (profiles and histories, similar users,
  BPR-MF's training pairs) is exactly the task's ``history_item_ids``;
- no task's target is anywhere in its own user's data, nor in the CF training data;
- aggregates (popularity, item relations, other users' histories) contain other users'
  interactions only, plus the task user's history.

The user-side tools only ever see the task's user and only its ``history_item_ids`` (they
take no user id). :func:`leakage_report` checks all of this for a tasks frame.

Modules: ``visibility`` (the index interactions), ``catalog`` (ItemCatalog: metadata,
popularity, BM25 search), ``profiles`` (UserProfiles), ``relations`` (ItemRelations),
``similar_users`` (SimilarUsers), ``recommenders/bprmf.py`` (BPRMF), ``indexes``
(ToolIndexes, build_all), ``toolbox`` (the seven tools bound to a task) and ``leakage``.
"""

from recthinker_dagster.tools.catalog import ItemCatalog
from recthinker_dagster.tools.indexes import INDEX_NAMES, ToolIndexConfig, ToolIndexes, build_all, folders_under
from recthinker_dagster.tools.leakage import leakage_report
from recthinker_dagster.tools.profiles import UserProfiles, compute_profile, render_profile
from recthinker_dagster.tools.relations import ItemRelations
from recthinker_dagster.tools.similar_users import SimilarUsers
from recthinker_dagster.tools.toolbox import TOOL_GROUPS, TOOL_NAMES, Toolbox, ToolResult
from recthinker_dagster.tools.visibility import index_interactions

__all__ = [
    "INDEX_NAMES",
    "TOOL_GROUPS",
    "TOOL_NAMES",
    "ItemCatalog",
    "ItemRelations",
    "SimilarUsers",
    "ToolIndexConfig",
    "ToolIndexes",
    "ToolResult",
    "Toolbox",
    "UserProfiles",
    "build_all",
    "compute_profile",
    "folders_under",
    "index_interactions",
    "leakage_report",
    "render_profile",
]
