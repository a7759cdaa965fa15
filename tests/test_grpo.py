"""GRPO: rollouts through the real loop and tools with their token masks, and real TRL steps
on a tiny random model with SmolLM2's tokenizer (slow) that change the RL adapter and resume from a checkpoint."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from recthinker_dagster.agent import AgentConfig, SamplingParams
from recthinker_dagster.training.grpo import ToolRollout, first_and_last_visits, learning_summary, train_grpo
from recthinker_dagster.training.rl_recipes import load_rl_recipe
from tests.support.trajectories import ScriptedInvestigator, agent_tasks, length_reward, toolbox_factory


@pytest.fixture(scope="module")
def tokenizer(prepared_base_model):
    from transformers import AutoTokenizer

    from recthinker_dagster.agent.backends.chat_template import (
        ensure_tool_chat_template,
    )

    return ensure_tool_chat_template(AutoTokenizer.from_pretrained(prepared_base_model[0]))


def _fake_trainer(step=0):
    model = torch.nn.Linear(1, 1)
    return SimpleNamespace(model=model, state=SimpleNamespace(global_step=step),
                           args=SimpleNamespace(temperature=1.0, top_p=1.0), _metrics=defaultdict(lambda: defaultdict(list)))


def test_rollout_runs_real_tools_and_masks_tool_results(tokenizer):
    tasks = agent_tasks("train", 2)
    config = AgentConfig(max_turns=3, max_tool_calls=4, sampling=SamplingParams(max_new_tokens=64))
    rollout = ToolRollout(tasks, toolbox_factory, config, tokenizer,
                          backend_factory=lambda model, tok: ScriptedInvestigator())
    rows = rollout.dataset_rows()
    assert len(rows) == 2 and rows[0]["prompt"][0]["role"] == "system"
    prompts = [rows[0]["prompt"], rows[0]["prompt"], rows[1]["prompt"], rows[1]["prompt"]]  # TRL repeats each task
    trainer = _fake_trainer()
    out = rollout(prompts, trainer)
    assert len(out["completion_ids"]) == len(out["env_mask"]) == len(out["outcome"]) == 4
    for trajectory, prompt_ids, completion, mask in zip(rollout.last_trajectories, out["prompt_ids"],
                                                        out["completion_ids"], out["env_mask"]):
        assert trajectory.n_tool_calls == 2 and trajectory.valid  # real calls, real results, a ranking
        assert len(mask) == len(completion) and mask[0] == 1 and mask[-1] == 1
        policy_text = tokenizer.decode([t for t, m in zip(completion, mask) if m])
        masked_text = tokenizer.decode([t for t, m in zip(completion, mask) if not m])
        tool_output = next(m["content"] for m in trajectory.messages if m["role"] == "tool")
        assert "<tool_call>" in policy_text and "<answer>" in policy_text
        assert tool_output[:80] in masked_text and tool_output[:80] not in policy_text  # tool results never trained
        prompt_text = tokenizer.decode(prompt_ids)  # ends before the policy's first token
        first_reply = next(m["content"] for m in trajectory.messages if m["role"] == "assistant")
        assert prompt_text.rstrip().endswith("<|im_start|>assistant") and first_reply[:60] not in prompt_text
    assert out["outcome"][0]["n_tool_calls"] == 2 and out["outcome"][0]["valid"]
    assert trainer._metrics["train"]["tools/call_frequency"] == [2.0]
    assert trainer._metrics["train"]["time/tools_s"][0] > 0
    visits = {v["task_id"]: v for v in rollout.task_visits}  # each task's rollouts of the step, paired later
    assert set(visits) == {t.task_id for t in tasks} and all(v["rollouts"] == 2 and v["step"] == 0 for v in visits.values())
    for task_id, visit in visits.items():
        ndcg = [t.metrics["ndcg@10"] for t in rollout.last_trajectories if t.task_id == task_id]
        assert visit["ndcg@10"] == pytest.approx(sum(ndcg) / 2, abs=1e-4)
    with pytest.raises(KeyError, match="no RL task"):
        rollout([[{"role": "user", "content": "unknown"}]], trainer)


def test_relabelled_rollouts_show_each_group_one_fresh_candidate_order_per_step(tokenizer):
    """With ``relabel_candidates`` every rollout of a task in a step sees the same candidate
    order, drawn anew per step, so the target's label moves between visits; the rollouts run on it."""
    tasks = agent_tasks("train", 2)
    config = AgentConfig(max_turns=3, max_tool_calls=4, sampling=SamplingParams(max_new_tokens=64))
    plain = ToolRollout(tasks, toolbox_factory, config, tokenizer)
    assert all(plain.shown_task(task, 3) is task for task in tasks)
    rollout = ToolRollout(tasks, toolbox_factory, config, tokenizer, relabel_candidates=True,
                          backend_factory=lambda model, tok: ScriptedInvestigator())
    task = tasks[0]
    orders = [rollout.shown_task(task, step).candidate_item_ids for step in range(6)]
    assert orders[0] == rollout.shown_task(task, 0).candidate_item_ids  # seeded: one order per (step, task)
    assert all(sorted(order) == sorted(task.candidate_item_ids) for order in orders)
    assert len({order.index(task.target_item_id) for order in orders}) > 1  # the target's label moves
    prompt = rollout.dataset_rows()[0]["prompt"]
    rollout([prompt, prompt], _fake_trainer(step=4))
    shown = rollout.shown_task(task, 4)
    assert shown.candidate_item_ids != task.candidate_item_ids
    item_of = toolbox_factory(shown).labels  # label -> item in the shown order
    for trajectory in rollout.last_trajectories:  # both rollouts answered in the shown labels
        assert [item_of[label] for label in trajectory.final_labels] == trajectory.final_ranking


