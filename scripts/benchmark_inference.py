"""Benchmark agent inference: one prompt at a time vs the batched TransformersBackend.

The same N first-turn agent prompts (system prompt with the seven tool schemas, ten history
items, twenty labelled candidates; real MovieLens-1M tasks when the task_splits and items
assets exist, synthetic ones otherwise) are generated greedily

  (a) one at a time with plain ``model.generate``,
  (b) by ``TransformersBackend`` in batches, without the shared-prefix cache,
  (c) by ``TransformersBackend`` in batches, with the shared-prefix cache (the default),

in the same run, and the script prints completion tokens/s, prompts per minute, peak RSS for
each and the speed-ups over (a). ``--dtypes bfloat16,float32`` repeats everything per dtype.

    python scripts/benchmark_inference.py --model assets/base_model --n-prompts 16 \\
        --max-new-tokens 128 --batch-size 16 --dtypes bfloat16 --json-out bench.json

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

REPO_ROOT = Path(__file__).resolve().parents[1]

FALLBACK_TOOLS = [  # the shape of the real toolbox's schemas, used when it cannot be imported
    ("get_user_profile", "Summarize the current user: demographics, favourite categories, rating habits.", {}),
    ("search_user_history", "List the current user's past items, newest first, optionally matching a query.",
     {"query": "string", "limit": "integer"}),
    ("get_item_info", "Show item details: title, year, categories, creator, ratings and description.",
     {"item_ids": "array"}),
    ("search_items", "Search the whole catalog by keywords; candidates are shown by their labels.",
     {"query": "string", "limit": "integer"}),
    ("find_similar_users", "Find users whose histories overlap most with the current user's.", {"limit": "integer"}),
    ("get_related_items", "List items other users most often consumed together with an item.",
     {"item_id": "string", "limit": "integer"}),
    ("score_candidates", "Score candidates with a collaborative-filtering model (BPR-MF).", {"item_ids": "array"}),
]


def tool_schemas() -> list[dict]:
    try:
        from recthinker_dagster.tools.toolbox import Toolbox

        return Toolbox(None, {"user_id": "0", "history_item_ids": [], "candidate_item_ids": []}).schemas()
    except Exception:  # noqa: BLE001 - any failure: use the built-in stand-ins
        schemas = []
        for name, description, params in FALLBACK_TOOLS:
            properties = {
                key: {"type": kind, **({"items": {"type": "string"}} if kind == "array" else {})}
                for key, kind in params.items()
            }
            schemas.append({"type": "function", "function": {
                "name": name, "description": description,
                "parameters": {"type": "object", "properties": properties, "required": list(params)[:1]}}})
        return schemas


def agent_prompts(n: int, n_candidates: int = 20, history_len: int = 10, seed: int = 0) -> list[list[dict]]:
    """N first-turn conversations, from real ML-1M tasks when the assets exist."""
    rng = random.Random(seed)
    tasks_path = REPO_ROOT / "assets" / "task_splits" / "ml-1m" / "tasks_eval.parquet"
    items_path = REPO_ROOT / "assets" / "items" / "ml-1m" / "items.parquet"
    rows = []
    if tasks_path.exists() and items_path.exists():
        import polars as pl

        items = {r["item_id"]: r for r in pl.read_parquet(items_path).iter_rows(named=True)}

        def line(item_id):
            r = items.get(item_id)
            return f"{r['title']} ({r['year']}) | {', '.join(r['categories'] or [])}" if r else f"item {item_id}"

        for task in pl.read_parquet(tasks_path).iter_rows(named=True):
            history = [line(i) for i in task["history_item_ids"][-history_len:]]
            candidates = [f"C{k}: {line(i)}" for k, i in enumerate(task["candidate_item_ids"][:n_candidates], 1)]
            rows.append((task["user_id"], history, candidates))
    if not rows:
        genres = ["Drama", "Comedy", "Action", "Thriller", "Romance", "Sci-Fi", "Animation", "Horror"]
        for u in range(n):
            def title(k):
                return f"Movie {rng.randint(1, 3900)} ({rng.randint(1950, 2000)}) | {', '.join(rng.sample(genres, 2))}"
            rows.append((str(1000 + u), [title(k) for k in range(history_len)],
                         [f"C{k}: {title(k)}" for k in range(1, n_candidates + 1)]))
    rows = (rows * (n // len(rows) + 1))[:n]
    return [prompts.initial_messages(h, c, user_id=u, max_turns=6, max_tool_calls=8) for u, h, c in rows]


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

    results = {}
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
    ap.add_argument("--model", default=str(REPO_ROOT / "assets" / "base_model"))
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16,float32")
    ap.add_argument("--threads", type=int, default=available_cores())
    ap.add_argument("--skip-single", action="store_true", help="skip (a), e.g. for quick batch-size sweeps")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tools = tool_schemas()
    conversations = agent_prompts(args.n_prompts)
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
