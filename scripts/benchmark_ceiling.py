"""What this machine can do at most: the prefill and decoding rates of the model at the agent's
shapes, and the ceiling they put on the agent loop's generated tokens per second.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/benchmark_ceiling.py --model assets/base_model \\
        [--rows 32 64] [--prefill-tokens 512] [--contexts 1024 1536] [--steps 32] [--dtype bfloat16] \\
        [--prefilled-per-generated 3.25] [--json-out ceiling.json]

Both rates are measured as the backend decodes (``model.generate`` over the backend's
preallocated KV cache, every row active, none stopping: ``min_new_tokens``), on rows of random
token ids, timed by a logits processor that notes when each token's logits arrive:

- prefill: ``rows`` x ``prefill-tokens`` new tokens from an empty cache, tokens per second.
  The agent prefills its turns after up to a thousand cached tokens, which costs more
  attention, so this rate is an upper bound on the agent's;
- decoding: one step over ``rows`` rows of ``context`` tokens each, rows x steps per second.

An agent workload that prefills ``p`` prompt tokens per generated token (``prefilled_tokens /
completion_tokens`` of ``scripts/benchmark_inference.py``) generates at most
``1 / (p / prefill_rate + 1 / decode_rate)`` tokens per second: every row busy at every
decoding step, no padding, nothing but the two kinds of forward pass. Continuous batching,
straggler splits and cache tricks can approach this ceiling, not pass it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from recthinker_dagster.agent.backends.transformers_backend import (
    TransformersBackend,
    available_cores,
    preallocated_cache,
)


class StepClock:
    """A logits processor that only notes the time of each call: one per generated token, the
    first right after the prefill."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def timed_generate(backend: TransformersBackend, rows: int, length: int, new_tokens: int,
                   seed: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decoding step) of one greedy ``model.generate`` of
    ``new_tokens`` over ``rows`` random rows of ``length`` tokens."""
    from transformers import GenerationConfig, LogitsProcessorList

    model = backend.model
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, backend.tokenizer.vocab_size - 100, (rows, length), generator=generator)
    cache = preallocated_cache(model.config, length + new_tokens)
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=backend.pad_id, eos_token_id=backend.stop_ids, use_cache=True)
    # one padded column, as in most of the backend's batches (agent/backends/attention.py says
    # why a batch without any padding needs care on CPU)
    mask = torch.ones_like(ids)
    mask[:, 0] = 0
    clock = StepClock()
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                       past_key_values=cache, generation_config=config, logits_processor=LogitsProcessorList([clock]))
    steps = len(clock.times) - 1
    per_step = (clock.times[-1] - clock.times[0]) / steps if steps else float("nan")
    return clock.times[0] - started, per_step


def ceiling(prefill_rate: float, decode_rate: float, prefilled_per_generated: float) -> float:
    """Generated tokens per second when each costs ``prefilled_per_generated`` prefill tokens and
    one decoding row-step, at the given rates and with nothing else."""
    return 1 / (prefilled_per_generated / prefill_rate + 1 / decode_rate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 1536])
    ap.add_argument("--steps", type=int, default=32, help="decoding steps timed per shape")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=available_cores())
    ap.add_argument("--prefilled-per-generated", type=float, nargs="*", default=[],
                    help="workloads' prompt tokens prefilled per generated token: print their ceilings")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    backend = TransformersBackend.from_pretrained(args.model, dtype=args.dtype, num_threads=args.threads)
    timed_generate(backend, 4, 64, 3, seed=0)  # warm-up: kernels, allocator
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
                     "dtype": args.dtype, "prefill": [], "decoding": [], "ceilings": []}
    for rows in args.rows:
        seconds, _ = timed_generate(backend, rows, args.prefill_tokens, 1, seed=1)
        rate = rows * args.prefill_tokens / seconds
        results["prefill"].append({"rows": rows, "tokens": args.prefill_tokens, "seconds": round(seconds, 2),
                                   "tokens_per_s": round(rate, 1)})
        print(f"prefill {rows} x {args.prefill_tokens}: {seconds:.2f} s, {rate:.0f} tokens/s", flush=True)
        for context in args.contexts:
            _, step = timed_generate(backend, rows, context, args.steps + 1, seed=2)
            results["decoding"].append({"rows": rows, "context": context, "ms_per_step": round(1000 * step, 1),
                                        "tokens_per_s": round(rows / step, 1)})
            print(f"decoding {rows} rows x {context} tokens: {1000 * step:.1f} ms per step, "
                  f"{rows / step:.0f} tokens/s", flush=True)
    prefill_rate = max(p["tokens_per_s"] for p in results["prefill"])
    decode_rate = max(d["tokens_per_s"] for d in results["decoding"])
    for per_token in args.prefilled_per_generated:
        most = ceiling(prefill_rate, decode_rate, per_token)
        results["ceilings"].append({"prefilled_per_generated": per_token, "tokens_per_s": round(most, 1)})
        print(f"ceiling at {per_token} prefilled tokens per generated token: {most:.0f} tokens/s "
              f"(best prefill {prefill_rate:.0f}/s, best decoding {decode_rate:.0f}/s)", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