def test_relabel_each_rollout_shows_every_rollout_of_a_group_its_own_candidate_order(tokenizer):
    """With ``relabel_each_rollout`` the rollouts of one group see different orders (so the
    target sits under several labels within the group), counted across the calls of a step,
    and each rollout answers in the labels it was shown."""
    tasks = agent_tasks("train", 1)
    task = tasks[0]
    config = AgentConfig(max_turns=3, max_tool_calls=4, sampling=SamplingParams(max_new_tokens=64))
    per_group = ToolRollout(tasks, toolbox_factory, config, tokenizer, relabel_candidates=True)
    assert len({tuple(per_group.shown_task(task, 2, k).candidate_item_ids) for k in range(4)}) == 1
    rollout = ToolRollout(tasks, toolbox_factory, config, tokenizer, relabel_candidates=True,
                          relabel_each_rollout=True, backend_factory=lambda model, tok: ScriptedInvestigator())
    shown = [rollout.shown_task(task, 2, k) for k in range(6)]
    assert shown[0].candidate_item_ids == rollout.shown_task(task, 2, 0).candidate_item_ids  # seeded
    assert shown[0].candidate_item_ids != rollout.shown_task(task, 2, 0, process=1).candidate_item_ids
    assert len({order.candidate_item_ids.index(task.target_item_id) for order in shown}) > 1
    prompt = rollout.dataset_rows()[0]["prompt"]
    trainer = _fake_trainer(step=2)
    first = rollout([prompt, prompt, prompt], trainer)
    rest = rollout([prompt, prompt, prompt], trainer)  # the same step, next call: rollouts 3-5
    rows = first["prompt_ids"] + rest["prompt_ids"]
    assert len({tuple(ids) for ids in rows}) > 1  # the group's prompts differ: the candidate lists do
    for k, trajectory in enumerate(rollout.last_trajectories, start=3):
        item_of = toolbox_factory(shown[k]).labels
        assert [item_of[label] for label in trajectory.final_labels] == trajectory.final_ranking
    rollout([prompt], _fake_trainer(step=3))  # a new step counts from rollout 0 again
    item_of = toolbox_factory(rollout.shown_task(task, 3, 0)).labels
    assert [item_of[label] for label in rollout.last_trajectories[0].final_labels] == \
        rollout.last_trajectories[0].final_ranking
    with pytest.raises(ValueError, match="relabel_each_rollout needs relabel_candidates"):
        load_rl_recipe("smoke").with_overrides(relabel_each_rollout=True)


