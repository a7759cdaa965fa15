"""Data-parallel SFT: ``train_sft`` in ``recipe.num_processes`` processes under ``accelerate
launch`` (DDP over gloo on CPU, NCCL on GPUs), started and collected by the stage.

    result = launch_sft(records, "assets/base_model", ".work/sft_model/run", recipe, log=print)

The launcher writes the examples and the recipe into ``output_dir``, runs this module as the
worker in every process, forwards the first process's log lines to ``log`` and returns the
``SFTResult`` the first process wrote (``adapter/``, ``metrics.json``); checkpoints and resuming
are ``train_sft``'s. Each process takes every ``num_processes``-th micro-batch of the recipe's
global batch, so the optimizer steps match the one-process run's. A failed worker is an error
with the end of its output.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from recthinker_dagster.agent.trajectory import Trajectory
from recthinker_dagster.training.recipes import SFTRecipe, load_recipe
from recthinker_dagster.training.sft import ADAPTER, METRICS, SFTResult, is_main_process, train_sft, world_size

EXAMPLES_FILE = "train_records.jsonl"
RECIPE_FILE = "recipe.json"
OUTPUT_TAIL = 40  # lines of a failed launch's output in its error
WORKER_PREFIX = "[recthinker] "  # the first process's progress lines, forwarded by the launcher


class DataParallelError(RuntimeError):
    """A data-parallel training launch exited with an error (the message ends with its output)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def uses_gpu(device: str) -> bool:
    from recthinker_dagster.agent.backends.transformers_backend import resolve_device

    return resolve_device(device).type == "cuda"


def launch_command(recipe: SFTRecipe, worker_args: list[str]) -> list[str]:
    """``accelerate launch`` of this module on one machine with ``recipe.num_processes`` processes.

    ``--multi_gpu`` selects accelerate's torchrun launcher on CPUs too (``--cpu`` would start a
    single process); there the trainer's ``use_cpu`` makes each process a gloo DDP rank."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(recipe.num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", __name__, *worker_args]


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
    (output_dir / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=2))
    (output_dir / METRICS).unlink(missing_ok=True)  # only this launch's metrics count
    command = launch_command(recipe, ["--examples", str(output_dir / EXAMPLES_FILE), "--base-model",
                                      str(base_model_dir), "--output", str(output_dir), "--recipe",
                                      str(output_dir / RECIPE_FILE), *([] if resume else ["--no-resume"])])
    log(f"data-parallel SFT: {recipe.num_processes} processes ({'GPU' if uses_gpu(recipe.device) else 'CPU, gloo'})")
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            if line.startswith(WORKER_PREFIX):
                log(line[len(WORKER_PREFIX):].rstrip())
    if process.returncode != 0 or not (output_dir / METRICS).exists():
        raise DataParallelError(f"data-parallel SFT ({recipe.num_processes} processes) exited with "
                                f"{process.returncode}; its last lines:\n" + "\n".join(tail))
    metrics = json.loads((output_dir / METRICS).read_text())
    resumed = metrics.get("resumed_from")
    return SFTResult(output_dir, output_dir / ADAPTER, output_dir / METRICS, metrics, int(metrics["global_step"]),
                     resumed)


def worker_main(argv: list[str] | None = None) -> None:
    """One process of a data-parallel SFT run (started by ``launch_sft``)."""
    from recthinker_dagster.training.callbacks import LogProgress

    parser = argparse.ArgumentParser(description="one process of a data-parallel SFT run")
    parser.add_argument("--examples", type=Path, required=True)
    parser.add_argument("--base-model", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--no-resume", action="store_true")
    args = parser.parse_args(argv)
    records = [json.loads(line) for line in args.examples.read_text(encoding="utf-8").splitlines() if line.strip()]
    main = is_main_process()

    def log(message: str) -> None:
        if main:
            print(WORKER_PREFIX + message, flush=True)

    recipe = load_recipe(args.recipe)
    if recipe.num_threads is None and not uses_gpu(recipe.device):  # the cores, shared out: no oversubscription
        from recthinker_dagster.agent.backends.transformers_backend import available_cores

        recipe = recipe.with_overrides(num_threads=max(1, available_cores() // world_size()))
    result = train_sft(records, args.base_model, args.output, recipe, resume=not args.no_resume,
                       callbacks=[LogProgress(log, "loss")])
    log(f"trained to step {result.global_step}")


if __name__ == "__main__":
    worker_main()
