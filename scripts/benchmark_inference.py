"""Benchmark agent inference: one prompt at a time vs the batched TransformersBackend.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/benchmark_inference.py --model assets/base_model \\
        --n-prompts 16 --max-new-tokens 128 --batch-size 16 --dtypes bfloat16 [--root .] --json-out bench.json

The same N first-turn agent prompts (the agent loop's opening messages: system prompt with
the seven tool schemas, ten history items, twenty labelled candidates; built from the
MovieLens-1M eval tasks and tool indexes published under ``--root`` (default: this
repository) when they are there, synthetic ones in the same format otherwise) are generated
greedily

  (a) one at a time with plain ``model.generate``,
  (b) by ``TransformersBackend`` in batches, without the shared-prefix cache,
  (c) by ``TransformersBackend`` in batches, with the shared-prefix cache (the default),

in the same run, and the script prints completion tokens/s, prompts per minute, peak RSS for
each and the speed-ups over (a). ``--dtypes bfloat16,float32`` repeats everything per dtype.

Timings on shared machines are noisy: run it on an otherwise idle machine, or prefix the
command with ``OMP_WAIT_POLICY=PASSIVE`` when other processes compete for the cores (spinning
OpenMP threads that lose their core slow 2-thread decoding down up to 10x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import threading
import time
from pathlib import Path

import torch

from recthinker_dagster.agent import prompts
from recthinker_dagster.agent.backends.base import SamplingParams
from recthinker_dagster.agent.backends.transformers_backend import (
    DTYPES,
    TransformersBackend,
    available_cores,
)
from recthinker_dagster.agent.history import Toolboxes, agent_tasks
from recthinker_dagster.agent.loop import AgentConfig
from recthinker_dagster.artifacts import ArtifactLayout, load_tool_indexes, read_tasks
from recthinker_dagster.tools import Toolbox
from recthinker_dagster.training.grpo import opening_messages

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET = "ml-1m"
GENRES = ["Drama", "Comedy", "Action", "Thriller", "Romance", "Sci-Fi", "Animation", "Horror"]


def synthetic_conversations(n: int, config: AgentConfig, n_candidates: int = 20, history_len: int = 10,
                            seed: int = 0) -> list[list[dict]]:
    """N opening conversations over made-up movies, in the agent's prompt format."""
    rng = random.Random(seed)

    def title():
        return f"Movie {rng.randint(1, 3900)} ({rng.randint(1950, 2000)}) | {', '.join(rng.sample(GENRES, 2))}"

    return [prompts.initial_messages([title() for _ in range(history_len)],
                                     [f"C{k}: {title()}" for k in range(1, n_candidates + 1)],
                                     user_id=str(1000 + u), max_turns=config.max_turns,
                                     max_tool_calls=config.max_tool_calls)
            for u in range(n)]


