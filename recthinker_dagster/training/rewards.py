"""GRPO rewards: a small registry of named, documented reward functions.

    outcome = RolloutOutcome.from_trajectory(trajectory, max_tool_calls=8)
    REWARDS["ranking"](outcome)                      # NDCG@10, 0 for an invalid answer
    total = weighted_reward(outcome, {"ranking": 1.0, "format": 0.1, "tool_efficiency": 0.1})

Every reward maps one finished rollout to a number in [0, 1]; the weights live in the RL recipe
(``reward_weights``). "Correct" means: a valid answer whose target ranks within ``correct_k``.
The ranking is the trajectory's final ranking: the model's answer (``answer_mode: generate``)
or the label head's ranking (``logits``: its first label sampled in rollouts, and the forced
head). A ranking that took the parser's repair is not valid and earns nothing; the forced
head's ranking is valid but not ``answered``, so it earns the ranking term only.

The format and tool-efficiency terms are paid to correct rollouts only, and are never
negative. With non-negative weights this makes the ordering safe: a correct rollout has
NDCG@10 >= 1/log2(correct_k + 1), every incorrect one has less (NDCG is monotone in the
target's rank) and earns nothing else, so no bonus can lift an incorrect rollout above a
correct one, and no number of tool calls can push a correct one below an incorrect one.
``tests/test_rewards.py`` checks this over every rank and call count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from recthinker_dagster.agent.think import SECTIONS, first_reply, sections_written
from recthinker_dagster.agent.trajectory import count_repeated_calls
from recthinker_dagster.metrics import ndcg_at_k, rank_below_absent

DEFAULT_CORRECT_K = 5


@dataclass(frozen=True)
class RolloutOutcome:
    """What the rewards see of one rollout."""

    valid: bool  # a complete, clean permutation of the candidates
    answered: bool  # the model answered on its own (not forced by the budget, not a fallback)
    target_rank: int  # 1-based rank of the target in the final ranking
    n_candidates: int
    n_tool_calls: int  # calls that consumed budget, invalid ones included
    n_invalid_calls: int
    n_parse_issues: int
    max_tool_calls: int
    n_repeated_calls: int = 0  # valid calls that repeat an earlier call's tool and arguments
    n_sections: int = 0  # think sections the first assistant turn wrote, in order (agent/think.py)


    @classmethod
    def from_trajectory(cls, trajectory, max_tool_calls: int) -> RolloutOutcome:
        ranking = list(trajectory.final_ranking)
        return cls(
            valid=bool(trajectory.valid),
            answered=trajectory.finish == "answer",
            target_rank=rank_below_absent(ranking, trajectory.target_item_id),
            n_candidates=len(ranking),
            n_tool_calls=trajectory.n_tool_calls,
            n_invalid_calls=trajectory.n_invalid_calls,
            n_parse_issues=trajectory.n_parse_issues,
            max_tool_calls=max_tool_calls,
            n_repeated_calls=repeated_calls(trajectory.tool_calls),
            n_sections=len(sections_written(first_reply(trajectory.messages))),
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def repeated_calls(records) -> int:
    """Valid calls whose tool and arguments an earlier valid call of the rollout already used
    (failed calls count as invalid, not as repeats)."""
    return count_repeated_calls([record for record in records if record.ok])


def ndcg_at(rank: int, k: int = 10) -> float:
    """NDCG@k of a single relevant item at 1-based ``rank`` (1/log2(rank + 1) within k, else 0):
    the metrics' own function (``metrics.ndcg_at_k``, 0-based), so rewards and reports agree."""
    return ndcg_at_k(rank - 1 if rank >= 1 else None, k)


def is_correct(outcome: RolloutOutcome, correct_k: int = DEFAULT_CORRECT_K) -> bool:
    return outcome.valid and outcome.target_rank <= correct_k


RewardFunction = Callable[..., float]
REWARDS: dict[str, RewardFunction] = {}


def register(name: str):
    """Add a reward to the registry under ``name`` (``fn(outcome, **params) -> float``)."""

    def decorator(fn: RewardFunction) -> RewardFunction:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return decorator


@register("ranking")
def ranking_reward(outcome: RolloutOutcome, k: int = 10, **_) -> float:
    """r_rank = NDCG@k of the final ranking = 1/log2(rank + 1) if rank <= k else 0;
    r_rank = 0 for an invalid answer (incomplete, duplicated or invented labels)."""
    return ndcg_at(outcome.target_rank, k) if outcome.valid else 0.0


@register("format")
def format_reward(outcome: RolloutOutcome, correct_k: int = DEFAULT_CORRECT_K, **_) -> float:
    """r_fmt = 1 if the rollout is correct (valid, target within ``correct_k``), the model
    answered on its own and no turn had a parse issue; else 0. Paid only with a useful
    ranking, so the right shape around a useless ranking earns nothing."""
    clean = outcome.answered and outcome.n_parse_issues == 0
    return 1.0 if clean and is_correct(outcome, correct_k) else 0.0


@register("tool_efficiency")
def tool_efficiency_reward(outcome: RolloutOutcome, correct_k: int = DEFAULT_CORRECT_K, **_) -> float:
    """r_eff = (n_calls - n_invalid - n_repeated) / n_calls for a correct rollout that called
    tools, else 0: the share of its calls that were not redundant (failed, or repeating an
    earlier call's tool and arguments). It pays for avoiding redundant calls on correct
    answers, never for making no calls at all (a rollout without calls earns 0)."""
    if not is_correct(outcome, correct_k) or outcome.n_tool_calls <= 0:
        return 0.0
    useful = outcome.n_tool_calls - outcome.n_invalid_calls - outcome.n_repeated_calls
    return max(0.0, min(1.0, useful / outcome.n_tool_calls))


@register("reasoning")
def reasoning_reward(outcome: RolloutOutcome, correct_k: int = DEFAULT_CORRECT_K, **_) -> float:
    """r_think = 1 if the rollout is correct and its first turn wrote every think section
    (``<user>``, ``<candidates>``, ``<match>``, in order), else 0: the think-before-recommend
    recipes' format term, paid like ``format`` only with a useful ranking."""
    return 1.0 if outcome.n_sections == len(SECTIONS) and is_correct(outcome, correct_k) else 0.0


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Known reward names with non-negative weights (negative ones would break the ordering)."""
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown rewards {unknown}; registered: {sorted(REWARDS)}")
    negative = {name: w for name, w in weights.items() if w < 0}
    if negative:
        raise ValueError(f"reward weights must be >= 0, got {negative}")
    if not weights:
        raise ValueError("at least one reward is needed")
    return {name: float(w) for name, w in weights.items()}


def weighted_reward(outcome: RolloutOutcome, weights: Mapping[str, float], params: Mapping | None = None) -> float:
    """sum_i w_i * r_i(outcome): the total GRPO optimizes (TRL applies the same weights)."""
    params = dict(params or {})
    return sum(w * REWARDS[name](outcome, **params) for name, w in check_weights(weights).items())


def trl_reward_functions(weights: Mapping[str, float], params: Mapping | None = None) -> list[Callable]:
    """One TRL reward function per weighted reward, in ``weights`` order; each reads the
    ``outcome`` field the rollout function adds for every completion."""
    params = dict(params or {})
    functions = []
    for name in check_weights(weights):
        reward = REWARDS[name]

        def trl_function(prompts=None, completions=None, outcome=None, _reward=reward, **_kwargs) -> list[float]:
            return [_reward(RolloutOutcome(**o), **params) for o in outcome]

        trl_function.__name__ = name
        functions.append(trl_function)
    return functions