def test_first_and_last_visits_pair_each_task_with_itself():
    visits = [{"step": 3, "task_id": "a", "ndcg@10": 0.9}, {"step": 1, "task_id": "a", "ndcg@10": 0.5},
              {"step": 2, "task_id": "a", "ndcg@10": 0.1}, {"step": 1, "task_id": "b", "ndcg@10": 1.0},
              {"step": 4, "task_id": "b", "ndcg@10": 1.0}, {"step": 2, "task_id": "c", "ndcg@10": 0.3}]
    got = first_and_last_visits(visits)  # c was seen once: not paired
    assert got["tasks"] == 2 and got["first"] == pytest.approx(0.75) and got["last"] == pytest.approx(0.95)
    assert got["difference"] == pytest.approx(0.2) and got["se"] == pytest.approx(0.2)  # diffs 0.4 and 0.0
    assert first_and_last_visits(visits[-1:]) == {"tasks": 0}


def test_learning_summary_compares_the_first_and_last_quarter_of_the_steps():
    steps = [{"step": k + 1, "reward": r, "frac_reward_zero_std": z}
             for k, (r, z) in enumerate([(0.2, 0.5), (0.4, 0.0), (0.5, 0.0), (0.6, 0.0),
                                         (0.6, 0.5), (0.7, 0.0), (0.8, 0.0), (1.0, 0.0)])]
    got = learning_summary(steps, [])
    assert got["reward"]["steps_per_quarter"] == 2
    assert got["reward"]["first_quarter"] == [pytest.approx(0.3), pytest.approx(0.1)]  # mean, s.e. of 0.2 and 0.4
    assert got["reward"]["last_quarter"] == [pytest.approx(0.9), pytest.approx(0.1)]
    assert got["mean_frac_reward_zero_std"] == pytest.approx(0.125)
    assert got["tasks_first_and_last_visit"] == {"tasks": 0}
    assert learning_summary([], [])["reward"] is None


def test_a_run_without_kl_term_estimates_the_kl_to_its_start_on_the_gap_rollouts():
    """TRL logs no ``kl`` when ``beta`` is 0 (it runs no reference pass); the rollout function
    estimates it on the gap's rollouts: TRL's estimator over their sampled tokens, between the
    policy and the adapter disabled, and 0 for an adapter that adapts nothing."""
    from tests.support.tiny_models import tiny_lora_policy

    policy = tiny_lora_policy()
    prompts, completions, masks = [[3, 9, 14], [5, 1]], [[2, 27, 5, 11], [40, 7, 7]], [[1, 1, 0, 1], [1, 0, 1]]
    sampled = [[-1.0] * 4, [-2.0] * 3]
    expected = []
    with torch.no_grad():
        for prompt, completion, mask in zip(prompts, completions, masks):
            ids = torch.tensor([prompt + completion])

            def logps(model, prompt=prompt, completion=completion, ids=ids):
                logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1] / 1.2
                return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]

            policy_logps = logps(policy)
            with policy.disable_adapter():
                start = logps(policy) - policy_logps
            expected += [float(torch.exp(d) - d - 1) for d, m in zip(start, mask) if m]
    rollout = SimpleNamespace(gap_rollouts=2)

    def figures(model, estimate_kl):
        return ToolRollout._sampler_gap(rollout, model, prompts, completions, masks, sampled,
                                        SamplingParams(temperature=1.2), estimate_kl=estimate_kl)

    got = figures(policy, estimate_kl=True)
    assert got["kl"] == pytest.approx(sum(expected) / len(expected), rel=1e-5) and got["kl"] > 1e-4
    assert "rollout/sampler_logprob_gap" in got
    assert "kl" not in figures(policy, estimate_kl=False)  # a run with a KL term: TRL's own figure
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
    assert figures(policy, estimate_kl=True)["kl"] == pytest.approx(0.0, abs=1e-9)


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory, tiny_base_model):
    base = tiny_base_model
    # one group of 4 rollouts per step (the length reward varies within every group), in
    # micro-batches of 1: a micro-batch of 2 ~1.4k-token rollouts peaks near 9 GB on CPU
    recipe = load_rl_recipe("smoke").with_overrides(name="test", max_steps=2, save_steps=1, learning_rate=5e-3,
                                                    max_turns=1, max_new_tokens=24, per_device_train_batch_size=1)
    tasks = agent_tasks("train", 2)
    out = tmp_path_factory.mktemp("grpo")
    first = train_grpo(tasks, toolbox_factory, base, [], out, recipe.with_overrides(max_steps=1),
                       extra_reward_funcs=[length_reward])
    second = train_grpo(tasks, toolbox_factory, base, [], out, recipe, extra_reward_funcs=[length_reward])
    return base, first, second


