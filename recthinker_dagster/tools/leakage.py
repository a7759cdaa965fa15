"""The no-leakage guarantee, checked: :func:`leakage_report` backs a blocking check.

For every task it verifies that the task's target is nowhere in its own user's data in
the per-user indexes (profiles' histories, similar users' rows, BPR-MF's training pairs)
nor in the outputs of ``search_user_history`` (the full history) and ``get_user_profile``,
and that each of those holds exactly the task's ``history_item_ids`` (a mismatch means
the indexes saw data the task may not). The catalog and item relations are aggregates over
all users; the report checks they were built from the same interactions as the rest.
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl

from recthinker_dagster.tools.profiles import history_crc
from recthinker_dagster.tools.toolbox import Toolbox

LEAK_CHECKS = ("profiles_history", "similar_users", "bprmf_training", "history_tool", "profile_tool")
MISMATCH_CHECKS = ("profiles_history", "profiles_profile", "similar_users", "bprmf_training")


def mentions(text: str, token: str, *, history_lines: bool = False) -> bool:
    """``token`` used as an item reference ("<token>: ...") in a tool output; in history lines
    ("- <date> <rating> <item>: <title>...") only the item position counts, since titles may
    contain "<word>:" themselves."""
    if history_lines:
        return re.search(rf"(?m)^- \S+ \S+ {re.escape(token)}:", text) is not None
    return re.search(rf"(?<![\w-]){re.escape(token)}(?=:)", text) is not None


def leakage_report(indexes, tasks: pl.DataFrame) -> dict:
    """Counts of leaks and mismatches per check, offending task ids, and ``ok``."""
    leaks = {name: 0 for name in LEAK_CHECKS}
    mismatches = {name: 0 for name in MISMATCH_CHECKS}
    leaking, mismatched = set(), set()
    for task in tasks.iter_rows(named=True):
        target, user, history = task["target_item_id"], task["user_id"], list(task["history_item_ids"])
        box = Toolbox(indexes, task, output_budget_chars=10**9)
        label = box.label_of.get(target, target)
        stored = indexes.profiles.history(user)
        user_data = {
            "profiles_history": stored[0] if stored else [],
            "similar_users": indexes.similar_users.items_of(user),
            "bprmf_training": indexes.bprmf.training_items_of(user),
        }
        for check, items in user_data.items():
            if target in items:
                leaks[check] += 1
                leaking.add(task["task_id"])
            same = items == history if check == "profiles_history" else sorted(set(items)) == sorted(set(history))
            if not same:
                mismatches[check] += 1
                mismatched.add(task["task_id"])
        profile = indexes.profiles.profile(user)
        if profile is None or profile["history_crc"] != history_crc(history) or profile["n_items"] != len(history):
            mismatches["profiles_profile"] += 1
            mismatched.add(task["task_id"])
        header, lines, _ = box.history_lines("", None)
        outputs = {"history_tool": "\n".join([header, *lines]),
                   "profile_tool": box.call("get_user_profile").output}
        for check, text in outputs.items():
            in_history = check == "history_tool"
            if mentions(text, target, history_lines=in_history) or mentions(text, label, history_lines=in_history):
                leaks[check] += 1
                leaking.add(task["task_id"])
    consistency = _consistency(indexes)
    return {
        "ok": not leaking and not mismatched and consistency["ok"],
        "n_tasks": tasks.height,
        "leaks": leaks,
        "mismatches": mismatches,
        "n_leaking_tasks": len(leaking),
        "leaking_task_ids": sorted(leaking),
        "n_mismatched_tasks": len(mismatched),
        "mismatched_task_ids": sorted(mismatched),
        "consistency": consistency,
    }


def _consistency(indexes) -> dict:
    """All indexes were built from the same interactions (counts and item popularity agree)."""
    counts = {
        "catalog": indexes.catalog.meta.get("n_interactions"),
        "profiles": indexes.profiles.meta.get("n_interactions"),
        "relations": indexes.relations.meta.get("n_interactions"),
        "similar_users": indexes.similar_users.meta.get("n_interactions"),
    }
    similar, relations = indexes.similar_users, indexes.relations
    column_users = np.bincount(similar.indices, minlength=len(similar.item_ids))
    same_items = similar.item_ids == relations.item_ids
    same_popularity = bool(same_items and np.array_equal(column_users, relations.arrays["popularity"]))
    bpr_pairs = len(indexes.bprmf.train_items)
    ok = len(set(counts.values())) == 1 and same_popularity and bpr_pairs == len(similar.indices)
    return {"ok": ok, "n_interactions": counts, "relations_popularity_matches": same_popularity,
            "bprmf_pairs": bpr_pairs, "similar_users_pairs": int(len(similar.indices))}
