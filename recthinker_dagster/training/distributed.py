"""Data-parallel training: ``train_sft`` or ``train_grpo`` in ``recipe.num_processes`` processes
under ``accelerate launch`` (DDP over gloo on CPU, NCCL on GPUs), started and collected by the stage.

    result = launch_sft(records, "assets/base_model", ".work/sft_model/run", recipe, log=print)
    result = launch_grpo(TaskSource("recthinker_dagster.stages.rl:rl_tasks_at", {...}),
                         "assets/base_model", ["assets/sft_model/adapter"], ".work/rl_model/run", recipe)

The launcher writes what the run needs (the SFT examples, or where GRPO's tasks come from) and
the recipe into ``output_dir``, runs this module as the worker in every process, forwards the
first process's log lines to ``log`` and returns the result the first process wrote
(``adapter/``, ``metrics.json``); checkpoints and resuming are the trainers'. Each process
accumulates ``gradient_accumulation_steps / num_processes`` micro-batches of the recipe's global
batch, so the optimizer steps match the one-process run's. GRPO's rollouts are shared out the
same way: every process samples its own share of the step's groups (TRL gathers the rewards for
the group advantages), so a step's rollouts are generated ``num_processes`` at a time.

GRPO's tasks and toolboxes cannot be pickled across processes; a :class:`TaskSource` names a
function that rebuilds them in every process (the stage's reads the published task splits and
tool indexes: ``stages.rl.rl_tasks_at``). A failed worker is an error with the end of its output.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from recthinker_dagster.agent.trajectory import Trajectory
from recthinker_dagster.training.device import is_main_process, world_size
from recthinker_dagster.training.recipes import SFTRecipe, load_recipe
from recthinker_dagster.training.rl_recipes import RLRecipe, load_rl_recipe
from recthinker_dagster.training.sft import ADAPTER, METRICS, SFTResult, train_sft

EXAMPLES_FILE = "train_records.jsonl"
RECIPE_FILE = "recipe.json"
LAUNCH_FILE = "launch.json"  # the worker's job: which trainer, and its arguments
OUTPUT_TAIL = 40  # lines of a failed launch's output in its error
WORKER_PREFIX = "[recthinker] "  # the first process's progress lines, forwarded by the launcher
ENV_ACCELERATE_CONFIG = "RECTHINKER_ACCELERATE_CONFIG"


class DataParallelError(RuntimeError):
    """A data-parallel training launch exited with an error (the message ends with its output)."""


@dataclass(frozen=True)
class TaskSource:
    """``module:function`` that returns ``(tasks, toolbox_factory)`` when called with ``kwargs``
    (JSON values): GRPO's prompts and tools, rebuilt in every process."""

    function: str
    kwargs: dict = field(default_factory=dict)

    def load(self):
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)(**self.kwargs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def uses_gpu(device: str) -> bool:
    from recthinker_dagster.agent.backends.transformers_backend import resolve_device

    return resolve_device(device).type == "cuda"


def launch_command(recipe: SFTRecipe | RLRecipe, worker_args: list[str]) -> list[str]:
    """``accelerate launch`` of this module on one machine with ``recipe.num_processes`` processes.

    ``--multi_gpu`` selects accelerate's torchrun launcher on CPUs too (``--cpu`` would start a
    single process); there the trainer's ``use_cpu`` makes each process a gloo DDP rank.
    ``$RECTHINKER_ACCELERATE_CONFIG`` names an accelerate config file to launch with instead
    (DeepSpeed ZeRO: ``recipes/accelerate/zero2.yaml``); the recipe's process count still wins."""
    config = os.environ.get(ENV_ACCELERATE_CONFIG)
    if config and not Path(config).is_file():
        raise FileNotFoundError(f"${ENV_ACCELERATE_CONFIG} names {config}, which is not a file")
    how = ["--config_file", config] if config else ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
                                                     "--dynamo_backend", "no"]
    return [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", str(recipe.num_processes),
            "--main_process_port", str(_free_port()), "-m", __name__, *worker_args]


def _launch(kind: str, job: dict, recipe: SFTRecipe | RLRecipe, output_dir: Path, log: Callable[[str], None]) -> dict:
    """Run the ``kind`` worker in every process; the metrics the first process wrote."""
    (output_dir / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=2))
    (output_dir / LAUNCH_FILE).write_text(json.dumps({"kind": kind, "output": str(output_dir), **job}, indent=2))
    (output_dir / METRICS).unlink(missing_ok=True)  # only this launch's metrics count
    command = launch_command(recipe, ["--job", str(output_dir / LAUNCH_FILE)])
    log(f"data-parallel {kind}: {recipe.num_processes} processes "
        f"({'GPU' if uses_gpu(recipe.device) else 'CPU, gloo'})")
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            if line.startswith(WORKER_PREFIX):
                log(line[len(WORKER_PREFIX):].rstrip())
    if process.returncode != 0 or not (output_dir / METRICS).exists():
        raise DataParallelError(f"data-parallel {kind} ({recipe.num_processes} processes) exited with "
                                f"{process.returncode}; its last lines:\n" + "\n".join(tail))
    return json.loads((output_dir / METRICS).read_text())