@pytest.mark.slow
def test_grpo_steps_change_the_adapter_and_resume(grpo_runs):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base, first, second = grpo_runs
    assert first.global_step == 1 and second.global_step == 2 and second.resumed_from == "checkpoint-1"
    weights = load_file(str(second.adapter_dir / "adapter_model.safetensors"))
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in weights.items())  # B starts at 0
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = model(ids).logits
    after = PeftModel.from_pretrained(model, str(second.adapter_dir))(ids).logits
    assert not torch.allclose(before, after)


@pytest.mark.slow
def test_grpo_logs_health_figures_and_time_split(grpo_runs):
    _, first, second = grpo_runs
    step = second.metrics["steps"][-1]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "learning_rate", "completions/mean_length",
                "tools/call_frequency", "tools/failure_rate", "rewards/ranking/mean", "rewards/format/std", "kl"):
        assert key in step, key
    # the smoke recipe has no KL term: the estimate stands in for TRL's figure, 0 before the first update
    assert first.metrics["steps"][0]["kl"] == pytest.approx(0.0, abs=1e-6) and step["kl"] > 0
    split = second.metrics["time_split_per_step"]
    assert split["generation_s"] > 0 and split["scoring_backward_optimizer_s"] > 0
    assert second.metrics["seconds_per_step"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(("answer_temperature", "non_answer_weight", "answer_credit"),
                         [(None, 1.0, "all"), (2.5, 0.1, "until_target")])
def test_grpo_scores_answer_tokens_under_the_sampling_constraint(tmp_path, answering_base_model, monkeypatch,
                                                                 answer_temperature, non_answer_weight, answer_credit):
    """A policy that answers at once (the bigram model): the trainer takes the log-probs of the
    reference (KL) and of the policy (loss) among the ids the answer constraint allowed, at the
    temperature the labels were sampled at, so sampler and trainer agree on the answer tokens."""
    from recthinker_dagster.training import grpo_trainer

    restricted: list[int] = []
    temperatures: list[float] = []
    original = grpo_trainer.restrict_logprobs

    def counting(logps, hidden, head, completion_ids, allowed, temperature):
        restricted.append(int((allowed[..., 0] >= 0).sum()))
        temperatures.append(temperature)
        return original(logps, hidden, head, completion_ids, allowed, temperature)

    weighted: list[tuple] = []
    original_weighting = grpo_trainer.token_advantages

    def recording(advantages, allowed, weight, decided):
        weighted.append((advantages, allowed, decided, original_weighting(advantages, allowed, weight, decided)))
        return weighted[-1][-1]

    monkeypatch.setattr(grpo_trainer, "restrict_logprobs", counting)
    monkeypatch.setattr(grpo_trainer, "token_advantages", recording)
    recipe = load_rl_recipe("smoke").with_overrides(
        name="test-constrained", max_steps=1, num_generations=2, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, max_turns=1, max_new_tokens=48, beta=0.04, learning_rate=5e-3,
        answer_temperature=answer_temperature, non_answer_weight=non_answer_weight, answer_credit=answer_credit)
    result = train_grpo(agent_tasks("train", 1), toolbox_factory, answering_base_model, [], tmp_path, recipe)
    step = result.metrics["steps"][-1]
    # the loss's advantages: per token when the recipe weighs the answer's labels apart, else TRL's per rollout
    assert len(weighted) == (0 if non_answer_weight == 1.0 else 1)
    if weighted:
        advantages, allowed, decided, per_token = weighted[0]
        answer, per_rollout = allowed[..., 0] >= 0, advantages[:, None].expand_as(per_token)
        # every answer places the target, and the labels after it (then the forced close) are settled
        assert decided.any(dim=1).all() and (answer & ~decided).any(dim=1).all()
        assert torch.equal(per_token[decided], torch.zeros(int(decided.sum())))
        live = answer & ~decided
        assert torch.equal(per_token[live], per_rollout[live])
        assert torch.allclose(per_token[~answer & ~decided], non_answer_weight * per_rollout[~answer & ~decided])
    assert step["rollout/answered_rate"] == 1.0
    assert len(restricted) == 2 and all(n > 0 for n in restricted)  # the reference's pass, then the loss's
    assert temperatures == [answer_temperature or recipe.temperature] * 2
    assert step["rollout/sampler_logprob_abs_gap"] < 1e-3


@pytest.mark.slow
def test_grpo_scores_a_logits_mode_answer_as_plackett_luce_draws_from_the_head(tmp_path, answering_base_model,
                                                                               monkeypatch):
    """``logits`` mode: the trainer scores each drawn label from the answer's first label position
    (the reference's pass, then the loss's), every draw of every rollout, at the answer
    temperature, and its figures agree with the sampler's."""
    from recthinker_dagster.training import grpo_trainer

    scored: list[tuple[int, float]] = []
    original = grpo_trainer.head_draw_logprobs

    def counting(logps, hidden, head, source, groups, temperature):
        scored.append((int((source >= 0).sum()), temperature))
        return original(logps, hidden, head, source, groups, temperature)

    monkeypatch.setattr(grpo_trainer, "head_draw_logprobs", counting)
    recipe = load_rl_recipe("smoke").with_overrides(
        name="test-head-draws", max_steps=1, num_generations=2, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, max_turns=1, max_new_tokens=48, beta=0.04, learning_rate=5e-3,
        answer_temperature=2.0, non_answer_weight=0.0)
    result = train_grpo(agent_tasks("train", 1), toolbox_factory, answering_base_model, [], tmp_path, recipe,
                        answer_mode="logits")
    step = result.metrics["steps"][-1]
    assert step["rollout/answered_rate"] == 1.0
    labels = 10  # the smoke candidates, every one drawn in each of the 2 rollouts
    assert scored == [(2 * labels, 2.0)] * 2
    assert step["rollout/sampler_logprob_abs_gap"] < 1e-3


def test_rl_recipes_load_and_hold_no_validation_settings():
    for name in ("smoke", "demo", "full", "reczero", "recone"):
        recipe = load_rl_recipe(name)
        assert recipe.name == name and "eval" not in recipe.to_dict()  # validation: the profile's rl.validation
        assert recipe.conversation == ("think" if name in ("reczero", "recone") else "tools")
    with pytest.raises(ValueError, match="unknown RL recipe keys"):
        load_rl_recipe("smoke").with_overrides(eval={"n_tasks": 2})


@pytest.mark.slow
def test_grpo_think_rollouts_train_without_tools(tmp_path, tiny_base_model):
    """The RecZero recipe's conversation: GRPO from the base model on tool-free think rollouts."""
    recipe = load_rl_recipe("smoke").with_overrides(
        name="test-think", conversation="think", max_steps=1, num_generations=2, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, max_new_tokens=24, learning_rate=5e-3,
        reward_weights={"ranking": 1.0, "reasoning": 0.1})
    result = train_grpo(agent_tasks("train", 1), toolbox_factory, tiny_base_model, [], tmp_path, recipe,
                        extra_reward_funcs=[length_reward])
    step = result.metrics["steps"][-1]
    assert result.global_step == 1 and step["tools/call_frequency"] == 0.0  # no tool was offered
    assert "rewards/reasoning/mean" in step
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="conversation must be one of"):
        recipe.with_overrides(conversation="chat")


