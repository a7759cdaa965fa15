"""The sampler-trainer log-prob gap of one GRPO rollout batch at the start policy.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/sampler_gap.py --root DIR \\
        --task ml-1m/train/1228 --task amazon-cds/train/128 [--precision bf16|fp32] \\
        [--recipe demo] [--top 10]

Runs the recipe's rollouts (``--recipe``'s budgets, group size and temperature) of the given
train tasks (from the recipe's task pool, sliced as the ``rl_model`` stage slices it) once with
the published SFT policy under ``--root``, as GRPO's first step samples them
(``training/grpo.py``'s ``ToolRollout``, seed of step 0), then scores every sampled token with
one forward pass of the same model. Prints the gap GRPO logs
(``rollout/sampler_logprob_gap`` and ``..._abs_gap``, answer tokens among their allowed labels)
over all rollouts, and the sampled tokens farthest apart without the answer constraint (answer
labels there differ by construction). With the policy unchanged the two must agree up to
the precision's rounding.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from types import SimpleNamespace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--task", action="append", required=True, help="a train task id (repeatable)")
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--prompt-history-len", type=int, default=10)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from recthinker_dagster.agent.backends.chat_template import ensure_tool_chat_template
    from recthinker_dagster.artifacts import ArtifactLayout
    from recthinker_dagster.stages.rl import policy_lineage, rl_tasks
    from recthinker_dagster.training.grpo import ToolRollout, load_policy_start, rollout_agent
    from recthinker_dagster.training.rl_recipes import load_rl_recipe

    torch.manual_seed(0)
    layout = ArtifactLayout(args.root)
    recipe = load_rl_recipe(args.recipe)
    tasks, toolboxes = rl_tasks(layout, args.datasets, recipe.screen_pool or recipe.n_train_tasks,
                                args.prompt_history_len, args.task, recipe.task_pool)
    policy = policy_lineage(layout)
    tokenizer = ensure_tool_chat_template(AutoTokenizer.from_pretrained(policy.adapters[-1]))
    model = load_policy_start(policy.base_model, policy.adapters, args.precision)
    agent_config, toolbox_factory = rollout_agent(recipe, toolboxes)
    rollout = ToolRollout(tasks, toolbox_factory, agent_config, tokenizer, batch_size=recipe.rollout_batch_size,
                          seed=recipe.seed, gap_rollouts=len(tasks) * recipe.num_generations)
    prompts = [row["prompt"] for row in rollout.dataset_rows() for _ in range(recipe.num_generations)]
    trainer = SimpleNamespace(model=model, state=SimpleNamespace(global_step=0),
                              args=SimpleNamespace(temperature=recipe.temperature, top_p=recipe.top_p))
    batch = rollout(prompts, trainer)
    gap = {name: round(value, 4) for name, value in rollout.step_records[-1].items() if "gap" in name}
    print(f"{args.precision}, {len(prompts)} rollouts: {gap}")

    model.eval()
    tokens = []
    with torch.no_grad():
        for k, trajectory in enumerate(rollout.last_trajectories):
            prompt, completion = batch["prompt_ids"][k], batch["completion_ids"][k]
            sampled = rollout.training_tokens(trajectory)[3]  # NaN where nothing was sampled
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
            trained = torch.log_softmax(logits / recipe.temperature, -1).gather(1, torch.tensor(completion)[:, None])
            for position, (s, t, m) in enumerate(zip(sampled, trained[:, 0].tolist(), batch["env_mask"][k])):
                if m and not math.isnan(s):
                    tokens.append((abs(s - t), s, t, k, position, tokenizer.decode([completion[position]])))
    tokens.sort(reverse=True)
    print(f"{len(tokens)} sampled tokens, mean abs gap without the answer constraint "
          f"{sum(t[0] for t in tokens) / max(len(tokens), 1):.4f}; farthest apart:")
    for diff, s, t, k, position, text in tokens[: args.top]:
        print(f"  {diff:.3f}  sampled {s:.3f}  trained {t:.3f}  rollout {k} position {position} {text!r}")


if __name__ == "__main__":
    main()