def agent_prompts(layout: ArtifactLayout, n: int, seed: int = 0) -> tuple[list[list[dict]], list[dict]]:
    """N first-turn conversations (repeating the tasks when fewer) and the tool schemas."""
    config = AgentConfig()
    try:
        indexes = load_tool_indexes(layout, DATASET)
        frame = read_tasks(layout, DATASET, ("eval",))
    except FileNotFoundError as missing:
        print(f"synthetic prompts ({missing})")
        tools = Toolbox(None, {"user_id": "0", "history_item_ids": [], "candidate_item_ids": []}).schemas()
        return synthetic_conversations(n, config, seed=seed), tools
    toolboxes = Toolboxes(indexes)
    tasks = agent_tasks(frame.head(n), indexes)
    conversations = [opening_messages(task, toolboxes(task), config) for task in tasks]
    print(f"{len(tasks)} {DATASET} eval tasks from {layout.relative(layout.asset_dir('task_splits', DATASET))}")
    return (conversations * (n // len(conversations) + 1))[:n], toolboxes(tasks[0]).schemas()


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


def one_at_a_time(backend: TransformersBackend, rows: list[list[int]], max_new_tokens: int) -> tuple[list[str], int]:
    """Plain ``model.generate`` per prompt (batch 1, no cache reuse)."""
    texts, tokens = [], 0
    for row in rows:
        ids = torch.tensor([row], device=backend.model.device)
        with torch.inference_mode():
            out = backend.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                         do_sample=False, eos_token_id=backend.stop_ids, pad_token_id=backend.pad_id)
        new = out[0, ids.shape[1]:].tolist()
        stop = next((i for i, t in enumerate(new) if t in backend.stop_ids), None)
        tokens += len(new) if stop is None else stop + 1
        texts.append(backend.tokenizer.decode(new[:stop], skip_special_tokens=False))
    return texts, tokens


def measure(label: str, run) -> dict:
    with PeakRSS() as rss:
        started = time.perf_counter()
        texts, tokens = run()
        seconds = time.perf_counter() - started
    result = {"mode": label, "seconds": round(seconds, 2), "completion_tokens": tokens,
              "tokens_per_s": round(tokens / seconds, 2), "prompts_per_min": round(60 * len(texts) / seconds, 2),
              "peak_rss_mb": round(rss.peak / 2**20)}
    print(f"  {label:<28} {seconds:8.1f} s  {tokens:6d} tok  {result['tokens_per_s']:7.2f} tok/s  "
          f"{result['prompts_per_min']:6.2f} prompts/min  peak RSS {result['peak_rss_mb']} MB", flush=True)
    return result | {"texts": texts}


def bench_dtype(args, dtype: str, conversations: list[list[dict]], tools: list[dict]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[dtype])
    plain = TransformersBackend(model, tokenizer, batch_size=args.batch_size, prefix_cache=False)
    cached = TransformersBackend(model, tokenizer, batch_size=args.batch_size, prefix_cache=True)
    rows = [plain.encode(messages, tools) for messages in conversations]
    lengths = [len(r) for r in rows]
    print(f"\n{dtype}: {len(rows)} prompts of {min(lengths)}-{max(lengths)} tokens "
          f"(mean {sum(lengths) / len(lengths):.0f}), max_new_tokens={args.max_new_tokens}", flush=True)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    warm = SamplingParams(max_new_tokens=4)
    plain.generate(conversations[:2], [tools] * 2, warm)  # pays one-time kernel setup costs
    one_at_a_time(plain, rows[:1], 4)

    def batched(backend):
        def run():
            generations = backend.generate(conversations, [tools] * len(conversations), params)
            return [g.text for g in generations], sum(g.completion_tokens for g in generations)
        return run

    results: dict = {}
    if not args.skip_single:
        results["single"] = measure("(a) one at a time", lambda: one_at_a_time(plain, rows, args.max_new_tokens))
    results["batched"] = measure(f"(b) batched x{args.batch_size}", batched(plain))
    results["batched_prefix"] = measure(f"(c) batched x{args.batch_size} + prefix", batched(cached))
    results["prefix_tokens_reused"] = cached.stats["prefix_tokens_reused"]
    if "single" in results:
        base = results["single"]["tokens_per_s"]
        for key in ("batched", "batched_prefix"):
            results[key]["speedup_vs_single"] = round(results[key]["tokens_per_s"] / base, 2)
            same = sum(a == b for a, b in zip(results["single"]["texts"], results[key]["texts"]))
            results[key]["same_text_as_single"] = f"{same}/{len(rows)}"
            print(f"  speed-up {key}: {results[key]['speedup_vs_single']}x "
                  f"(identical outputs {results[key]['same_text_as_single']})", flush=True)
    results["prompt_tokens"] = {"min": min(lengths), "max": max(lengths), "mean": round(sum(lengths) / len(lengths))}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model folder or id (default: <root>/assets/base_model)")
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16,float32")
    ap.add_argument("--threads", type=int, default=available_cores())
    ap.add_argument("--skip-single", action="store_true", help="skip (a), e.g. for quick batch-size sweeps")
    ap.add_argument("--root", type=Path, default=REPO_ROOT, help="project root holding assets/ (default: this repo)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    layout = ArtifactLayout(args.root.resolve())
    args.model = args.model or str(layout.asset_dir("base_model"))
    conversations, tools = agent_prompts(layout, args.n_prompts, args.seed)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": available_cores(),
                          "torch_threads": args.threads, "torch": torch.__version__,
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
                          "load_avg_start": os.getloadavg()},
              "n_prompts": args.n_prompts, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "results": {}}
    for dtype in args.dtypes.split(","):
        report["results"][dtype] = bench_dtype(args, dtype.strip(), conversations, tools)
    report["machine"]["load_avg_end"] = os.getloadavg()
    if args.json_out:
        for per_dtype in report["results"].values():
            for value in per_dtype.values():
                if isinstance(value, dict):
                    value.pop("texts", None)
        args.json_out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
    main()
