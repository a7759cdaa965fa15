"""The teacher stage: K teacher trajectories per train task, resumable.

    result = build_teacher_trajectories_stage(TeacherSettings(), layout, "ml-1m")
    result.artifact.folder        # assets/teacher_trajectories/ml-1m: trajectories.jsonl, summary.json

Generation appends complete JSON lines to a work file, ``.work/teacher_trajectories/<dataset>/
<fingerprint>.jsonl``, named by a hash of the settings and the tasks, so a killed run continues
where it stopped on the next call with the same settings without redoing finished tasks. Only
a complete file is published (staged folder); the work file is listed in the artifact's
``cleanup`` and deleted once the artifact has been published.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recthinker_dagster.agent.backends.base import SamplingParams
from recthinker_dagster.agent.generation import GenerationSummary, generate_trajectories, read_records
from recthinker_dagster.agent.history import Toolboxes, agent_tasks
from recthinker_dagster.agent.loop import AgentConfig
from recthinker_dagster.agent.teachers import PRODUCER, LLMTeacher, ScriptedTeacher
from recthinker_dagster.agent.teachers.scripted import last_score_table
from recthinker_dagster.agent.teachers.thinking import THINKER, ThinkingTeacher
from recthinker_dagster.agent.teachers.tuned_weights import TUNED
from recthinker_dagster.agent.trajectory import Trajectory
from recthinker_dagster.artifacts import ArtifactLayout, load_tool_indexes, read_table
from recthinker_dagster.progress import ProgressLog
from recthinker_dagster.settings import TeacherSettings
from recthinker_dagster.stages.result import Json, Markdown, StageArtifact
from recthinker_dagster.storage import remove_stale_staging, staged_directory
from recthinker_dagster.training.filtering import conversation_length

PROGRESS_EVERY_SECONDS = 5.0
ASSET = "teacher_trajectories"
THINK_ASSET = "think_trajectories"  # the thinking teacher's (RecOne's SFT data)


@dataclass
class TrajectoriesResult:
    artifact: StageArtifact
    summary: GenerationSummary
    work_file: Path  # deleted by whoever publishes the artifact (``artifact.cleanup``)


def build_teacher_trajectories_stage(
    settings: TeacherSettings, layout: ArtifactLayout, dataset: str, log: Callable[[str], None] = print,
    *, tokenizer=None, asset: str = ASSET,
) -> TrajectoriesResult:
    """Generate (or resume) the teacher's trajectories on the train tasks and stage them for publishing
    as ``asset`` (``think_trajectories`` for the thinking teacher's).

    ``tokenizer`` counts each conversation's tokens in the chat template (the token histogram);
    None loads the published ``base_model``'s, and skips the counts when there is none."""
    tasks_frame = read_table(layout, "task_splits", dataset, "tasks_train.parquet")
    indexes = load_tool_indexes(layout, dataset)
    tasks = agent_tasks(tasks_frame, indexes, prompt_history_len=settings.prompt_history_len)
    work_file = work_file_for(layout, dataset, settings, tasks_frame["task_id"].to_list(), asset)
    log(f"generating {len(tasks) * settings.samples_per_task} trajectories with teacher "
        f"'{settings.teacher}' into {work_file.name}")
    summary = generate_trajectories(
        tasks,
        make_teacher(settings),
        work_file,
        toolbox_factory=Toolboxes(indexes),
        samples_per_task=settings.samples_per_task,
        batch_size=settings.batch_size,
        seed=settings.seed,
        progress=ProgressLog(log, "teacher trajectories", 0, every=PROGRESS_EVERY_SECONDS),
    )
    log(f"{summary.n_generated} generated, {summary.n_resumed} resumed, "
        f"{summary.trajectories_per_min:.0f} trajectories/min, valid rate {summary.valid_rate:.3f}")
    records, _ = read_records(work_file)
    summary_dict = summary.to_dict()
    summary_dict.pop("out_path", None)  # a work file's path: machine-specific, never published
    folder = layout.asset_dir(asset, dataset)
    remove_stale_staging(folder.parent)
    with staged_directory(folder) as staging:
        shutil.copyfile(work_file, staging / "trajectories.jsonl")
        (staging / "summary.json").write_text(json.dumps({**summary_dict, "settings": asdict(settings)}, indent=2))
    examples = example_records(records)
    shape = conversation_shape(records, tokenizer or base_model_tokenizer(layout, log))
    log(f"conversations: {json.dumps(shape['tokens'])}; answer = last score table in "
        f"{shape['answer_matches_last_table']:.0%}")
    artifact = StageArtifact(
        folder=folder,
        params={"dataset": dataset, **asdict(settings), "fingerprint": work_file.stem},
        metrics={**summary_metrics(summary_dict), **shape_metrics(shape)},
        metadata={
            "trajectories": len(records),
            "tasks": summary.n_tasks,
            "resumed": summary.n_resumed,
            "valid_rate": round(summary.valid_rate, 4),
            "trajectories_per_min": round(summary.trajectories_per_min, 1),
            "tool_calls_per_trajectory": round(summary.tool_calls_per_trajectory, 2),
            "ndcg_by_group": Json(summary.by_group),
            "ndcg_by_teacher": Json(summary.by_teacher),
            "tool_call_histogram": Markdown(histogram_markdown(summary.tool_calls)),
            "conversation_tokens": Json(shape["tokens"]),
            "token_histogram": Markdown(token_histogram_markdown(shape["lengths"])),
            "answer_matches_last_table": round(shape["answer_matches_last_table"], 4),
            "example_trajectory": Markdown(render_trajectory_markdown(examples[0]) if examples else "none"),
        },
        texts={
            "summary.json": json.dumps(summary_dict, indent=2),
            **{f"examples/{r['task_id'].replace('/', '_')}.json": json.dumps(r, indent=2) for r in examples},
        },
        cleanup=(work_file,),
    )
    return TrajectoriesResult(artifact, summary, work_file)


def base_model_tokenizer(layout: ArtifactLayout, log: Callable[[str], None]):
    """The published base model's tokenizer with the agent's tool template, or None."""
    folder = layout.asset_dir("base_model")
    if not (folder / "tokenizer_config.json").is_file():
        log(f"no tokenizer in {folder}: conversation tokens are not counted (materialize base_model)")
        return None
    from transformers import AutoTokenizer

    from recthinker_dagster.agent.backends.chat_template import ensure_tool_chat_template

    return ensure_tool_chat_template(AutoTokenizer.from_pretrained(folder))


def conversation_shape(records: list[dict], tokenizer) -> dict:
    """Token counts of the conversations (with a tokenizer) and how often the answer is the order
    of the conversation's last ``score_candidates`` table (among those that have one)."""
    lengths = [conversation_length(Trajectory.from_dict(r), tokenizer) for r in records] if tokenizer else []
    tables = [(table, r["final_labels"]) for r in records if (table := last_score_table(r["messages"]))]
    stats = {}
    if lengths:
        stats = {"median": float(np.median(lengths)), "p95": float(np.percentile(lengths, 95)),
                 "mean": round(float(np.mean(lengths)), 1), "max": int(max(lengths))}
    return {"lengths": lengths, "tokens": stats,
            "answer_matches_last_table": sum(t == a for t, a in tables) / len(tables) if tables else 0.0}


def shape_metrics(shape: dict) -> dict[str, float]:
    return {**{f"tokens_{k}": v for k, v in shape["tokens"].items()},
            "answer_matches_last_table": shape["answer_matches_last_table"]}


def token_histogram_markdown(lengths: list[int], width: int = 250) -> str:
    """Conversations per token-count bin, as a Markdown table."""
    if not lengths:
        return "not counted (no tokenizer)"
    bins = Counter(n // width * width for n in lengths)
    rows = ["| tokens | conversations |", "|---|---:|"]
    rows += [f"| {start}-{start + width - 1} | {bins[start]} |" for start in sorted(bins)]
    return "\n".join(rows)


def make_teacher(settings: TeacherSettings):
    """The scripted investigator, the thinking teacher, or an LLM teacher on any OpenAI-compatible server."""
    config = AgentConfig(max_turns=settings.max_turns, max_tool_calls=settings.max_tool_calls)
    if settings.teacher == "scripted":
        return ScriptedTeacher(config=config)
    if settings.teacher == "thinking":
        return ThinkingTeacher()
    if settings.teacher == "llm":
        from recthinker_dagster.agent.backends.openai_backend import OpenAICompatibleBackend

        backend = OpenAICompatibleBackend(settings.llm_base_url or None, settings.llm_model or None)
        config.sampling = SamplingParams(temperature=settings.temperature, seed=settings.seed)
        return LLMTeacher(backend, config, sample_temperature=settings.temperature)
    raise ValueError(f"unknown teacher {settings.teacher!r}: use 'scripted', 'thinking' or 'llm'")


def work_file_for(layout: ArtifactLayout, dataset: str, settings: TeacherSettings, task_ids: list[str],
                  asset: str = ASSET) -> Path:
    """Where an unfinished generation with these settings, tasks and teacher keeps its records
    (a new scripted-teacher version or weights table starts a new file: never resumed from the old)."""
    producers = {"scripted": PRODUCER, "thinking": THINKER}
    teacher = {"producer": producers[settings.teacher], "weights": TUNED} if settings.teacher in producers else {}
    fingerprint = hashlib.sha256(
        json.dumps({**asdict(settings), "tasks": sorted(task_ids), "teacher": teacher}, sort_keys=True).encode()
    ).hexdigest()
    work_file = layout.work_dir(asset, dataset) / f"{fingerprint[:16]}.jsonl"
    work_file.parent.mkdir(parents=True, exist_ok=True)
    return work_file


def render_trajectory_markdown(record: dict, max_chars: int = 600) -> str:
    """One trajectory as readable Markdown (long messages shortened)."""
    lines = [
        f"**{record['task_id']}** ({record['group']}) by `{record['producer']}`: "
        f"NDCG@10 {record['metrics'].get('ndcg@10', 0):.3f}, {record['n_tool_calls']} tool calls, finish `{record['finish']}`",
        "",
    ]
    for message in record["messages"]:
        text = (message.get("content") or "").strip()
        if len(text) > max_chars:
            text = text[:max_chars] + " …"
        lines.append(f"- **{message['role']}**: " + text.replace("\n", "  \n  "))
    return "\n".join(lines)


def histogram_markdown(counts: dict[str, int]) -> str:
    """Calls per tool as a Markdown table, most called first."""
    rows = ["| tool | calls |", "|---|---:|"] + [f"| `{k}` | {v} |" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
    return "\n".join(rows)


def example_records(records: list[dict], n: int = 3) -> list[dict]:
    """A few trajectories to show: the first of each group, then the first others."""
    chosen, groups = [], set()
    for record in records:
        if record["group"] not in groups:
            groups.add(record["group"])
            chosen.append(record)
    return (chosen + [r for r in records if r not in chosen])[:n]


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """A generation summary (``GenerationSummary.to_dict()``) as flat MLflow metrics."""
    metrics = {
        "trajectories": summary["n_records"],
        "generated": summary["n_generated"],
        "resumed": summary["n_resumed"],
        "valid_rate": summary["valid_rate"],
        "trajectories_per_min": summary["trajectories_per_min"],
        "tool_calls_per_trajectory": summary["tool_calls_per_trajectory"],
        "seconds": summary["seconds"],
    }
    for group, values in summary["by_group"].items():
        for name, value in values.items():
            metrics[f"{group.replace('/', '_')}_{name}"] = value
    for tool, count in summary["tool_calls"].items():
        metrics[f"calls_{tool}"] = count
    return metrics