def test_think_rollouts_open_with_the_think_prompt_and_no_tools(tokenizer):
    from recthinker_dagster.agent.think import THINK_PROMPT, think_config, without_tools

    rollout = ToolRollout(agent_tasks("train", 1), without_tools(toolbox_factory), think_config(), tokenizer)
    [row] = rollout.dataset_rows()
    system = row["prompt"][0]["content"]
    assert system.startswith(THINK_PROMPT.split("\n")[0]) and "<tool_call>" not in system


def test_a_recipe_that_needs_more_tasks_per_step_than_there_are_is_refused(tmp_path):
    recipe = load_rl_recipe("smoke")  # 2 x 4 rollouts per step / 4 per group: two tasks per step
    with pytest.raises(ValueError, match="takes 2 tasks per step .* only 1 train tasks"):
        train_grpo(agent_tasks("train", 1), toolbox_factory, tmp_path / "no-model", [], tmp_path / "out", recipe)


def test_flat_groups_are_found_where_trls_float32_std_misses_them():
    from trl.trainer.utils import nanstd

    from recthinker_dagster.training.grpo_trainer import flat_group_rows

    weights = torch.tensor([1.0, 0.1, 0.1])
    perfect = torch.ones(8, 3)  # eight rollouts with every term at 1: totals 1.2 (not exact in float32)
    totals = (perfect * weights).nansum(dim=1)
    assert not torch.isclose(nanstd(totals.view(-1, 8), dim=1), torch.zeros(1)).item()  # TRL's test: "varied"
    varied = perfect.clone()
    varied[3, 0] = 0.63  # one rollout ranked the target second
    rows = flat_group_rows(torch.cat([perfect, varied]), weights, 8)
    assert rows.tolist() == [True] * 8 + [False] * 8


