"""Baseline recommenders: hand-computed cases, synthetic data and real ML-1M."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recthinker_dagster.data.synthetic import generate_synthetic
from recthinker_dagster.evaluation.baselines import METRICS, evaluate_recommender, summarize
from recthinker_dagster.protocol import build_task_splits, protocol_config_for
from recthinker_dagster.recommenders.base import rank_by_scores
from recthinker_dagster.recommenders.itemknn import ItemKNN
from recthinker_dagster.recommenders.popularity import Popularity
from recthinker_dagster.recommenders.random_rec import RandomRecommender
from recthinker_dagster.recommenders.registry import (
    BASELINES,
    LIBRARY_BASELINES,
    available_baselines,
    load_recommender,
    make_recommender,
)
from recthinker_dagster.recommenders.sasrec import SASRec
from tests.support.paths import has_shared

needs_ml1m = pytest.mark.skipif(not has_shared("ml-1m", "ratings.dat.gz"), reason="shared ML-1M data not found")

# Small, fast settings for tests (the defaults are for the benchmark).
FAST = {
    "random": {"seed": 0},
    "popularity": {},
    "itemknn": {},
    "bprmf": {"dim": 16, "epochs": 2, "epoch_samples": 0},
    "sasrec": {"hidden": 32, "max_len": 20, "epochs": 2, "seed": 0},
    "implicit_bpr": {"factors": 16, "iterations": 20, "seed": 0},
    "implicit_als": {"factors": 16, "iterations": 5, "seed": 0},
    "implicit_itemknn": {},
}
needs_implicit = pytest.mark.skipif("implicit_bpr" not in available_baselines(library=True),
                                    reason="the implicit library is not installed")


def frame(pairs: list[tuple[str, str]]) -> pl.DataFrame:
    """Interactions in the normalized schema, one per (user, item), in order."""
    return pl.DataFrame({
        "user_id": [u for u, _ in pairs], "item_id": [i for _, i in pairs],
        "rating": [4.0] * len(pairs), "timestamp": list(range(len(pairs))),
        "order": list(range(len(pairs))),
    }, schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "rating": pl.Float32,
               "timestamp": pl.Int64, "order": pl.Int64})


@pytest.fixture(scope="module")
def synthetic():
    data = generate_synthetic(n_users=200, n_items=300, seed=3)
    config = protocol_config_for("synthetic", n_eval_users_per_group=20,
                                 n_valid_users_per_group=10, n_train_users_per_group=0)
    return build_task_splits(data.interactions, config, "synthetic")


@pytest.fixture(scope="module")
def synthetic_models(synthetic):
    return {name: make_recommender(name, **FAST[name]).fit(synthetic.train_interactions)
            for name in available_baselines(library=True)}


@pytest.fixture(scope="module")
def ml1m(shared_data):
    from recthinker_dagster.data.sources import load_dataset

    data, _ = load_dataset("ml-1m", shared_data, allow_download=False)
    return build_task_splits(data.interactions, protocol_config_for("ml-1m", seed=0), "ml-1m")


@pytest.fixture(scope="module")
def ml1m_models(ml1m):
    """Random, popularity, item-kNN and implicit's ALS and kNN on all training interactions;
    SASRec (3 epochs), BPR-MF and implicit's BPR (short runs) on the valid users plus 400 other
    users, to stay fast."""
    train = ml1m.train_interactions
    valid_users = ml1m.tasks.filter(split="valid")["user_id"]
    others = train["user_id"].unique().sort().sample(400, seed=0)
    subset = train.filter(pl.col("user_id").is_in(pl.concat([valid_users, others]).implode()))
    models = {
        "random": RandomRecommender(seed=0).fit(train),
        "popularity": Popularity().fit(train),
        "itemknn": ItemKNN().fit(train),
        "sasrec": SASRec(epochs=3, seed=0).fit(subset),
    }
    if "bprmf" in available_baselines():
        models["bprmf"] = make_recommender("bprmf", epochs=3).fit(subset)
    if "implicit_bpr" in available_baselines(library=True):
        models["implicit_bpr"] = make_recommender("implicit_bpr", iterations=30).fit(subset)
        models["implicit_als"] = make_recommender("implicit_als").fit(train)
        models["implicit_itemknn"] = make_recommender("implicit_itemknn").fit(train)
    return models


# ------------------------------------------------------------------ hand-made cases

TINY = frame([("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u2", "c"),
              ("u3", "b"), ("u3", "c"), ("u3", "d")])  # counts a 2, b 3, c 2, d 1


def test_popularity_ranks_most_popular_candidate_first():
    model = Popularity().fit(TINY)
    scores = model.score("u9", [], ["d", "a", "b", "zzz"])
    assert scores.tolist() == [1.0, 2.0, 3.0, 0.0]
    assert rank_by_scores(["d", "a", "b", "zzz"], scores)[0] == "b"


def test_itemknn_matches_hand_computation():
    # co-occurrences: ab 2, ac 1, ad 0, bc 2, bd 1, cd 1; sim = co / (sqrt(n_i n_j) + shrink)
    model = ItemKNN(neighbors=None, shrink=1.0, history_window=None, popularity_tiebreak=0.0).fit(TINY)
    scores = model.score("u9", ["a", "d"], ["b", "c", "a"])
    expected_b = 2 / (math.sqrt(2 * 3) + 1) + 1 / (math.sqrt(3 * 1) + 1)
    expected_c = 1 / (math.sqrt(2 * 2) + 1) + 1 / (math.sqrt(2 * 1) + 1)
    expected_a = 0 + 0  # no self-similarity, and a-d never co-occur
    np.testing.assert_allclose(scores, [expected_b, expected_c, expected_a], rtol=1e-6)

    decayed = ItemKNN(neighbors=None, shrink=1.0, history_window=None, recency_decay=0.5,
                      popularity_tiebreak=0.0).fit(TINY)
    np.testing.assert_allclose(decayed.score("u9", ["a", "d"], ["b"]),  # a weighs 0.5, d 1
                               [0.5 * 2 / (math.sqrt(6) + 1) + 1 / (math.sqrt(3) + 1)], rtol=1e-6)
    windowed = ItemKNN(neighbors=None, shrink=1.0, history_window=1, popularity_tiebreak=0.0).fit(TINY)
    np.testing.assert_allclose(windowed.score("u9", ["a", "d"], ["b"]),  # only d counts
                               [1 / (math.sqrt(3) + 1)], rtol=1e-6)
    # neighbors=1: each item keeps only its most similar item (a's is b)
    pruned = ItemKNN(neighbors=1, shrink=1.0).fit(TINY)
    assert (np.diff(pruned.similarity.indptr) <= 1).all()
    assert pruned.similarity[pruned.index["a"]].indices.tolist() == [pruned.index["b"]]


def test_unknown_users_and_items_do_not_crash(synthetic_models):
    for name, model in synthetic_models.items():
        scores = model.score("nobody", ["zzz-unknown", "i1"], ["zzz-other", "i2", "i3"])
        assert scores.shape == (3,) and np.isfinite(scores).all(), name
        if name != "random":
            assert scores[0] < min(scores[1:]), f"{name}: unknown candidate should rank last"
        empty = model.score("nobody", [], ["i2", "i3"])
        assert np.isfinite(empty).all(), name


# ------------------------------------------------------------------ synthetic data


def test_every_baseline_fits_and_scores_synthetic(synthetic, synthetic_models):
    assert {"random", "popularity", "itemknn", "sasrec"} <= set(synthetic_models)
    tasks = synthetic.tasks.filter(split="eval")
    for name, model in synthetic_models.items():
        per_task = evaluate_recommender(model, tasks, seed=0)
        assert per_task.height == tasks.height and set(METRICS) <= set(per_task.columns), name
        assert per_task["task_id"].to_list() == tasks["task_id"].to_list()
        for ranking, cands in zip(per_task["ranking"].to_list(), tasks["candidate_item_ids"].to_list()):
            assert sorted(ranking) == sorted(cands)


def test_summarize_gives_means_intervals_and_counts(synthetic, synthetic_models):
    tasks = synthetic.tasks.filter(split="eval")
    per_task = evaluate_recommender(synthetic_models["popularity"], tasks, seed=0)
    summary = summarize(per_task)
    assert set(summary["group"]) == set(tasks["group"])
    assert summary["n_tasks"].sum() == tasks.height
    for metric in ("ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10", "mrr"):
        assert (summary[f"{metric}_lo"] <= summary[metric]).all()
        assert (summary[metric] <= summary[f"{metric}_hi"]).all()
    overall = summarize(per_task, by=())
    assert overall.height == 1 and overall["ndcg@10"][0] == pytest.approx(per_task["ndcg@10"].mean())


def test_determinism_by_seed(synthetic):
    tasks = synthetic.tasks.filter(split="eval")
    train = synthetic.train_interactions
    for name in ("random", "itemknn", "sasrec", *[n for n in LIBRARY_BASELINES if n in FAST]):
        a = evaluate_recommender(make_recommender(name, **FAST[name]).fit(train), tasks, seed=1)
        b = evaluate_recommender(make_recommender(name, **FAST[name]).fit(train), tasks, seed=1)
        assert a.equals(b), name
    task = tasks.row(0, named=True)
    args = (task["user_id"], task["history_item_ids"], task["candidate_item_ids"])
    assert not np.array_equal(RandomRecommender(seed=0).score(*args),
                              RandomRecommender(seed=1).score(*args))
    s0 = SASRec(**{**FAST["sasrec"], "seed": 0}).fit(train).score(*args)
    s1 = SASRec(**{**FAST["sasrec"], "seed": 1}).fit(train).score(*args)
    assert not np.array_equal(s0, s1)


def test_save_load_round_trip_gives_identical_scores(synthetic, synthetic_models, tmp_path):
    tasks = synthetic.tasks.filter(split="eval").head(10)
    for name, model in synthetic_models.items():
        model.save(tmp_path / name)
        assert not list((tmp_path / name).glob("*.pkl")), name
        loaded = load_recommender(name, tmp_path / name)
        for task in tasks.iter_rows(named=True):
            args = (task["user_id"], task["history_item_ids"], task["candidate_item_ids"])
            assert np.array_equal(model.score(*args), loaded.score(*args)), name


def test_registry():
    assert list(BASELINES) == ["random", "popularity", "itemknn", "bprmf", "sasrec"]
    assert list(LIBRARY_BASELINES) == ["implicit_bpr", "implicit_als", "implicit_itemknn"]
    assert available_baselines() == [n for n in BASELINES if n in available_baselines(library=True)]
    assert make_recommender("itemknn", shrink=3).shrink == 3.0
    assert make_recommender("sasrec", hidden=16).hidden == 16
    with pytest.raises(ValueError, match="unknown recommender"):
        make_recommender("nope")


# ------------------------------------------------------------------ real ML-1M


@needs_ml1m
def test_popularity_top_candidate_on_ml1m(ml1m, ml1m_models):
    counts = dict(ml1m.train_interactions.group_by("item_id").len().iter_rows())
    per_task = evaluate_recommender(ml1m_models["popularity"], ml1m.tasks.filter(split="valid"))
    for ranking in per_task["ranking"].to_list():
        assert counts.get(ranking[0], 0) == max(counts.get(c, 0) for c in ranking)


@needs_ml1m
def test_baselines_beat_random_on_ml1m_valid(ml1m, ml1m_models):
    valid = ml1m.tasks.filter(split="valid")
    assert valid.height == 100 and valid["candidate_item_ids"].list.len().unique().to_list() == [10]
    ndcg = {}
    for name, model in ml1m_models.items():
        summary = summarize(evaluate_recommender(model, valid, seed=0), by=())
        ndcg[name] = summary.row(0, named=True)
    rand = ndcg["random"]
    assert 0.35 < rand["ndcg@10"] < 0.56  # chance level for 10 candidates is 0.454
    for name in set(ndcg) - {"random"}:
        assert ndcg[name]["ndcg@10"] > rand["ndcg@10"] + 0.12, (name, ndcg[name]["ndcg@10"])
        assert ndcg[name]["ndcg@10_lo"] > rand["ndcg@10_hi"], name


@needs_implicit
def test_implicit_models_match_their_library_scores(synthetic, synthetic_models):
    """The wrapper scores a training user as the library does: user vector . item vector
    (BPR: the item bias is the library's last factor), kNN: summed similarity to the history."""
    from recthinker_dagster.recommenders.implicit_models import ImplicitRecommender

    task = synthetic.tasks.filter(split="eval").row(0, named=True)
    history, candidates = task["history_item_ids"], task["candidate_item_ids"]
    for name in ("implicit_bpr", "implicit_als"):
        model = synthetic_models[name]
        user = model.user_ids.tolist().index(task["user_id"])
        items = [model.item_ids.tolist().index(c) for c in candidates]
        expected = model.arrays["item_factors"][items] @ model.arrays["user_factors"][user]
        np.testing.assert_allclose(model.score(task["user_id"], history, candidates), expected, rtol=1e-5)
    knn = synthetic_models["implicit_itemknn"]
    position = {item: k for k, item in enumerate(knn.item_ids.tolist())}
    arrays = knn.arrays
    similarity = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=tuple(arrays["shape"]))
    seen = [position[h] for h in history if h in position]
    expected = similarity.toarray()[seen][:, [position[c] for c in candidates]].sum(axis=0)
    np.testing.assert_allclose(knn.score("anyone", history, candidates), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown implicit model kind"):
        ImplicitRecommender("svd")
