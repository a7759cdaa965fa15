"""BPR-MF: it learns (beats random on validation tasks, and popularity and its untuned self on
real ML-1M), is deterministic by seed, weights recent positives, round-trips through
save/load (old files included), and folds in unknown users."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from recthinker_dagster.data.synthetic import generate_synthetic
from recthinker_dagster.evaluation.baselines import evaluate_recommender as per_task_metrics
from recthinker_dagster.metrics import bootstrap_ci
from recthinker_dagster.protocol import build_task_splits, protocol_config_for
from recthinker_dagster.recommenders.bprmf import (
    BPRMF,
    UNKNOWN_SCORE,
    UNTUNED_CONFIG,
    BPRConfig,
    evaluate_recommender,
    positive_sampler,
    recency_weights,
    training_pairs,
)
from recthinker_dagster.recommenders.popularity import Popularity
from recthinker_dagster.tools import index_interactions
from tests.support.paths import has_shared

# small and fast: one pass over the ~27k synthetic pairs per epoch (the default draws 500k)
CONFIG = BPRConfig(dim=32, epochs=15, lr=0.02, batch_size=2048, seed=7, epoch_samples=0)
needs_ml1m = pytest.mark.skipif(not has_shared("ml-1m", "ratings.dat.gz"), reason="shared ML-1M data not found")


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
    assert random == pytest.approx(0.454, abs=0.05)  # 10 candidates: E[NDCG@10] = 0.454
    assert metrics["ndcg@10"] > random + 0.12, (metrics, random)
    assert metrics["ndcg@1"] > 1 / 10 + 0.1


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


def test_training_pairs_count_how_many_interactions_are_more_recent():
    interactions = pl.DataFrame({
        "user_id": ["u", "u", "u", "u", "v", "v"], "item_id": ["a", "b", "a", "c", "a", "b"],
        "timestamp": [1, 2, 3, 3, 5, 5], "order": [0, 1, 3, 2, 0, 1],
    })
    got = {(u, i): k for u, i, k in training_pairs(interactions.reverse()).iter_rows()}
    # u in (timestamp, order) order: a b c a -> a's last occurrence is the most recent
    assert got == {("u", "a"): 0, ("u", "c"): 1, ("u", "b"): 2, ("v", "b"): 0, ("v", "a"): 1}
    # without timestamps, the row order is the chronology
    plain = training_pairs(interactions.select("user_id", "item_id"))
    assert dict(((u, i), k) for u, i, k in plain.iter_rows())[("u", "c")] == 0


def test_positives_are_drawn_in_proportion_to_their_recency_weight():
    more_recent = np.array([0, 1, 2, 0, 5])  # two users: the last pair of each weighs 1
    weights = recency_weights(more_recent, 2.0)
    assert np.allclose(weights, np.exp(-more_recent / 2.0)) and recency_weights(more_recent, 0.0) is None
    gen = torch.Generator().manual_seed(0)
    draws = positive_sampler(weights, 5, 200_000)(gen)
    assert len(draws) == 200_000
    frequencies = np.bincount(draws.numpy(), minlength=5) / len(draws)
    assert np.allclose(frequencies, weights / weights.sum(), atol=0.005), frequencies
    # classical BPR: each pair exactly once per epoch, shuffled
    once = positive_sampler(None, 5, 0)(gen)
    assert sorted(once.tolist()) == [0, 1, 2, 3, 4]
    assert len(positive_sampler(None, 5, 12)(gen)) == 12  # uniform draws, with replacement


def test_untuned_config_is_classical_bpr_with_the_old_defaults():
    assert (UNTUNED_CONFIG.epochs, UNTUNED_CONFIG.reg, UNTUNED_CONFIG.recency, UNTUNED_CONFIG.epoch_samples) == (
        6, 1e-5, 0.0, 0)
    tuned = BPRConfig()
    assert (tuned.epochs, tuned.reg, tuned.recency, tuned.epoch_samples) == (10, 1e-2, 10.0, 500_000)
    for bad in ({"epochs": 0}, {"recency": -1.0}, {"epoch_samples": -5}, {"dim": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BPRConfig(**bad)  # type: ignore[arg-type]


def test_epoch_samples_sets_the_draws_per_epoch(world):
    visible, _, _ = world
    small = BPRMF(BPRConfig(dim=8, epochs=1, batch_size=1024, epoch_samples=4 * 1024, seed=1)).fit(visible)
    assert len(small.losses) == 1 and np.isfinite(small.losses).all()
    # deterministic with weighted draws too
    again = BPRMF(small.config).fit(visible)
    assert np.array_equal(again.item_factors, small.item_factors)


def test_models_saved_before_recency_load_as_classical_bpr(world, tmp_path):
    _, valid, model = world
    model.save(tmp_path)
    meta = json.loads((tmp_path / "bprmf.json").read_text())
    for field in ("recency", "epoch_samples"):
        del meta["config"][field]
    (tmp_path / "bprmf.json").write_text(json.dumps(meta))
    loaded = BPRMF.load(tmp_path)
    assert (loaded.config.recency, loaded.config.epoch_samples) == (0.0, 0)
    task = valid.row(0, named=True)
    args = (task["user_id"], task["history_item_ids"], task["candidate_item_ids"])
    assert np.array_equal(loaded.score(*args), model.score(*args))


@pytest.fixture(scope="module")
def ml1m_slice(shared_data):
    """800 ML-1M users (a sixth of the shared ratings), their protocol tasks (10 candidates) and
    index interactions: the data the tools' BPR-MF is trained on, at a test's size."""
    from recthinker_dagster.data.sources import load_dataset

    data, _ = load_dataset("ml-1m", shared_data, allow_download=False)
    users = data.interactions["user_id"].unique().sort().sample(800, seed=0)
    interactions = data.interactions.filter(pl.col("user_id").is_in(users.implode()))
    config = protocol_config_for("ml-1m", seed=0, n_eval_users_per_group=0, n_valid_users_per_group=100,
                                 n_train_users_per_group=0)
    splits = build_task_splits(interactions, config, "ml-1m")
    return index_interactions(splits.train_interactions, splits.tasks), splits.tasks.filter(split="valid")


@needs_ml1m
def test_bprmf_beats_popularity_and_its_untuned_self_on_real_ml1m(ml1m_slice):
    """The regression guard of the tuning: BPR-MF (4 of its 10 default epochs, to stay fast)
    beats popularity and the old defaults on 200 ML-1M validation tasks, by a paired margin."""
    visible, valid = ml1m_slice
    ndcg = {name: per_task_metrics(model.fit(visible), valid)["ndcg@10"].to_numpy() for name, model in {
        "popularity": Popularity(), "untuned": BPRMF(UNTUNED_CONFIG), "bprmf": BPRMF(BPRConfig(epochs=4))}.items()}
    for baseline, margin in (("popularity", 0.08), ("untuned", 0.03)):
        difference = ndcg["bprmf"] - ndcg[baseline]
        low, _ = bootstrap_ci(difference, n_resamples=1000, seed=0)
        assert difference.mean() > margin and low > 0, (baseline, difference.mean(), low)
