"""An interrupted LLM evaluation resumes from its finished chunks (``evaluation/llm_progress.py``).

The systems generate on the local OpenAI-compatible stub server, which counts the requests each
model received: a resumed run must ask only for what was not finished before.
"""

from __future__ import annotations

import logging

import pytest

from recthinker_dagster.evaluation.llm_progress import ChunkStore
from recthinker_dagster.evaluation.llm_systems import Policy, run_llm_systems
from tests.support.agent_fakes import FakeToolbox, task

TASKS = [task(f"u{k}", target_index=k % 4) for k in range(6)]  # batch 1: chunks of 4 tasks, at 0 and 4
REQUESTS_PER_TASK = 2  # the stub's agent: a tool call, then the answer


@pytest.fixture()
def served(openai_server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{openai_server.server_address[1]}/v1")
    return openai_server


def settings(max_new_tokens: int = 32) -> dict:
    return {"max_turns": 4, "max_tool_calls": 4, "max_new_tokens": max_new_tokens, "batch_size": 1,
            "served_models": {"sft": "agent"}}


def evaluate(tmp_path, toolbox=FakeToolbox, **kwargs):
    policies = {"sft": Policy(tmp_path / "no-model")}
    return run_llm_systems(policies, TASKS, toolbox, settings(**kwargs), progress_dir=tmp_path / "progress",
                           inputs_key="indexes-v1")["sft"]


class Interrupt(Exception):
    pass


def interrupted_at(user: str):
    """A toolbox factory that fails once the loop reaches ``user``'s task (a kill, as the loop sees it)."""

    def factory(agent_task):
        if agent_task.user_id == user:
            raise Interrupt(user)
        return FakeToolbox(agent_task)
    return factory


def requests(server) -> int:
    return server.counts.get("agent", 0)


def test_an_interrupted_evaluation_resumes_from_its_finished_chunks(served, tmp_path):
    with pytest.raises(Interrupt):
        evaluate(tmp_path, toolbox=interrupted_at("u5"))  # the second chunk (u4, u5) fails
    before = requests(served)
    assert before == 4 * REQUESTS_PER_TASK  # the first chunk finished and was kept

    resumed = evaluate(tmp_path)
    assert requests(served) - before == 2 * REQUESTS_PER_TASK  # only u4 and u5 ran again
    assert [t.task_id for t in resumed] == [t.task_id for t in TASKS]
    assert all(t.valid and t.n_tool_calls == 1 for t in resumed)

    fresh = run_llm_systems({"sft": Policy(tmp_path / "no-model")}, TASKS, FakeToolbox, settings())["sft"]
    assert [t.final_labels for t in resumed] == [t.final_labels for t in fresh]
    assert [t.metrics for t in resumed] == [t.metrics for t in fresh]

    again = requests(served)
    evaluate(tmp_path)  # everything finished: nothing is generated
    assert requests(served) == again


def test_changed_settings_or_inputs_start_afresh_and_drop_the_stale_chunks(served, tmp_path):
    evaluate(tmp_path)
    progress = tmp_path / "progress" / "sft"
    (first_key,) = [p.name for p in progress.iterdir()]
    before = requests(served)
    evaluate(tmp_path, max_new_tokens=48)
    assert requests(served) - before == len(TASKS) * REQUESTS_PER_TASK
    (second_key,) = [p.name for p in progress.iterdir()]
    assert second_key != first_key

    before = requests(served)
    run_llm_systems({"sft": Policy(tmp_path / "no-model")}, TASKS, FakeToolbox, settings(48),
                    progress_dir=tmp_path / "progress", inputs_key="indexes-v2")
    assert requests(served) - before == len(TASKS) * REQUESTS_PER_TASK


def test_an_unreadable_chunk_is_recomputed_with_a_warning(served, tmp_path, caplog):
    evaluate(tmp_path)
    (chunk,) = [p for p in (tmp_path / "progress" / "sft").rglob("000004.jsonl")]
    chunk.write_text('{"task_id": "ml-1m/eval/u4", "truncated')
    before = requests(served)
    with caplog.at_level(logging.WARNING):
        resumed = evaluate(tmp_path)
    assert requests(served) - before == 2 * REQUESTS_PER_TASK
    assert "unreadable" in caplog.text and "000004.jsonl" in caplog.text
    assert [t.task_id for t in resumed] == [t.task_id for t in TASKS]


def test_a_chunk_is_reused_only_for_the_same_tasks(served, tmp_path):
    trajectories = run_llm_systems({"sft": Policy(tmp_path / "no-model")}, TASKS[:2], FakeToolbox, settings())["sft"]
    store = ChunkStore.open(tmp_path, "sft", {"k": 1})
    assert store.load(0, TASKS[:2]) is None
    store.save(0, trajectories)
    assert store.load(0, TASKS[2:4]) is None
    loaded = store.load(0, TASKS[:2])
    assert loaded is not None and [t.to_dict() for t in loaded] == [t.to_dict() for t in trajectories]
    assert ChunkStore.open(tmp_path, "sft", {"k": 2}).load(0, TASKS[:2]) is None  # another key