def test_token_advantages_weigh_the_answer_labels_fully_the_rest_less_and_settled_tokens_not():
    from recthinker_dagster.training.answer_logprobs import allowed_table
    from recthinker_dagster.training.grpo_trainer import token_advantages

    # two rollouts of 5 completion positions: the first answered at positions 2-3, the second never
    allowed = allowed_table([[None, None, [7, 8, 9], [8, 9], None], [None] * 5], 5)
    weighted = token_advantages(torch.tensor([2.0, -1.0]), allowed, 0.25)
    assert weighted.tolist() == [[0.5, 0.5, 2.0, 2.0, 0.5], [-0.25] * 5]
    assert token_advantages(torch.tensor([2.0, -1.0]), allowed, 1.0).tolist() == [[2.0] * 5, [-1.0] * 5]
    with pytest.raises(ValueError, match="one advantage per rollout"):
        token_advantages(torch.zeros(2, 5), allowed, 0.25)
    decided = torch.tensor([[False, False, False, True, True], [False] * 5])  # the first placed its target at 2
    assert token_advantages(torch.tensor([2.0, -1.0]), allowed, 0.25, decided).tolist() == [
        [0.5, 0.5, 2.0, 0.0, 0.0], [-0.25] * 5]


def test_answer_weighting_fields_are_checked():
    with pytest.raises(ValueError, match="non_answer_weight must be in"):
        load_rl_recipe("demo").with_overrides(non_answer_weight=1.5)
    with pytest.raises(ValueError, match="answer_credit must be one of"):
        load_rl_recipe("demo").with_overrides(answer_credit="after_target")
    smoke = load_rl_recipe("smoke")  # plain GRPO unless a recipe says otherwise
    assert (smoke.non_answer_weight, smoke.answer_credit) == (1.0, "all")


def test_a_run_without_the_answer_constraint_refuses_answer_weighted_steps():
    from recthinker_dagster.settings import RLSettings
    from recthinker_dagster.stages.rl import check_recipe_fits_run

    settings = RLSettings(rollout_server="http://localhost:8000")
    recipe = load_rl_recipe("demo").with_overrides(non_answer_weight=0.1, answer_credit="until_target",
                                                   answer_temperature=None)
    with pytest.raises(ValueError, match="sets non_answer_weight and answer_credit.*rollout_server 'http://localhost"):
        check_recipe_fits_run(recipe, settings)
    check_recipe_fits_run(recipe.with_overrides(non_answer_weight=1.0, answer_credit="all"), settings)
    for answer_mode in ("generate", "logits"):  # the local backend replays the constraint in either answer mode
        check_recipe_fits_run(recipe, RLSettings(answer_mode=answer_mode))