def launch_sft(trajectories_or_records: Iterable[Trajectory | Mapping], base_model_dir: str | os.PathLike,
               output_dir: str | os.PathLike, recipe: SFTRecipe | str, *, resume: bool = True,
               log: Callable[[str], None] = print) -> SFTResult:
    """``train_sft`` in ``recipe.num_processes`` processes (see the module docstring)."""
    recipe = load_recipe(recipe)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / EXAMPLES_FILE, "w", encoding="utf-8") as handle:
        for record in trajectories_or_records:
            handle.write(json.dumps(record.to_dict() if isinstance(record, Trajectory) else dict(record)) + "\n")
    metrics = _launch("SFT", {"base_model": str(base_model_dir), "resume": resume}, recipe, output_dir, log)
    return SFTResult(output_dir, output_dir / ADAPTER, output_dir / METRICS, metrics, int(metrics["global_step"]),
                     metrics.get("resumed_from"))


def launch_grpo(source: TaskSource, base_model_dir: str | os.PathLike, sft_adapter_dirs: Sequence,
                output_dir: str | os.PathLike, recipe: RLRecipe | str, *, resume: bool = True,
                answer_mode: str = "generate", log: Callable[[str], None] = print,
                progress_figures: Sequence[str] = (), rollout_server: str | None = None):
    """``train_grpo`` in ``recipe.num_processes`` processes (see the module docstring);
    ``progress_figures``: the step's figures in each progress line besides the reward;
    ``rollout_server``: every process samples its rollouts there (``training/policy_server.py``)."""
    from recthinker_dagster.training.grpo import RLResult

    recipe = load_rl_recipe(recipe)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    job = {"base_model": str(base_model_dir), "adapters": [str(a) for a in sft_adapter_dirs], "resume": resume,
           "answer_mode": answer_mode, "progress_figures": list(progress_figures), "rollout_server": rollout_server,
           "tasks": {"function": source.function, "kwargs": source.kwargs}}
    metrics = _launch("GRPO", job, recipe, output_dir, log)
    return RLResult(output_dir, output_dir / ADAPTER, metrics, int(metrics["global_step"]), metrics.get("resumed_from"))


def _shared_cores(recipe):
    """On CPU, the cores shared out between the processes (no oversubscription)."""
    if recipe.num_threads is not None or uses_gpu(recipe.device):
        return recipe
    from recthinker_dagster.agent.backends.transformers_backend import available_cores

    return recipe.with_overrides(num_threads=max(1, available_cores() // world_size()))


def worker_main(argv: list[str] | None = None) -> None:
    """One process of a data-parallel run (started by ``launch_sft`` or ``launch_grpo``)."""
    from recthinker_dagster.training.callbacks import LogProgress

    parser = argparse.ArgumentParser(description="one process of a data-parallel training run")
    parser.add_argument("--job", type=Path, required=True)
    job = json.loads(parser.parse_args(argv).job.read_text())
    output = Path(job["output"])
    main = is_main_process()

    def log(message: str) -> None:
        if main:
            print(WORKER_PREFIX + message, flush=True)

    if job["kind"] == "SFT":
        records = [json.loads(line) for line in (output / EXAMPLES_FILE).read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        step = train_sft(records, job["base_model"], output, _shared_cores(load_recipe(output / RECIPE_FILE)),
                         resume=job["resume"], callbacks=[LogProgress(log, "loss")]).global_step
    else:
        from recthinker_dagster.training.grpo import train_grpo
        from recthinker_dagster.training.policy_server import policy_server

        tasks, toolbox_factory = TaskSource(**job["tasks"]).load()
        recipe = _shared_cores(load_rl_recipe(output / RECIPE_FILE))
        step = train_grpo(tasks, toolbox_factory, job["base_model"], job["adapters"], output, recipe,
                          resume=job["resume"], answer_mode=job["answer_mode"],
                          backend_factory=policy_server(job.get("rollout_server"), output, recipe.rollout_batch_size),
                          callbacks=[LogProgress(log, "reward", tuple(job["progress_figures"]))]).global_step
    log(f"trained to step {step}")


if __name__ == "__main__":
    worker_main()
