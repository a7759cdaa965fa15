"""BPR-MF: it learns (beats random on validation tasks), is deterministic by seed, round-trips
through save/load, and folds in unknown users."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recthinker_dagster.data.synthetic import generate_synthetic
from recthinker_dagster.protocol import build_task_splits, protocol_config_for
from recthinker_dagster.recommenders.bprmf import BPRMF, UNKNOWN_SCORE, BPRConfig, evaluate_recommender
from recthinker_dagster.tools import index_interactions

CONFIG = BPRConfig(dim=32, epochs=15, lr=0.02, batch_size=2048, seed=7)


class RandomScores:
    name = "random"

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def score(self, user_id, history, candidates):
        return self.rng.random(len(candidates))


@pytest.fixture(scope="module")
def world():
    data = generate_synthetic(n_users=400, n_items=300, seed=11)
    config = protocol_config_for("synthetic", n_eval_users_per_group=30, n_valid_users_per_group=60,
                                 n_train_users_per_group=30)
    splits = build_task_splits(data.interactions, config, "synthetic")
    visible = index_interactions(splits.train_interactions, splits.tasks)
    valid = splits.tasks.filter(pl.col("split") == "valid")
    model = BPRMF(CONFIG).fit(visible)
    return visible, valid, model


def test_bprmf_learns_and_beats_random(world):
    visible, valid, model = world
    assert len(model.losses) == CONFIG.epochs and model.losses[-1] < 0.6 * model.losses[0]
    metrics = model.evaluate(valid)
    assert set(metrics) >= {"ndcg@1", "ndcg@5", "ndcg@10", "n_tasks"} and metrics["n_tasks"] == valid.height
    assert model.validation_metrics == metrics
    random = np.mean([evaluate_recommender(RandomScores(s), valid)["ndcg@10"] for s in range(5)])
    assert random == pytest.approx(0.227, abs=0.05)  # 20 candidates: E[NDCG@10] = 0.227
    assert metrics["ndcg@10"] > random + 0.15, (metrics, random)
    assert metrics["ndcg@1"] > 1 / 20 + 0.1


def test_bprmf_is_deterministic_by_seed(world):
    visible, _, model = world
    again = BPRMF(CONFIG).fit(visible)
    assert np.array_equal(again.item_factors, model.item_factors)
    assert np.array_equal(again.user_factors, model.user_factors) and again.losses == model.losses
    other = BPRMF(BPRConfig(**{**CONFIG.__dict__, "seed": 8, "epochs": 1})).fit(visible)
    assert not np.array_equal(other.item_factors, again.item_factors[: len(other.item_factors)])


def test_bprmf_save_load_round_trip(world, tmp_path):
    _, valid, model = world
    model.evaluate(valid)
    model.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bprmf.json", "bprmf.npz"]
    loaded = BPRMF.load(tmp_path)
    assert loaded.config == model.config and loaded.losses == model.losses
    assert loaded.validation_metrics == model.validation_metrics
    for task in valid.head(10).iter_rows(named=True):
        args = (task["user_id"], task["history_item_ids"], task["candidate_item_ids"])
        assert np.array_equal(loaded.score(*args), model.score(*args))
    user = model.user_ids[0]
    assert loaded.training_items_of(user) == model.training_items_of(user)


def test_training_pairs_are_the_visible_interactions(world):
    visible, valid, model = world
    task = valid.row(0, named=True)
    assert sorted(model.training_items_of(task["user_id"])) == sorted(task["history_item_ids"])
    assert task["target_item_id"] not in model.training_items_of(task["user_id"])
    assert len(model.train_items) == visible.select("user_id", "item_id").unique().height


def test_unknown_users_fold_in_and_unknown_items_score_low(world):
    _, valid, model = world
    task = valid.row(0, named=True)
    history, candidates = task["history_item_ids"], task["candidate_item_ids"]
    item_codes = {item: k for k, item in enumerate(model.item_ids.tolist())}
    codes = [item_codes[i] for i in history]
    expected_vector = model.item_factors[codes].mean(axis=0)
    scores = model.score("never-seen-user", history, candidates)
    known = [item_codes[c] for c in candidates]
    assert np.allclose(scores, model.item_factors[known] @ expected_vector + model.item_bias[known], atol=1e-5)
    with_unknown = model.score(task["user_id"], history, [*candidates[:3], "no-such-item"])
    assert with_unknown[-1] == UNKNOWN_SCORE and np.isfinite(with_unknown).all()
    assert with_unknown[-1] < with_unknown[:3].min()
    cold = model.score("never-seen-user", [], candidates[:3])  # no history: item biases (popularity)
    assert np.allclose(cold, model.item_bias[known[:3]])


def test_implements_the_recommender_protocol(world):
    _, _, model = world
    for name in ("fit", "score", "save", "load"):
        assert callable(getattr(model, name))
    assert model.name == "bprmf"
