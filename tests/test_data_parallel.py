"""Data-parallel training: two processes under ``accelerate launch`` (DDP over gloo on this
CPU). SFT trains the same optimizer steps as one process with the same global batch; GRPO
shares a step's rollouts between the processes."""

from __future__ import annotations

import pytest

from recthinker_dagster.training import load_recipe, train_sft
from recthinker_dagster.training.distributed import (
    DataParallelError,
    TaskSource,
    launch_command,
    launch_grpo,
    launch_sft,
)
from recthinker_dagster.training.rl_recipes import load_rl_recipe
from tests.support.paths import REPO_ROOT
from tests.support.trajectories import real_trajectories
from tests.test_sft import short_example

# per-step loss, fp32: the two runs differ only in the order of the gradient reductions
LOSS_TOLERANCE = 0.01


def tiny_recipe(**overrides):
    return load_recipe("smoke").with_overrides(
        name="data-parallel", max_steps=2, save_steps=10, gradient_accumulation_steps=2, learning_rate=1e-3,
        lora_r=4, lora_alpha=8, lora_dropout=0.0, lr_scheduler_type="constant", precision="fp32", device="cpu",
        **overrides)


def test_processes_share_the_global_batch_and_keep_the_digest(monkeypatch):
    recipe = tiny_recipe()
    assert recipe.with_overrides(num_processes=2).digest == recipe.digest  # where it runs, not what it learns
    with pytest.raises(ValueError, match="must be >= 1 and divide gradient_accumulation_steps"):
        recipe.with_overrides(num_processes=3)
    command = launch_command(recipe.with_overrides(num_processes=2), ["--examples", "x"])
    assert command[command.index("--num_processes") + 1] == "2" and "--cpu" not in command  # --cpu: one process
    assert command[-3:] == ["recthinker_dagster.training.distributed", "--examples", "x"]
    monkeypatch.setenv("RECTHINKER_ACCELERATE_CONFIG", str(REPO_ROOT / "recipes" / "accelerate" / "zero2.yaml"))
    command = launch_command(recipe.with_overrides(num_processes=2), ["--examples", "x"])
    assert command[command.index("--config_file") + 1].endswith("zero2.yaml") and "--multi_gpu" not in command
    assert command[command.index("--num_processes") + 1] == "2"  # the recipe's count wins over the file's
    monkeypatch.setenv("RECTHINKER_ACCELERATE_CONFIG", "no-such-file.yaml")
    with pytest.raises(FileNotFoundError, match="RECTHINKER_ACCELERATE_CONFIG"):
        launch_command(recipe, [])
    rl = load_rl_recipe("smoke")
    assert rl.with_overrides(num_processes=2).digest == rl.digest
    with pytest.raises(ValueError, match="must be >= 1 and divide gradient_accumulation_steps"):
        rl.with_overrides(num_processes=3)


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tiny_base_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_base_model
    data = [short_example(t) for t in list(real_trajectories("train"))[:6]]
    one = train_sft(data, base, tmp_path / "one", tiny_recipe())
    lines: list[str] = []
    two = launch_sft(data, base, tmp_path / "two", tiny_recipe(num_processes=2), log=lines.append)

    assert (one.metrics["num_processes"], two.metrics["num_processes"]) == (1, 2)
    assert one.global_step == two.global_step == 2
    losses = [[step["loss"] for step in run.metrics["steps"]] for run in (one, two)]
    assert len(losses[0]) == len(losses[1]) == 2
    assert max(abs(a - b) for a, b in zip(*losses)) <= LOSS_TOLERANCE, losses
    assert any("loss" in line and "2/2" in line for line in lines)  # the first process's progress came through
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(two.adapter_dir))  # the adapter loads


@pytest.mark.slow
def test_two_grpo_processes_share_the_rollouts_of_each_step(tiny_base_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_base_model
    # one group of 4 rollouts per step, split over the two processes (TRL gathers its rewards);
    # micro-batches of 1 with checkpointing, the settings that keep SmolLM2 near 3 GB per process
    recipe = load_rl_recipe("smoke").with_overrides(name="data-parallel", max_turns=1, max_new_tokens=24,
                                                    per_device_train_batch_size=1, gradient_accumulation_steps=4,
                                                    gradient_checkpointing=True, precision="fp32", device="cpu",
                                                    num_processes=2)
    lines: list[str] = []
    source = TaskSource("tests.support.trajectories:rl_task_source", {"split": "train", "n": 2})
    result = launch_grpo(source, base, [], tmp_path / "two", recipe, log=lines.append)

    assert result.global_step == 1 and result.metrics["num_processes"] == 2
    assert result.metrics["rollouts_per_process"] == 2
    assert "reward" in result.metrics["steps"][-1]
    assert any("reward" in line and "1/1" in line for line in lines)  # the first process's progress came through
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(result.adapter_dir))


@pytest.mark.slow
def test_a_failed_launch_says_so_with_the_workers_output(tmp_path):
    with pytest.raises(DataParallelError, match=r"2 processes\) exited with [1-9].*\n"):
        launch_sft([], tmp_path / "no-model", tmp_path / "run", tiny_recipe(num_processes=2), log=lambda _: None)