def round_off_reward(prompts, completions, **kwargs) -> list[float]:
    """1 for every rollout, give or take one float32 step: what summing 1.0 + 0.1 + 0.1 leaves."""
    return [1.0 + 1.2e-7 * (k % 2) for k in range(len(completions))]


@pytest.mark.slow
def test_a_flat_group_logs_zero_std_and_trains_nothing(tmp_path, tiny_base_model):
    """The tiny random model never answers: the forced head ranks each task's candidates the
    same way in every rollout, so with a reward equal up to round-off on top every group is
    flat (TRL's float32 test calls it varied): frac_reward_zero_std 1, every advantage 0, no gradient."""
    recipe = load_rl_recipe("smoke").with_overrides(name="test", max_steps=1, max_turns=1, max_new_tokens=16,
                                                    per_device_train_batch_size=1)
    result = train_grpo(agent_tasks("train", 2), toolbox_factory, tiny_base_model, [], tmp_path, recipe,
                        extra_reward_funcs=[round_off_reward])
    step = result.metrics["steps"][0]
    assert step["frac_reward_zero_std"] == 1.0 and step["rollout/forced_head_rate"] == 1.0
    assert step["grad_norm"] == 0.0


@pytest.mark.slow
def test_passes_over_shared_prompts_run_each_prompt_once_and_give_the_policys_log_probs_at_the_start(
        tmp_path, tiny_base_model, monkeypatch):
    """With a KL term and ``shared_prompts`` the reference pass runs each group's prompt once, and
    so does each loss micro-batch, regrouped to hold one group; at the first step the policy is
    its start, so TRL's KL between the two passes is round-off only."""
    from recthinker_dagster.training import grpo_trainer

    prefixes: list[tuple[int, bool]] = []  # per scored chunk: its prompt KV's length, and whether it has a graph
    original = grpo_trainer._attending_to

    def counting(decoder, prefix_kv):
        prefixes.append((prefix_kv[0][0].shape[2], prefix_kv[0][0].requires_grad))
        return original(decoder, prefix_kv)

    monkeypatch.setattr(grpo_trainer, "_attending_to", counting)
    recipe = load_rl_recipe("smoke").with_overrides(name="test-shared", max_steps=1, max_turns=1, max_new_tokens=24,
                                                    per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                                    beta=0.04, trim_padding=True, shared_prompts=True,
                                                    precision="fp32")
    result = train_grpo(agent_tasks("train", 2), toolbox_factory, tiny_base_model, [], tmp_path, recipe,
                        extra_reward_funcs=[length_reward])
    step = result.metrics["steps"][0]
    groups = recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps // recipe.num_generations
    assert recipe.num_generations == recipe.per_device_train_batch_size == 4 and groups == 2
    assert all(length > 100 for length, _ in prefixes)
    # the reference pass: one chunk per group (its 4 rows); the loss: one per micro-batch, which
    # TRL's shuffle would have left with rows of both groups (2 prompts) but for the regrouping
    assert [graph for _, graph in prefixes] == [False] * groups + [True] * groups
    assert step["kl"] == pytest.approx(0.0, abs=1e-6) and step["grad_norm"] > 0


def test_answer_temperature_is_checked_and_reaches_the_rollouts(tmp_path):
    from recthinker_dagster.training.grpo import rollout_agent

    with pytest.raises(ValueError, match="answer_temperature must be > 0"):
        load_rl_recipe("demo").with_overrides(answer_temperature=0.0)
    recipe = load_rl_recipe("demo").with_overrides(answer_temperature=2.0)
    config, _ = rollout_agent(recipe, toolbox_factory)
    assert config.sampling.answer_temperature == 2.0
    assert SamplingParams(temperature=1.0, answer_temperature=2.0).answer_scale == 0.5
    assert SamplingParams(temperature=0.0, answer_temperature=2.0).answer_scale == 1.0  # greedy stays greedy
