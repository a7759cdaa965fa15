"""Benchmark multi-turn agent inference: one conversation at a time vs the batched TransformersBackend.

    OMP_WAIT_POLICY=PASSIVE RECTHINKER_OFFLINE=1 .venv/bin/python scripts/benchmark_inference.py \\
        --model assets/base_model --n-conversations 32 --max-new-tokens 256 --batch-size 32 \\
        --single-conversations 8 --dtypes bfloat16 [--root .] [--data ../shared/data] --json-out bench.json

Workload: N concurrent ten-candidate agent conversations (candidates labelled A..J), run to
the end by the real agent loop (``run_agent``: real prompts, real tool schemas, the real
``Toolbox``; greedy decoding, constrained answers, the label head when the model never
answers). Each turn the model writes an assistant turn; its tool calls are run and their
results appended, or the loop appends its nudge, until the model answers or the budgets are
used up. The untrained base model rarely calls a tool (it mostly gets the loop's nudges and
the final-answer request), so its conversations grow by its own generated text more than by
tool output. ``--adapter DIR`` merges a trained agent's LoRA adapter into the model: its
turns are short and add tool results (up to 600 characters) instead.

Tasks: the published ML-1M eval tasks and tool indexes under ``--root`` (default: this
repository) when they are there; else the same built in memory from the shared ML-1M files
under ``--data`` (users 1-1000, a few seconds); else a synthetic data set.

The same conversations run, in the same process,

  (a) one conversation at a time (batch 1, every prompt prefilled in full),
  (b) all N concurrently, batched, with the shared-prefix cache, without the conversation cache,
  (c) the same with the per-conversation KV cache,
  (d) the same, and unfinished rows continue alone once half a batch has stopped (the
      backend's opt-in ``split_stragglers``),
  (e) (c) with the conversation cache held at 64 conversations, as it was before it grew to
      each call's conversation count (with more conversations than that, the rest are
      prefilled in full every turn; the evaluation runs 128 per call),

and the script prints, per mode, generated tokens/s, prompt tokens prefilled vs reused (shared
prefix, conversation cache), wall time, peak RSS, where the forward passes' time went (prefill
against decoding steps, and the row-steps decoding spent for its tokens: rows that stopped stay
in the batch), the speed-ups over (a) and (b), and how many conversations came out identical
to (a). ``--single-conversations K`` runs (a) on the first K
conversations only (its tokens/s is a rate, comparable as such). ``--dtypes bfloat16,float32``
repeats everything per dtype; float32 is batch-invariant (identical conversations), bfloat16
is not.

Timings on shared machines are noisy: run it on an otherwise idle machine, and always with
``OMP_WAIT_POLICY=PASSIVE`` when other processes compete for the cores (spinning OpenMP
threads that lose their core slow 2-thread decoding down up to 10x).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import torch

from recthinker_dagster.agent.backends.base import SamplingParams
from recthinker_dagster.agent.backends.conversation_cache import MIN_CACHED_CONVERSATIONS
from recthinker_dagster.agent.backends.transformers_backend import DTYPES, TransformersBackend, available_cores
from recthinker_dagster.agent.history import Toolboxes, agent_tasks
from recthinker_dagster.agent.loop import AgentConfig, run_agent
from recthinker_dagster.agent.trajectory import AgentTask, Trajectory
from recthinker_dagster.artifacts import ArtifactLayout, load_tool_indexes, read_tasks
from recthinker_dagster.tools import ToolIndexes

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET = "ml-1m"
SHARED_DATA = Path(os.environ.get("RECTHINKER_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")


# -- the tasks ------------------------------------------------------------------------------------


def built_tasks(name: str, data, n: int) -> tuple[pl.DataFrame, ToolIndexes]:
    """Eval tasks and tool indexes of ``data``, built in memory (the pipeline's own functions)."""
    from recthinker_dagster.protocol import build_task_splits, protocol_config_for
    from recthinker_dagster.tools import build_all, index_interactions

    config = protocol_config_for(name, n_eval_users_per_group=n, n_valid_users_per_group=4,
                                 n_train_users_per_group=4)
    splits = build_task_splits(data.interactions, config, name)
    indexes = build_all(index_interactions(splits.train_interactions, splits.tasks), data.items, data.users,
                        None, {"bpr_epochs": 2})
    return splits.tasks.filter(pl.col("split") == "eval"), indexes


def load_tasks(layout: ArtifactLayout, data_dir: Path, n: int, seed: int) -> tuple[list[AgentTask], Toolboxes]:
    """N agent tasks (repeating them when fewer) and their toolbox factory (see the module docstring)."""
    try:
        indexes = load_tool_indexes(layout, DATASET)
        frame = read_tasks(layout, DATASET, ("eval",))
        print(f"{DATASET} eval tasks and tool indexes published under {layout.root}")
    except FileNotFoundError:
        from recthinker_dagster.data.sources import load_dataset
        from recthinker_dagster.data.synthetic import generate_synthetic

        if (data_dir / DATASET).is_dir():
            data, _ = load_dataset(DATASET, data_dir, allow_download=False)
            keep = pl.col("user_id").cast(pl.Int64) <= 1000
            data = dataclasses.replace(data, interactions=data.interactions.filter(keep),
                                       users=data.users.filter(keep))
            frame, indexes = built_tasks(DATASET, data, n)
            print(f"{DATASET} (users 1-1000) from {data_dir}: tasks and tool indexes built in memory")
        else:
            frame, indexes = built_tasks("synthetic", generate_synthetic(n_users=300, n_items=500, seed=seed), n)
            print(f"synthetic tasks (no {DATASET} under {data_dir})")
    tasks = agent_tasks(frame.head(n), indexes)
    return (tasks * (n // len(tasks) + 1))[:n], Toolboxes(indexes)


# -- measuring ------------------------------------------------------------------------------------


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        import psutil

        self._process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


class ForwardClock:
    """Seconds the model's forward passes take, split into prefill (several new tokens per row)
    and decoding steps (one token per row): where a mode's wall time goes."""

    def __init__(self, model):
        self.model, self.forward = model, model.forward
        self.reset()
        model.forward = self._timed

    def reset(self) -> None:
        self.figures = {"prefill_s": 0.0, "prefill_passes": 0, "decode_s": 0.0, "decode_steps": 0,
                        "decode_row_steps": 0}

    def _timed(self, *args, **kwargs):
        started = time.perf_counter()
        output = self.forward(*args, **kwargs)
        seconds = time.perf_counter() - started
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] == 1:
            self.figures["decode_s"] += seconds
            self.figures["decode_steps"] += 1
            self.figures["decode_row_steps"] += ids.shape[0]
        else:
            self.figures["prefill_s"] += seconds
            self.figures["prefill_passes"] += 1
        return output

    def report(self) -> dict:
        figures = {k: round(v, 1) if isinstance(v, float) else v for k, v in self.figures.items()}
        steps = self.figures["decode_steps"]
        figures["decode_ms_per_step"] = round(1000 * self.figures["decode_s"] / steps, 1) if steps else None
        return figures


def release_memory() -> None:
    """Free what the previous mode left, and hand the freed heap back to the system (glibc keeps
    it otherwise), so that each mode's peak RSS is its own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def conversation_key(trajectory: Trajectory) -> str:
    return json.dumps([trajectory.messages, trajectory.final_labels], sort_keys=True, default=str)


def progress(backend: TransformersBackend) -> Callable[[int, int], None]:
    """An ``on_step`` callback printing each step of the agent loop (long runs show progress)."""
    started = time.perf_counter()

    def on_step(step: int, active: int) -> None:
        print(f"    step {step}: {active} conversations, {time.perf_counter() - started:6.0f} s, "
              f"{backend.stats['completion_tokens']} tokens so far", flush=True)

    return on_step


def measure(label: str, backend: TransformersBackend,
            run: Callable[[TransformersBackend], list[Trajectory]], clock: ForwardClock) -> dict:
    clock.reset()
    with PeakRSS() as rss:
        started = time.perf_counter()
        trajectories = run(backend)
        seconds = time.perf_counter() - started
    stats = dict(backend.stats)
    tokens = stats["completion_tokens"]
    result = {
        "mode": label, "seconds": round(seconds, 1), "conversations": len(trajectories),
        "turns": sum(t.n_turns for t in trajectories), "completion_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 2), "peak_rss_mb": round(rss.peak / 2**20), **stats,
        **clock.report(),
    }
    if backend.conversations is not None:
        result["conversation_cache_mb"] = round(backend.conversations.nbytes / 2**20)
        result["conversation_evictions"] = backend.conversations.evicted
    reused = stats["prefix_tokens_reused"] + stats["conversation_tokens_reused"]
    print(f"  {label:<34} {seconds:7.1f} s  {tokens:6d} tok  {result['tokens_per_s']:7.2f} tok/s  "
          f"prompt tokens: {stats['prefilled_tokens']} prefilled, {reused} reused "
          f"({stats['conversation_tokens_reused']} from conversations)  peak RSS {result['peak_rss_mb']} MB\n"
          f"  {'':<34} forward passes: prefill {result['prefill_s']} s ({result['prefill_passes']} passes), "
          f"decoding {result['decode_s']} s ({result['decode_steps']} steps, {result['decode_ms_per_step']} ms each, "
          f"{result['decode_row_steps']} row-steps for {tokens} tokens)", flush=True)
    return result | {"keys": [conversation_key(t) for t in trajectories]}


def bench_dtype(args, dtype: str, tasks: list[AgentTask], toolboxes: Toolboxes) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.adapter:  # a trained agent: the adapter merged into the base model
        from recthinker_dagster.models.loading import load_agent_model

        model, tokenizer = load_agent_model(args.model, [args.adapter], dtype=dtype, device="cpu")
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[dtype])
    config = AgentConfig(max_turns=args.max_turns, sampling=SamplingParams(max_new_tokens=args.max_new_tokens))

    def backend(batch_size: int, conversation_cache: bool, prefix_cache: bool = True,
                split: bool = False, cached_conversations: int | None = None) -> TransformersBackend:
        return TransformersBackend(model, tokenizer, batch_size=batch_size, prefix_cache=prefix_cache,
                                   conversation_cache=conversation_cache, split_stragglers=split,
                                   max_cached_conversations=cached_conversations,
                                   conversation_cache_bytes=int(args.cache_gib * 2**30))

    warm = backend(2, True)  # pays one-time kernel setup costs
    run_agent(tasks[:2], warm, toolboxes, dataclasses.replace(config, max_turns=1,
                                                              sampling=SamplingParams(max_new_tokens=4)))
    del warm
    clock = ForwardClock(model)
    print(f"\n{dtype}: {len(tasks)} conversations, max_turns={args.max_turns}, "
          f"max_new_tokens={args.max_new_tokens}, batch_size={args.batch_size}", flush=True)

    results: dict = {}
    single_n = min(args.single_conversations or len(tasks), len(tasks))
    if "a" in args.modes:
        release_memory()
        one = backend(1, False, prefix_cache=False)
        label = "(a) one at a time" + (f" ({single_n} of {len(tasks)})" if single_n < len(tasks) else "")
        results["single"] = measure(label, one, lambda chosen: [
            t for task in tasks[:single_n] for t in run_agent([task], chosen, toolboxes, config)], clock)
        del one
    for mode, key, label, cached, split, held in (
            ("b", "batched", "(b) batched, no conversation cache", False, False, None),
            ("c", "batched_conversation", "(c) batched + conversation cache", True, False, None),
            ("d", "batched_split", "(d) (c) + straggler split", True, True, None),
            ("e", "batched_held_cache", f"(e) (c), cache held at {MIN_CACHED_CONVERSATIONS} conversations",
             True, False, MIN_CACHED_CONVERSATIONS)):
        if mode not in args.modes:
            continue
        release_memory()
        chosen = backend(args.batch_size, cached, split=split, cached_conversations=held)
        results[key] = measure(label, chosen, lambda chosen: run_agent(tasks, chosen, toolboxes, config,
                                                                       on_step=progress(chosen)), clock)
        del chosen
    summarize(results)
    for value in results.values():
        value.pop("keys", None)
    return results


def summarize(results: dict) -> None:
    base = results.get("single")
    for key in [key for key in ("batched", "batched_conversation", "batched_split", "batched_held_cache")
                if key in results]:
        if base is not None:
            results[key]["speedup_vs_single"] = round(results[key]["tokens_per_s"] / base["tokens_per_s"], 2)
            same = sum(a == b for a, b in zip(base["keys"], results[key]["keys"]))
            results[key]["same_as_single"] = f"{same}/{len(base['keys'])}"
            print(f"  (a) -> {key}: {results[key]['speedup_vs_single']}x tokens/s, "
                  f"conversations identical to (a): {results[key]['same_as_single']}", flush=True)
    for before, after, name in (("batched", "batched_conversation", "(b) -> (c)"),
                                ("batched_conversation", "batched_split", "(c) -> (d)"),
                                ("batched_held_cache", "batched_conversation", "(e) -> (c)")):
        if before not in results or after not in results:
            continue
        plain, cached = results[before], results[after]
        cached[f"speedup_vs_{before}"] = round(cached["tokens_per_s"] / plain["tokens_per_s"], 2)
        same = sum(a == b for a, b in zip(plain["keys"], cached["keys"]))
        cached[f"same_as_{before}"] = f"{same}/{len(plain['keys'])}"
        print(f"  {name}: {cached[f'speedup_vs_{before}']}x tokens/s, wall {plain['seconds']} s -> "
              f"{cached['seconds']} s, conversations identical: {cached[f'same_as_{before}']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model folder or id (default: <root>/assets/base_model)")
    ap.add_argument("--adapter", type=Path, help="a LoRA adapter folder (an SFT agent) merged into --model")
    ap.add_argument("--n-conversations", type=int, default=32)
    ap.add_argument("--max-turns", type=int, default=AgentConfig.max_turns)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cache-gib", type=float, default=8.0, help="the conversation cache's memory bound")
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16,float32")
    ap.add_argument("--threads", type=int, default=available_cores())
    ap.add_argument("--modes", default="a,b,c,d", help="which of (a)-(e) to run, e.g. c,d for batch-size sweeps")
    ap.add_argument("--skip-single", action="store_true", help="skip (a): the same as --modes b,c")
    ap.add_argument("--single-conversations", type=int, help="run (a) on the first K conversations only")
    ap.add_argument("--root", type=Path, default=REPO_ROOT, help="project root holding assets/ (default: this repo)")
    ap.add_argument("--data", type=Path, default=SHARED_DATA, help="shared data folder holding ml-1m/")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic fallback data")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    args.modes = set(args.modes.replace(",", "")) - ({"a"} if args.skip_single else set())

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    layout = ArtifactLayout(args.root.resolve())
    args.model = args.model or str(layout.asset_dir("base_model"))
    tasks, toolboxes = load_tasks(layout, args.data, args.n_conversations, args.seed)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": available_cores(),
                          "torch_threads": args.threads, "torch": torch.__version__,
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
                          "load_avg_start": os.getloadavg()},
              "args": {k: str(v) for k, v in vars(args).items()}, "results": {}}
    for dtype in args.dtypes.split(","):
        report["results"][dtype] = bench_dtype(args, dtype.strip(), tasks, toolboxes)
    report["machine"]["load_avg_end"] = os.getloadavg()
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
    main()
