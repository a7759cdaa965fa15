"""Results table and NDCG plot from baseline summaries."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recthinker_dagster.data.synthetic import generate_synthetic
from recthinker_dagster.evaluation.baselines import evaluate_recommender, summarize
from recthinker_dagster.evaluation.report import (
    candidates_per_task,
    combine_summaries,
    format_ci,
    plot_ndcg_by_system,
    results_table_markdown,
)
from recthinker_dagster.protocol import build_task_splits, protocol_config_for
from recthinker_dagster.recommenders.itemknn import ItemKNN
from recthinker_dagster.recommenders.popularity import Popularity
from recthinker_dagster.recommenders.random_rec import RandomRecommender

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def splits():
    data = generate_synthetic(n_users=150, n_items=200, seed=5)
    config = protocol_config_for("synthetic", sparse_max=30, dense_min=60, n_eval_users_per_group=15,
                                 n_valid_users_per_group=0, n_train_users_per_group=0)
    return build_task_splits(data.interactions, config, "synthetic")


@pytest.fixture(scope="module")
def tasks(splits):
    return splits.tasks.filter(split="eval")


@pytest.fixture(scope="module")
def summaries(splits, tasks):
    assert set(tasks["group"]) == {"sparse", "dense"}
    systems = {"random": RandomRecommender(seed=0), "popularity": Popularity(), "itemknn": ItemKNN()}
    return {name: summarize(evaluate_recommender(model.fit(splits.train_interactions), tasks))
            for name, model in systems.items()}


def test_format_ci():
    assert format_ci(0.41234, 0.3512, 0.4701) == "0.412 [0.35, 0.47]"


def test_table_has_every_system_and_group(summaries):
    table = results_table_markdown(summaries, n_candidates=10)
    note, blank, *lines = table.strip().splitlines()
    assert note.startswith("N = 10 candidates per task (the target + 9 sampled negatives)") and blank == ""
    assert lines[0].startswith("| system | group | n | NDCG@1 | NDCG@5 | NDCG@10 | HR@1")
    assert lines[0].rstrip().endswith("MRR |") and set(lines[1]) <= set("|-: ")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert {(r[0], r[1]) for r in rows} == {(s, g) for s in summaries for g in ("sparse", "dense")}
    assert len(rows) == 6 and all(len(r) == len(lines[0].strip("|").split("|")) for r in rows)
    pop_dense = summaries["popularity"].filter(pl.col("group") == "dense").row(0, named=True)
    expected = format_ci(pop_dense["ndcg@10"], pop_dense["ndcg@10_lo"], pop_dense["ndcg@10_hi"])
    assert expected in next(line for line in lines if "| popularity | dense |" in line)
    narrow = results_table_markdown(summaries, metrics=("ndcg@1", "ndcg@5", "ndcg@10"), n_candidates=20)
    assert narrow.splitlines()[0].startswith("N = 20 candidates per task (the target + 19 sampled negatives)")
    assert narrow.splitlines()[2] == "| system | group | n | NDCG@1 | NDCG@5 | NDCG@10 |"


def test_every_table_and_plot_must_state_n(summaries, tmp_path, tasks):
    with pytest.raises(TypeError, match="n_candidates"):
        results_table_markdown(summaries)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="n_candidates"):
        plot_ndcg_by_system(summaries, tmp_path / "x.png")  # type: ignore[call-arg]
    assert candidates_per_task(tasks) == 10
    mixed = pl.concat([tasks.head(1), tasks.tail(1).with_columns(pl.col("candidate_item_ids").list.head(5))])
    with pytest.raises(ValueError, match=r"same number of candidates, found \[5, 10\]"):
        candidates_per_task(mixed)


def test_combined_summary_keeps_system_order(summaries):
    combined = combine_summaries(summaries)
    assert combined.columns[0] == "system"
    assert list(dict.fromkeys(combined["system"])) == list(summaries)


def test_plot_writes_a_valid_png(summaries, tmp_path):
    import matplotlib.image

    path = plot_ndcg_by_system(summaries, tmp_path / "plots" / "ndcg.png", n_candidates=10)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert np.ptp(image) > 0  # not blank
    again = plot_ndcg_by_system(combine_summaries(summaries), tmp_path / "combined.png", n_candidates=10)
    assert again.read_bytes()[:8] == PNG_SIGNATURE


def test_headline_compares_the_best_agent_with_the_strongest_baseline_task_by_task():
    from recthinker_dagster.evaluation.headline import comparisons_markdown, cost_markdown, headline_comparisons

    rng = np.random.default_rng(0)
    n = 80
    baseline = rng.random(n) * 0.8
    systems = {"popularity": baseline * 0.5, "bprmf": baseline, "sft": baseline + 0.1, "zero_shot": baseline - 0.2,
               "teacher": baseline + 0.1}
    rows = pl.concat([pl.DataFrame({"system": s, "group": "sparse", "task_id": [f"t{i}" for i in range(n)],
                                    "ndcg@10": values}) for s, values in systems.items()])
    rows = rows.sample(fraction=1.0, shuffle=True, seed=1)  # pairing is by task id, not by row order
    found = headline_comparisons(rows, agents=("zero_shot", "sft"), baselines=("popularity", "bprmf"),
                                 reference="teacher", n_resamples=2000)
    by_label = {c.label: c for c in found}
    best = by_label["best agent vs strongest baseline"]
    assert (best.system, best.other, best.test.n_tasks) == ("sft", "bprmf", n)
    assert best.relative == pytest.approx(0.1 / baseline.mean()) and best.test.p_value < 0.001
    assert best.test.effect == pytest.approx(0.1)
    versus_teacher = by_label["best agent vs teacher"]
    assert versus_teacher.test.effect == pytest.approx(0.0) and versus_teacher.test.p_value == 1.0
    table = comparisons_markdown(found)
    assert f"| sparse | best agent vs strongest baseline | sft | {baseline.mean() + 0.1:.3f} | bprmf |" in table
    assert cost_markdown(rows) == ""  # no agent columns, no cost table
