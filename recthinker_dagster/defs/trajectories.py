"""The ``teacher_trajectories`` asset: K teacher samples per train task, resumable.

Generation appends complete JSON lines to a work file under ``.work/`` named by the
config's hash, so a killed run continues where it stopped on the next materialization
(same config) without redoing finished tasks. Only a complete file is published (staged
folder, DVC, MLflow); the work file is removed afterwards.
"""

import hashlib
import json
import shutil
import time
from pathlib import Path

import dagster as dg
import polars as pl

from recthinker_dagster.agent.backends.base import SamplingParams
from recthinker_dagster.agent.generation import generate_trajectories, read_records
from recthinker_dagster.agent.history import TaskToolboxes, agent_tasks
from recthinker_dagster.agent.loop import AgentConfig
from recthinker_dagster.agent.teachers import LLMTeacher, ScriptedTeacher
from recthinker_dagster.defs.config import TeacherConfig
from recthinker_dagster.defs.datasets import key_prefix, read_table
from recthinker_dagster.defs.publishing import publish
from recthinker_dagster.defs.resources import (
    DVCVersioning,
    MLflowTracking,
    ProjectPaths,
)
from recthinker_dagster.defs.tools import load_tool_indexes
from recthinker_dagster.storage import remove_stale_staging, staged_directory


def make_teacher(settings: dict):
    config = AgentConfig(max_turns=settings["max_turns"], max_tool_calls=settings["max_tool_calls"])
    if settings["teacher"] == "scripted":
        return ScriptedTeacher(config=config)
    if settings["teacher"] == "llm":
        from recthinker_dagster.agent.backends.openai_backend import (
            OpenAICompatibleBackend,
        )

        backend = OpenAICompatibleBackend(settings["llm_base_url"] or None, settings["llm_model"] or None)
        config.sampling = SamplingParams(temperature=settings["temperature"], seed=settings["seed"])
        return LLMTeacher(backend, config, sample_temperature=settings["temperature"])
    raise ValueError(f"unknown teacher {settings['teacher']!r}: use 'scripted' or 'llm'")


def render_trajectory_markdown(record: dict, max_chars: int = 600) -> str:
    """One trajectory as readable Markdown (long messages shortened) for the Dagster UI."""
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


