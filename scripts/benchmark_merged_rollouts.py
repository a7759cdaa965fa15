"""What merging the LoRA adapter saves in a GRPO step's rollouts (``merged_rollouts``).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/benchmark_merged_rollouts.py --root DIR --run RUN \\
        [--steps 100 101] [--json-out FILE]

``RUN`` is a published ``rl_model`` folder (``DIR/assets/rl_model``) or a ``scripts/grpo_signal.py``
``--out`` folder. The policy is set up as GRPO trains it: the start (base plus SFT adapters) merged,
and the run's trained RL adapter on top as a live PEFT adapter, so its B matrices are not zero.
Each step seed samples one GRPO step's rollouts (the run's tasks x ``num_generations``, the
recipe's temperature and budgets) twice, in one process: through PEFT's adapter layers (what
GRPO did before ``merged_rollouts``) and with the adapter merged (``training/merged_sampling.py``).
Prints per mode the seconds, the policy's sampled tokens, seconds per 1,000 of them and the
sampler-trainer log-prob gap (the trainer scores with the live adapter in both modes). The two
modes round differently in bf16, so their rollouts part after a while and their token counts
differ: compare seconds per 1,000 tokens, over several step seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

MODES = ("adapter layers", "merged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True,
                        help="a published rl_model folder or a scripts/grpo_signal.py --out folder")
    parser.add_argument("--steps", type=int, nargs="+", default=[100], help="step seeds, one GRPO step's rollouts each")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    import torch
    from peft import PeftModel

    from recthinker_dagster.artifacts import ArtifactLayout
    from recthinker_dagster.stages.rl import run_rollouts
    from recthinker_dagster.training.grpo import load_policy_start
    from recthinker_dagster.training.resampling import read_grpo_run

    layout = ArtifactLayout(args.root.resolve())
    try:
        run = read_grpo_run(args.run, layout.root)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    rollouts = run_rollouts(layout, run)
    recipe = rollouts.recipe
    policy = PeftModel.from_pretrained(load_policy_start(layout.asset_dir("base_model"), run.start_adapters,
                                                         rollouts.precision), str(run.trained_adapter), is_trainable=True)
    policy.eval()
    prompts = [row for row in rollouts.rollout().dataset_rows() for _ in range(recipe.num_generations)]
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for step in args.steps:
        for mode in MODES:
            rollout = rollouts.rollout(merged_rollouts=mode == "merged")
            trainer = SimpleNamespace(model=policy, state=SimpleNamespace(global_step=step),
                                      args=SimpleNamespace(temperature=recipe.temperature, top_p=recipe.top_p))
            started = time.perf_counter()
            with torch.no_grad():
                rollout([row["prompt"] for row in prompts], trainer)
            seconds = time.perf_counter() - started
            record = rollout.step_records[-1]
            tokens = record["rollout/policy_tokens"] * len(prompts)
            generation = record["time/generation_s"]
            results[mode].append({"step": step, "seconds": round(seconds, 1), "generation_s": round(generation, 1),
                                  "policy_tokens": int(tokens), "s_per_1k_tokens": round(1000 * generation / tokens, 2),
                                  "sampler_logprob_abs_gap": record.get("rollout/sampler_logprob_abs_gap")})
            print(json.dumps({"mode": mode, **results[mode][-1]}), flush=True)
    summary = {}
    for mode in MODES:
        generation = sum(r["generation_s"] for r in results[mode])
        tokens = sum(r["policy_tokens"] for r in results[mode])
        summary[mode] = {"generation_s": round(generation, 1), "policy_tokens": tokens,
                         "s_per_1k_tokens": round(1000 * generation / tokens, 2)}
    ratio = summary[MODES[0]]["s_per_1k_tokens"] / summary["merged"]["s_per_1k_tokens"]
    print(f"\n{'mode':<16} {'generation s':>12} {'policy tokens':>13} {'s per 1k tokens':>15}")
    for mode in MODES:
        row = summary[mode]
        print(f"{mode:<16} {row['generation_s']:>12} {row['policy_tokens']:>13} {row['s_per_1k_tokens']:>15}")
    print(f"merged: {ratio:.2f}x per sampled token")
    if args.json_out:
        args.json_out.write_text(json.dumps({"run": str(args.run), "steps": args.steps, "summary": summary,
                                             "speedup_per_token": round(ratio, 3), "per_step": results}, indent=2))


if __name__ == "__main__":
    main()
