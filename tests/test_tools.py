"""The agent tools and their indexes on real (ML-1M, Amazon CDs) and synthetic data.

Indexes are built once per module: ML-1M restricted to users 1-1000 (real data, a third
of the size), the full Amazon CDs subset, and a small synthetic dataset; BPR-MF trains for
one or two epochs here (tests/test_bprmf.py covers how well it learns).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from transformers.utils import get_json_schema

from recthinker_dagster.agent.labels import candidate_labels
from recthinker_dagster.data.sources import load_dataset
from recthinker_dagster.data.synthetic import generate_synthetic
from recthinker_dagster.protocol import build_task_splits, protocol_config_for
from recthinker_dagster.tools import (
    INDEX_NAMES,
    TOOL_NAMES,
    Toolbox,
    ToolIndexes,
    UserProfiles,
    build_all,
    compute_profile,
    folders_under,
    index_interactions,
    leakage_report,
)
from recthinker_dagster.tools.formatting import fit_to_budget
from recthinker_dagster.tools.signals import RECENT_ITEMS, raw_signal, score_table_labels, zscore
from tests.support.paths import SHARED_DATA, require_shared

SMALL_PROTOCOL = {"n_eval_users_per_group": 15, "n_valid_users_per_group": 15, "n_train_users_per_group": 30}
HISTORY_LINE = re.compile(r"^- (\S+) (\S+) (\S+): ")


def _build(dataset: str, data, bpr_epochs: int, protocol: dict | None = None):
    splits = build_task_splits(data.interactions, protocol_config_for(dataset, **(protocol or {})), dataset)
    visible = index_interactions(splits.train_interactions, splits.tasks)
    valid = splits.tasks.filter(pl.col("split") == "valid")
    indexes = build_all(visible, data.items, data.users, valid, {"bpr_epochs": bpr_epochs, "sasrec_train_windows": 1000})
    return SimpleNamespace(data=data, splits=splits, tasks=splits.tasks, visible=visible, indexes=indexes)


def _real(name: str):
    require_shared(name)
    data, _ = load_dataset(name, SHARED_DATA, allow_download=False)
    return data


@pytest.fixture(scope="module")
def ml1m():
    data = _real("ml-1m")
    keep = pl.col("user_id").cast(pl.Int64) <= 1000
    data = dataclasses.replace(data, interactions=data.interactions.filter(keep), users=data.users.filter(keep))
    return _build("ml-1m", data, bpr_epochs=2, protocol=SMALL_PROTOCOL)


@pytest.fixture(scope="module")
def amazon():
    return _build("amazon-cds", _real("amazon-cds"), bpr_epochs=1, protocol=SMALL_PROTOCOL)


@pytest.fixture(scope="module")
def synthetic():
    return _build("synthetic", generate_synthetic(n_users=200, n_items=300, seed=3), bpr_epochs=3,
                  protocol=SMALL_PROTOCOL)


def _task(world, split="eval", group="dense", k=0) -> dict:
    return world.tasks.filter((pl.col("split") == split) & (pl.col("group") == group)).row(k, named=True)


def _user_rows(frame: pl.DataFrame, user: str) -> pl.DataFrame:
    return frame.filter(pl.col("user_id") == user).sort("timestamp", "order")


# ---------------------------------------------------------------- visibility
@pytest.mark.parametrize("world_name", ["ml1m", "amazon", "synthetic"])
def test_index_interactions_hold_exactly_each_task_history(world_name, request):
    world = request.getfixturevalue(world_name)
    n_train = world.tasks.filter(pl.col("split") == "train").height
    assert world.visible.height == world.splits.train_interactions.height - n_train
    per_user = dict(world.visible.sort("user_id", "timestamp", "order").group_by(
        "user_id", maintain_order=True).agg("item_id").iter_rows())
    for task in world.tasks.iter_rows(named=True):
        assert per_user.get(task["user_id"], []) == task["history_item_ids"]
        assert task["target_item_id"] not in per_user.get(task["user_id"], [])


@pytest.mark.parametrize("world_name", ["ml1m", "amazon", "synthetic"])
def test_leakage_report_is_clean(world_name, request):
    world = request.getfixturevalue(world_name)
    report = leakage_report(world.indexes, world.tasks)
    assert report["ok"], report
    assert report["n_tasks"] == world.tasks.height
    assert sum(report["leaks"].values()) == 0 and sum(report["mismatches"].values()) == 0
    assert report["leaking_task_ids"] == [] and report["consistency"]["ok"]


def test_leakage_report_catches_a_leaky_index(synthetic):
    """Indexes built with the valid/eval targets added back must fail, naming those tasks."""
    held_out = synthetic.tasks.filter(pl.col("split") != "train")
    targets = held_out.select(
        "user_id", item_id="target_item_id", timestamp="target_timestamp",
    ).join(synthetic.data.interactions, on=["user_id", "item_id", "timestamp"]).select(synthetic.visible.columns)
    leaky = pl.concat([synthetic.visible, targets])
    indexes = build_all(leaky, synthetic.data.items, synthetic.data.users, None, {"bpr_epochs": 1, "sasrec_train_windows": 0})
    report = leakage_report(indexes, synthetic.tasks)
    assert not report["ok"]
    for check in ("profiles_history", "similar_users", "bprmf_training"):
        assert report["leaks"][check] == held_out.height, check
        assert report["mismatches"][check] == held_out.height, check
    assert report["leaking_task_ids"] == sorted(held_out["task_id"].to_list())
    # the user-side tools only show the task's own history, so even this index leaks nothing there
    assert report["leaks"]["history_tool"] == report["leaks"]["profile_tool"] == 0


def test_leakage_report_spots_a_target_in_tool_output():
    from recthinker_dagster.tools.leakage import mentions

    history = "History ...:\n- 2000-12-31 4/5 2571: Matrix, The (1999) | Action\n- 2000-12-30 3/5 C3: Up"
    assert mentions(history, "2571", history_lines=True) and mentions(history, "C3", history_lines=True)
    assert not mentions("- 2000-12-31 4/5 12: Star Trek 2571: Khan", "2571", history_lines=True)
    assert mentions("see 2571: Matrix", "2571") and not mentions("12571: x", "2571")


def test_leakage_report_catches_one_stale_index(ml1m):
    """Only the profiles rebuilt from training-visible data (train targets kept): the train
    tasks leak, and the indexes no longer agree with each other."""
    stale = UserProfiles.build(ml1m.splits.train_interactions, ml1m.data.items, ml1m.data.users)
    report = leakage_report(dataclasses.replace(ml1m.indexes, profiles=stale), ml1m.tasks)
    train_ids = ml1m.tasks.filter(pl.col("split") == "train")["task_id"].to_list()
    assert not report["ok"] and not report["consistency"]["ok"]
    assert report["leaks"]["profiles_history"] == len(train_ids)
    assert report["mismatches"]["profiles_profile"] == len(train_ids)
    assert report["leaking_task_ids"] == sorted(train_ids)
    # the tools notice the stored profile is not this history's and compute it from the task
    task = ml1m.tasks.filter(pl.col("split") == "train").row(0, named=True)
    box = Toolbox(dataclasses.replace(ml1m.indexes, profiles=stale), task)
    assert not box.user_view().from_index and box.profile()["n_items"] == task["history_length"]


# ---------------------------------------------------------------- user side
def test_profile_matches_hand_counts_and_the_task_history(ml1m):
    task = _task(ml1m, "eval", "sparse")
    box = Toolbox(ml1m.indexes, task)
    genres = dict(ml1m.data.items.select("item_id", "categories").iter_rows())
    counts = Counter(g for item in task["history_item_ids"] for g in genres[item])
    top, n = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    output = box.get_user_profile()
    assert f"Top categories: {top} {math.floor(100 * n / task['history_length'] + 0.5)}%" in output
    assert f"({task['history_length']} items in history)" in output

    # the stored profile equals one computed independently from the raw interactions
    rows = _user_rows(ml1m.data.interactions, task["user_id"]).head(task["history_length"])
    assert rows["item_id"].to_list() == task["history_item_ids"]
    user = ml1m.data.users.filter(pl.col("user_id") == task["user_id"]).row(0, named=True)
    expected = compute_profile(rows["item_id"].to_list(), rows["rating"].to_list(), rows["timestamp"].to_list(),
                               lambda i: genres[i], {k: user[k] for k in ("gender", "age", "occupation")})
    assert ml1m.indexes.profiles.profile(task["user_id"]) == expected
    assert expected["rating_mean"] == pytest.approx(rows["rating"].mean(), abs=0.005)
    assert expected["share_high"] == pytest.approx((rows["rating"] >= 4).mean(), abs=0.0005)
    assert f"{'male' if user['gender'] == 'M' else 'female'}" in output


def test_profile_of_a_user_missing_from_the_index_is_computed_from_the_task(ml1m):
    task = dict(_task(ml1m), user_id="no-such-user")
    box = Toolbox(ml1m.indexes, task)
    profile = box.profile()
    assert profile["n_items"] == task["history_length"] and profile["rating_mean"] is None
    assert "Ratings: unknown" in box.get_user_profile()


def test_history_is_most_recent_first_and_searchable(ml1m):
    task = _task(ml1m, "eval", "dense")
    box = Toolbox(ml1m.indexes, task, output_budget_chars=1200)  # room for 8 lines
    result = box.call("search_user_history", {"limit": 8})
    assert result.ok
    lines = [HISTORY_LINE.match(line) for line in result.output.splitlines()[1:-1]]
    assert [m.group(3) for m in lines] == task["history_item_ids"][::-1][:8]
    dates = [m.group(1) for m in lines]
    assert dates == sorted(dates, reverse=True)
    assert result.output.endswith(f"... ({task['history_length'] - 8} more)")

    genres = dict(ml1m.data.items.select("item_id", "categories").iter_rows())
    comedies = [i for i in task["history_item_ids"][::-1] if "Comedy" in genres[i]]
    found = box.call("search_user_history", {"query": "comedy", "limit": 50})
    assert f"matching 'comedy': {len(comedies)} of {task['history_length']}" in found.output
    shown = [HISTORY_LINE.match(line).group(3) for line in found.output.splitlines()[1:] if HISTORY_LINE.match(line)]
    assert shown == comedies[: len(shown)] and shown
    assert "No history items match" in box.call("search_user_history", {"query": "zzzqqq"}).output


# ---------------------------------------------------------------- item side
def test_item_info_on_ml1m_and_missing_metadata_on_amazon(ml1m, amazon):
    box = Toolbox(ml1m.indexes, _task(ml1m))
    c1 = box.labels["A"]
    title = ml1m.data.items.filter(pl.col("item_id") == c1)["title"][0]
    output = box.call("get_item_info", {"item_ids": ["A", box.history[-1]]}).output
    assert output.splitlines()[0].startswith(f"A: {title}")
    assert output.splitlines()[1].startswith(f"{box.history[-1]}: ") and "in the user's history" in output
    pop = ml1m.visible.filter(pl.col("item_id") == c1).height
    assert f"{pop} ratings" in output

    items = amazon.data.items
    bare = ~pl.col("has_metadata") & pl.col("creator").is_null() & (pl.col("categories").list.len() == 0)
    no_meta = items.filter(bare)["item_id"][0]
    html_title = items.filter(pl.col("title").is_null() & pl.col("creator").is_not_null()).row(0, named=True)
    box = Toolbox(amazon.indexes, _task(amazon))
    out = box.call("get_item_info", {"item_ids": [no_meta, html_title["item_id"]]}).output.splitlines()
    assert "unknown title (no metadata; known only from interactions)" in out[0]
    assert out[1].startswith(f"{html_title['item_id']}: unknown title | ")
    assert html_title["creator"] in out[1]
    no_metadata = set(items.filter(bare)["item_id"])
    missing = [label for label, item in box.labels.items() if item in no_metadata]
    lines = dict(line.split(": ", 1) for line in box.candidate_lines())
    assert missing and all(lines[label] == "unknown title (no metadata)" for label in missing)


@pytest.mark.parametrize("world_name", ["ml1m", "amazon"])
def test_search_finds_items_by_exact_title(world_name, request):
    world = request.getfixturevalue(world_name)
    box = Toolbox(world.indexes, _task(world))
    titled = world.data.items.filter(pl.col("title").is_not_null())
    for row in titled.sample(15, seed=1).iter_rows(named=True):
        same = titled.filter(pl.col("title").str.to_lowercase() == row["title"].lower())["item_id"].to_list()
        first = box.call("search_items", {"query": row["title"], "limit": 5}).output.splitlines()[1]
        shown = first[2:].split(": ", 1)[0]
        assert box.labels.get(shown, shown) in same, (row["title"], first)


def test_candidate_lines_and_labels(ml1m):
    task = _task(ml1m)
    box = Toolbox(ml1m.indexes, task)
    assert list(box.labels.values()) == task["candidate_item_ids"]
    lines = box.candidate_lines()
    assert len(lines) == len(task["candidate_item_ids"]) and lines[2].startswith("C: ")
    one_row = ml1m.tasks.filter(pl.col("task_id") == task["task_id"])
    assert Toolbox(ml1m.indexes, one_row).candidate_lines() == lines
    toy = dict(task, candidate_item_ids=["1", *task["candidate_item_ids"][1:]])
    assert Toolbox(ml1m.indexes, toy).candidate_lines()[0] == "A: Toy Story (1995) | Animation, Children's, Comedy"


# ---------------------------------------------------------------- collaborative
def test_related_items_share_co_occurrence(ml1m):
    box = Toolbox(ml1m.indexes, _task(ml1m))
    item = box.history[-1]
    users_of = dict(ml1m.visible.group_by("item_id").agg("user_id").iter_rows())
    related = ml1m.indexes.relations.related(item, 5)
    assert len(related) == 5
    cosines = [cos for _, cos, _ in related]
    assert cosines == sorted(cosines, reverse=True)
    mine = set(users_of[item])
    for other, cos, count in related:
        shared = len(mine & set(users_of[other]))
        assert count == shared >= 2
        assert cos == pytest.approx(shared / math.sqrt(len(mine) * len(users_of[other])), rel=1e-5)
    output = box.call("get_related_items", {"item_id": item}).output.splitlines()
    assert len(output) == 6 and f"| {related[0][2]} users, cosine" in output[1]


def test_similar_users_overlap_and_candidate_counts(ml1m):
    task = _task(ml1m, "eval", "sparse", 2)
    box = Toolbox(ml1m.indexes, task)
    similar = ml1m.indexes.similar_users
    neighbours = similar.neighbours(task["user_id"], task["history_item_ids"], 5)
    history = set(task["history_item_ids"])
    counts = Counter()
    for v, cos, overlap in neighbours:
        items = set(similar.items_of(similar.user_ids[v]))
        assert similar.user_ids[v] != task["user_id"]
        assert overlap == len(items & history)
        assert cos == pytest.approx(overlap / math.sqrt(len(items) * len(history)), rel=1e-5)
        counts.update(label for label, item in box.labels.items() if item in items)
    folded = similar.fold_in(history, 5, exclude=similar.user_index[task["user_id"]])
    assert [v for v, _, _ in folded] == [v for v, _, _ in neighbours]
    output = box.call("find_similar_users", {"limit": 5}).output
    assert output.splitlines()[2].startswith(f"- U1: cosine {neighbours[0][1]:.2f}, {neighbours[0][2]} shared")
    for label, n in counts.items():
        assert f"{label} ({n} of 5)" in output


def test_score_candidates_orders_by_the_cf_model_by_default(ml1m):
    task = _task(ml1m)
    box = Toolbox(ml1m.indexes, task)
    scores = ml1m.indexes.bprmf.score(task["user_id"], task["history_item_ids"], task["candidate_item_ids"])
    labels = list(box.labels)
    expected = [labels[k] for k in np.argsort(-scores, kind="stable")]
    output = box.call("score_candidates", {}).output
    assert output.startswith("Scores (1 bprmf), best first:")
    assert re.findall(r"^\d+\. ([A-Z]) [+-]", output, flags=re.M) == expected


def test_score_candidates_fuses_standardized_signals(ml1m):
    task = _task(ml1m, "eval", "dense")
    box = Toolbox(ml1m.indexes, task)
    weights = {"sasrec": 1.5, "itemknn": 0.5, "popularity": -0.3, "neighbours": 0.2, "bprmf": 1}
    columns = {name: zscore(raw_signal(ml1m.indexes, name, task["user_id"], task["history_item_ids"],
                                       task["candidate_item_ids"])) for name in weights}
    by_hand = sum(w * columns[name] for name, w in weights.items())
    output = box.call("score_candidates", {"weights": weights}).output
    labels = list(box.labels)
    assert score_table_labels(output) == [labels[k] for k in sorted(range(10), key=lambda k: (-round(by_hand[k], 6), k))]
    top = float(re.search(r"^1\. [A-Z] ([+-][\d.]+)", output, flags=re.M).group(1))
    assert top == pytest.approx(max(by_hand), abs=0.006)
    assert "1.5 sasrec + 0.5 itemknn - 0.3 popularity" in output
    assert all(np.isfinite(column).all() and abs(column.mean()) < 1e-9 for column in columns.values())


def test_recent_signal_is_item_knn_over_the_last_items_only(ml1m):
    task = _task(ml1m, "eval", "dense")
    history, candidates = task["history_item_ids"], task["candidate_item_ids"]
    assert len(history) > RECENT_ITEMS
    recent = raw_signal(ml1m.indexes, "recent", task["user_id"], history, candidates)
    by_hand = ml1m.indexes.itemknn.score(task["user_id"], history[-RECENT_ITEMS:], candidates)
    np.testing.assert_allclose(recent, np.where(by_hand < 0, np.nan, by_hand))
    whole = raw_signal(ml1m.indexes, "itemknn", task["user_id"], history, candidates)
    assert not np.allclose(np.nan_to_num(recent), np.nan_to_num(whole))


def test_score_candidates_rejects_unknown_signals_and_bad_weights(ml1m):
    box = Toolbox(ml1m.indexes, _task(ml1m))
    for weights, message in [({"svd": 1}, "unknown signals ['svd']"), ({"bprmf": 0}, "every weight is 0"),
                             ({"bprmf": 50}, "between -10 and 10"), ({"bprmf": "high"}, "object of numbers")]:
        result = box.call("score_candidates", {"weights": weights})
        assert not result.ok and message in result.output, result
    bare = Toolbox(dataclasses.replace(ml1m.indexes, sasrec=None), _task(ml1m))
    result = bare.call("score_candidates", {"weights": {"sasrec": 1}})
    assert not result.ok and "signals: bprmf, itemknn, recent, popularity, neighbours" in result.output


# ---------------------------------------------------------------- budget, errors, schemas
def test_outputs_stay_within_the_budget(ml1m):
    task = _task(ml1m, "eval", "dense")
    calls = {
        "get_user_profile": {}, "search_user_history": {"limit": 50}, "search_items": {"query": "the", "limit": 20},
        "get_item_info": {"item_ids": candidate_labels(10)}, "find_similar_users": {"limit": 20},
        "get_related_items": {"item_id": "A", "limit": 20},
        "score_candidates": {"weights": {"sasrec": 1, "bprmf": 0.5, "itemknn": 0.5, "neighbours": 1}},
    }
    assert set(calls) == set(TOOL_NAMES)
    for budget in (150, 400, 1200):
        box = Toolbox(ml1m.indexes, task, output_budget_chars=budget)
        for name, args in calls.items():
            result = box.call(name, args)
            assert result.ok and 0 < len(result.output) <= budget, (name, budget, len(result.output))
    out = Toolbox(ml1m.indexes, task).call("search_user_history", {"limit": 50}).output
    shown = sum(bool(HISTORY_LINE.match(line)) for line in out.splitlines())
    assert out.endswith(f"... ({task['history_length'] - shown} more)") and shown < 50


def test_fit_to_budget_counts_what_is_left_out():
    lines = [f"line {k}" for k in range(10)]
    assert fit_to_budget("head", lines, 1000) == "\n".join(["head", *lines])
    text = fit_to_budget("head", lines, 40)
    assert len(text) <= 40 and text.endswith(f"... ({10 - (len(text.splitlines()) - 2)} more)")
    assert fit_to_budget("head", lines[:2], 1000, more=5).endswith("... (5 more)")


BAD_CALLS = [
    ("no_such_tool", {}, "unknown_tool"),
    ("get_item_info", '{"item_ids": ["A"', "bad_json"),
    ("get_item_info", '["A"]', "bad_arguments"),
    ("get_item_info", {}, "bad_arguments"),
    ("get_item_info", {"item_ids": ["A"], "verbose": True}, "bad_arguments"),
    ("get_item_info", {"item_ids": "A"}, "wrong_type"),
    ("get_item_info", {"item_ids": [1, 2]}, "wrong_type"),
    ("get_item_info", {"item_ids": []}, "empty_list"),
    ("get_item_info", {"item_ids": [str(k) for k in range(1, 12)]}, "too_many_items"),  # 11 ML-1M movie ids
    ("get_item_info", {"item_ids": ["no-such-item"]}, "unknown_item"),
    ("get_item_info", {"item_ids": ["Z"]}, "unknown_item"),  # a label, but not a candidate's
    ("get_item_info", {"item_ids": ["C99"]}, "unknown_item"),
    ("search_items", {"query": "star", "limit": "5"}, "wrong_type"),
    ("search_items", {"query": "star", "limit": True}, "wrong_type"),
    ("search_items", {"query": "   "}, "bad_arguments"),
    ("search_items", {"query": "star", "limit": 0}, "bad_arguments"),
    ("search_user_history", {"limit": 51}, "bad_arguments"),
    ("get_related_items", {"item_id": 5}, "wrong_type"),
    ("get_related_items", {"limit": 3}, "bad_arguments"),
    ("score_candidates", {"item_ids": ["A"]}, "bad_arguments"),
    ("score_candidates", {"weights": {"bprmf": -11}}, "bad_arguments"),
    ("score_candidates", {"weights": ["bprmf"]}, "wrong_type"),
    ("get_user_profile", {"user_id": "42"}, "forbidden_user"),
    ("search_user_history", {"user_id": "42", "limit": 3}, "forbidden_user"),
]


@pytest.mark.parametrize(("name", "arguments", "kind"), BAD_CALLS)
def test_bad_arguments_give_error_observations(ml1m, name, arguments, kind):
    task = _task(ml1m)
    result = Toolbox(ml1m.indexes, task).call(name, arguments)
    assert not result.ok and result.error_kind == kind, result
    assert result.output.startswith("Error: ") and len(result.output) <= 1200


def test_own_user_id_and_json_strings_are_accepted(ml1m):
    task = _task(ml1m)
    box = Toolbox(ml1m.indexes, task)
    assert box.call("get_user_profile", {"user_id": task["user_id"]}).ok
    assert box.call("get_item_info", '{"item_ids": ["b"]}').output.startswith("B: ")
    assert box.call("get_user_profile", "").ok and box.call("find_similar_users", None).ok


def test_functions_are_schema_ready_and_never_raise(ml1m):
    box = Toolbox(ml1m.indexes, _task(ml1m))
    functions = box.functions()
    assert [f.__name__ for f in functions] == list(TOOL_NAMES)
    required = {"get_user_profile": [], "search_user_history": [], "get_item_info": ["item_ids"],
                "search_items": ["query"], "find_similar_users": [], "get_related_items": ["item_id"],
                "score_candidates": []}
    for fn, schema in zip(functions, box.schemas()):
        direct = get_json_schema(fn)["function"]
        body = schema["function"]
        assert schema["type"] == "function" and body["name"] == fn.__name__ and "return" not in body
        for prop in direct["parameters"]["properties"].values():
            prop.pop("description")  # left out of the prompts' schemas: the function description says it
        assert body["parameters"] == direct["parameters"] and body["description"]
        assert body["parameters"].get("required", []) == required[fn.__name__]
        for prop in body["parameters"]["properties"].values():
            assert prop["type"] in {"string", "integer", "array", "object"} and "description" not in prop
        json.dumps(schema)
    props = box.schemas()[2]["function"]["parameters"]["properties"]
    assert props["item_ids"]["type"] == "array" and props["item_ids"]["items"] == {"type": "string"}
    by_name = {f.__name__: f for f in functions}
    assert by_name["get_item_info"](item_ids=["A"]).startswith("A: ")
    assert by_name["get_item_info"](["A"]).startswith("A: ")
    assert by_name["get_item_info"](item_ids=["A"], extra=1).startswith("Error: ")
    assert by_name["get_item_info"]().startswith("Error: ")
    assert by_name["search_items"]("a", 5, 6).startswith("Error: ")
    assert box.get_item_info(["A"]) == by_name["get_item_info"](item_ids=["A"])


# ---------------------------------------------------------------- synthetic, save/load
def test_every_tool_works_on_synthetic_data_and_survives_save_load(synthetic, tmp_path):
    task = _task(synthetic, "valid", "sparse")
    calls = [("get_user_profile", {}), ("search_user_history", {"query": "rock"}),
             ("get_item_info", {"item_ids": ["A", "B"]}), ("search_items", {"query": "jazz"}),
             ("find_similar_users", {}), ("get_related_items", {"item_id": "C"}),
             ("score_candidates", {"weights": {"sasrec": 1, "itemknn": 1}})]
    before = Toolbox(synthetic.indexes, task)
    outputs = [before.call(name, args) for name, args in calls]
    assert all(r.ok for r in outputs), outputs
    folders = synthetic.indexes.save(tmp_path)
    assert set(folders) == set(INDEX_NAMES) and folders == folders_under(tmp_path)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted([
        "bprmf/bprmf.json", "bprmf/bprmf.npz", "bprmf/itemknn/config.json", "bprmf/itemknn/model.npz",
        "bprmf/sasrec/config.json", "bprmf/sasrec/items.npz", "bprmf/sasrec/weights.npz",
        "catalog/bm25.npz", "catalog/catalog.json", "catalog/items.parquet",
        "profiles/histories.npz", "profiles/profiles.json", "relations/relations.json", "relations/relations.npz",
        "similar_users/similar_users.json", "similar_users/similar_users.npz"])
    after = Toolbox(ToolIndexes.load(folders), task)
    assert [after.call(name, args) for name, args in calls] == outputs
    assert leakage_report(ToolIndexes.load(folders), synthetic.tasks)["ok"]


def test_missing_metadata_on_synthetic_is_marked(synthetic):
    missing = set(synthetic.data.items.filter(~pl.col("has_metadata"))["item_id"].to_list())
    for task in synthetic.tasks.head(20).iter_rows(named=True):
        box = Toolbox(synthetic.indexes, task)
        for label, line in zip(box.labels, box.candidate_lines()):
            assert line.endswith("unknown title (no metadata)") == (box.labels[label] in missing)