def _histogram_markdown(counts: dict) -> str:
    rows = ["| tool | calls |", "|---|---:|"] + [f"| `{k}` | {v} |" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
    return "\n".join(rows)


def work_file_for(paths: ProjectPaths, dataset: str, settings: dict, task_ids: list[str]) -> Path:
    """Where an unfinished generation with these settings and tasks keeps its records."""
    fingerprint = hashlib.sha256(json.dumps({**settings, "tasks": sorted(task_ids)}, sort_keys=True).encode()).hexdigest()
    work_file = paths.root_path / ".work" / "teacher_trajectories" / dataset / f"{fingerprint[:16]}.jsonl"
    work_file.parent.mkdir(parents=True, exist_ok=True)
    return work_file


def build_trajectory_assets(dataset: str) -> list:
    prefix = key_prefix(dataset)
    key = dg.AssetKey([prefix, "teacher_trajectories"])

    @dg.asset(
        key=key,
        deps=[dg.AssetKey([prefix, "tool_suite"]), dg.AssetKey([prefix, "task_splits"])],
        group_name=prefix,
        kinds={"dvc"},
        description=(
            "Teacher trajectories on the train tasks (K samples each): Analyze-Plan-Act turns, real tool calls "
            "and results, final ranking and metrics; resumable."
        ),
    )
    def teacher_trajectories(
        context: dg.AssetExecutionContext,
        config: TeacherConfig,
        paths: ProjectPaths,
        dvc: DVCVersioning,
        mlflow: MLflowTracking,
    ) -> dg.MaterializeResult:
        settings = config.resolved()
        tasks_frame = read_table(paths, "task_splits", dataset, "tasks_train.parquet")
        indexes = load_tool_indexes(paths, dataset)
        tasks = agent_tasks(tasks_frame, indexes, prompt_history_len=settings["prompt_history_len"])
        teacher = make_teacher(settings)

        work_file = work_file_for(paths, dataset, settings, tasks_frame["task_id"].to_list())
        fingerprint = work_file.stem
        total = len(tasks) * settings["samples_per_task"]
        last_log = [0.0]

        def progress(done: int, total_: int) -> None:
            now = time.perf_counter()
            if now - last_log[0] > 5 or done == total_:
                last_log[0] = now
                context.log.info(f"teacher trajectories: {done}/{total_} ({100 * done / max(total_, 1):.0f}%)")

        context.log.info(f"generating {total} trajectories with teacher '{settings['teacher']}' into {work_file.name}")
        summary = generate_trajectories(
            tasks,
            teacher,
            work_file,
            toolbox_factory=TaskToolboxes(indexes, tasks_frame),
            samples_per_task=settings["samples_per_task"],
            batch_size=settings["batch_size"],
            seed=settings["seed"],
            progress=progress,
        )
        context.log.info(
            f"{summary.n_generated} generated, {summary.n_resumed} resumed, "
            f"{summary.trajectories_per_min:.0f} trajectories/min, valid rate {summary.valid_rate:.3f}"
        )
        records, _ = read_records(work_file)
        folder = paths.asset_dir("teacher_trajectories", dataset)
        remove_stale_staging(folder.parent)
        summary_dict = summary.to_dict()
        summary_dict.pop("out_path", None)
        with staged_directory(folder) as staging:
            shutil.copyfile(work_file, staging / "trajectories.jsonl")
            (staging / "summary.json").write_text(json.dumps({**summary_dict, "settings": settings}, indent=2))
        examples = _examples(records)
        result = publish(
            context,
            asset_key=key,
            folder=folder,
            paths=paths,
            dvc=dvc,
            mlflow=mlflow,
            params={"dataset": dataset, **settings, "fingerprint": fingerprint},
            metrics=_summary_metrics(summary_dict),
            metadata={
                "trajectories": len(records),
                "tasks": summary.n_tasks,
                "resumed": summary.n_resumed,
                "valid_rate": round(summary.valid_rate, 4),
                "trajectories_per_min": round(summary.trajectories_per_min, 1),
                "tool_calls_per_trajectory": round(summary.tool_calls_per_trajectory, 2),
                "ndcg_by_group": dg.MetadataValue.json(summary.by_group),
                "ndcg_by_teacher": dg.MetadataValue.json(summary.by_teacher),
                "tool_call_histogram": dg.MetadataValue.md(_histogram_markdown(summary.tool_calls)),
                "example_trajectory": dg.MetadataValue.md(render_trajectory_markdown(examples[0]) if examples else "none"),
            },
            texts={
                "summary.json": json.dumps(summary_dict, indent=2),
                **{f"examples/{r['task_id'].replace('/', '_')}.json": json.dumps(r, indent=2) for r in examples},
            },
        )
        work_file.unlink(missing_ok=True)
        return result

    return [teacher_trajectories]


def _examples(records: list[dict], n: int = 3) -> list[dict]:
    """A few trajectories to show: the first of each group, then the first others."""
    chosen, groups = [], set()
    for record in records:
        if record["group"] not in groups:
            groups.add(record["group"])
            chosen.append(record)
    return (chosen + [r for r in records if r not in chosen])[:n]


def _summary_metrics(summary: dict) -> dict:
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


def load_trajectories(paths: ProjectPaths, dataset: str) -> pl.DataFrame:
    """The published trajectories as a frame (one row per record)."""
    path = Path(paths.asset_dir("teacher_trajectories", dataset)) / "trajectories.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize {key_prefix(dataset)}/teacher_trajectories first")
    records, _ = read_records(path)
    return pl.DataFrame(records)
