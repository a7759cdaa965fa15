"""Named run profiles: every knob that changes the cost of a pipeline run.

``smoke`` runs in CI in minutes, ``demo`` is the default on a laptop CPU and ``full`` is
paper-sized and meant for a GPU. Dagster ``Config`` classes take a profile name and let
any single field be overridden in the launchpad.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    # evaluation protocol: users sampled per group (sparse, dense)
    n_eval_users_per_group: int
    n_valid_users_per_group: int
    n_train_users_per_group: int
    teacher_samples_per_task: int = 1
    sasrec_train_windows: int = 50_000  # training sequences SASRec sees (sets its epochs)
    n_candidates: int = 20
    prompt_history_len: int = 10
    max_turns: int = 6  # agent budgets, shared by teachers, training rollouts and evaluation
    max_tool_calls: int = 8
    # LLM systems in the evaluation: eval tasks per dataset (0: all), turns and tokens per turn
    llm_eval_tasks: int = 0
    llm_max_turns: int = 6
    llm_max_new_tokens: int = 384
    seed: int = 2026

    def as_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        "smoke", n_eval_users_per_group=10, n_valid_users_per_group=5, n_train_users_per_group=20,
        sasrec_train_windows=5_000, llm_eval_tasks=4, llm_max_turns=2, llm_max_new_tokens=64,
    ),
    "demo": Profile(
        "demo", n_eval_users_per_group=100, n_valid_users_per_group=25, n_train_users_per_group=200,
        teacher_samples_per_task=2, llm_eval_tasks=10, llm_max_turns=4, llm_max_new_tokens=160,
    ),
    "full": Profile(
        "full", n_eval_users_per_group=500, n_valid_users_per_group=100, n_train_users_per_group=2000,
        teacher_samples_per_task=4, sasrec_train_windows=200_000,
    ),
}

DEFAULT_PROFILE = "demo"


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}") from None
