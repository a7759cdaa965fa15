"""Valid-answer rates of the base model with tools, in both answer modes, on real eval tasks.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/measure_answer_validity.py [--profile demo]
        [--base-model assets/base_model] [--root DIR] [--data-dir DIR] [--datasets ml-1m amazon-cds]
        [--tasks 4] [--modes generate logits] [--set SECTION.FIELD=VALUE] [--json-out FILE]

For each dataset the pipeline's stages (ingest, splits, tool indexes, with the profile's
settings) publish the tasks and tool indexes under ``--root`` (default: a temporary
directory; a root that already holds them is read as it is) from the raw files in
``--data-dir`` (default ``$RECTHINKER_SHARED_DATA``, else ``shared/data`` next to the
repository). The base model then runs as the
evaluation's ``base_tools`` system (``evaluation.llm_systems``: the real agent loop, the real
tools, the evaluation's budgets) on the first ``--tasks`` eval tasks of each dataset
(``validation_slice``: spread over the groups), once per answer mode. Printed per mode: the
valid-answer rate and how the rankings came about (the model's own answer, the answer after
the final request, the forced label head, the repair, the fallback), NDCG@10, tokens and time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from recthinker_dagster.agent.history import Toolboxes, agent_tasks
from recthinker_dagster.artifacts import ArtifactLayout, load_tool_indexes, read_tasks
from recthinker_dagster.cli import add_profile_arguments, add_raw_data_argument, profile_from_args
from recthinker_dagster.evaluation.llm_systems import Policy, run_llm_systems
from recthinker_dagster.stages.evaluation import llm_settings
from recthinker_dagster.stages.inputs import ensure_tool_inputs
from recthinker_dagster.training.validation import validation_slice

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "base_tools"



def figures(trajectories: list) -> dict:
    n = len(trajectories)
    finish = Counter(t.finish for t in trajectories)
    return {
        "tasks": n,
        "valid_rate": sum(t.valid for t in trajectories) / n,
        "answered_rate": finish["answer"] / n,
        "forced_answer_rate": finish["forced_answer"] / n,
        "forced_head_rate": finish["forced_head"] / n,
        "repaired_rate": sum(t.repaired for t in trajectories) / n,
        "fallback_rate": finish["fallback"] / n,
        "ndcg@10": sum(t.metrics.get("ndcg@10", 0.0) for t in trajectories) / n,
        "candidates": sorted({len(t.final_ranking) for t in trajectories}),
        "tool_calls_per_task": sum(t.n_tool_calls for t in trajectories) / n,
        "tokens_per_task": sum(t.prompt_tokens + t.completion_tokens for t in trajectories) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_profile_arguments(parser, "protocol.n_candidates=20")
    parser.add_argument("--base-model", type=Path, default=REPO / "assets" / "base_model")
    parser.add_argument("--root", type=Path, default=None)
    add_raw_data_argument(parser)
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--tasks", type=int, default=4, help="eval tasks per dataset")
    parser.add_argument("--modes", nargs="+", default=["generate", "logits"], choices=["generate", "logits"])
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    profile = profile_from_args(args)
    root = args.root or Path(tempfile.mkdtemp(prefix="answer-validity-"))
    layout = ArtifactLayout(root.resolve(), data_dir=args.data_dir)
    tasks, factories = [], {}
    for dataset in args.datasets:
        ensure_tool_inputs(profile, layout, dataset)
        indexes = load_tool_indexes(layout, dataset)
        frame = validation_slice(read_tasks(layout, dataset, ["eval"]), args.tasks)
        tasks += agent_tasks(frame, indexes, prompt_history_len=profile.evaluation.prompt_history_len)
        factories[dataset] = Toolboxes(indexes)

    def toolbox_factory(task):
        return factories[task.dataset](task)

    report = {}
    for mode in args.modes:
        settings = llm_settings(replace(profile.evaluation, answer_mode=mode))
        started = time.perf_counter()
        (trajectories,) = run_llm_systems({SYSTEM: Policy(args.base_model)}, tasks, toolbox_factory, settings,
                                          batch_size=len(tasks)).values()
        report[mode] = {**figures(trajectories), "seconds": round(time.perf_counter() - started, 1),
                        "settings": settings}
        print(mode, json.dumps(report[mode]), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
