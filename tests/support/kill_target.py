"""A short SFT or GRPO run for the SIGKILL tests (``tests/test_kill_resume.py``).

    python -m tests.support.kill_target {sft,grpo} OUT BASE_MODEL

Run as a script, it stalls inside step 2, after checkpoint 1 is on disk (and ``OUT/ready``
says so), until it is killed from outside. ``train(stage, out, base)`` is the same run,
resumed, in the test's own process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

STEPS = 3


def train(stage: str, out: Path, base: Path, callbacks=()):
    from tests.support.trajectories import agent_tasks, length_reward, real_trajectories, toolbox_factory

    if stage == "sft":
        from recthinker_dagster.training import load_recipe, train_sft

        recipe = load_recipe("smoke").with_overrides(
            name="kill", max_steps=STEPS, save_steps=1, gradient_accumulation_steps=1, learning_rate=1e-3,
            lora_r=4, lora_alpha=8, lora_dropout=0.0, lr_scheduler_type="constant")
        data = [{"messages": t.messages, "task_id": t.task_id,
                 "tools": [s for s in t.tools if s["function"]["name"] in {c.name for c in t.tool_calls}]}
                for t in real_trajectories("train")[:4]]
        return train_sft(data, base, out, recipe, callbacks=list(callbacks))
    from recthinker_dagster.training.grpo import train_grpo
    from recthinker_dagster.training.rl_recipes import load_rl_recipe

    recipe = load_rl_recipe("smoke").with_overrides(name="kill", max_steps=STEPS, save_steps=1, learning_rate=5e-3,
                                                    max_turns=1, max_new_tokens=16, per_device_train_batch_size=1)
    return train_grpo(agent_tasks("train", 2), toolbox_factory, base, [], out, recipe,
                      extra_reward_funcs=[length_reward], callbacks=list(callbacks))


def stall_after_first_checkpoint(marker: Path):
    from transformers import TrainerCallback

    class Stall(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 1:
                marker.write_text("checkpoint-1")

        def on_step_begin(self, args, state, control, **kwargs):
            while marker.exists():  # inside step 2: wait to be killed
                time.sleep(0.5)

    return Stall()


if __name__ == "__main__":
    stage, out, base = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    train(stage, out, base, [stall_after_first_checkpoint(out / "ready")])
    sys.exit("finished without being killed")
