"""Evaluation-protocol settings, with per-dataset defaults.

Users are grouped by their *total* number of interactions:

| dataset        | sparse users           | dense users | notes                               |
|----------------|------------------------|-------------|-------------------------------------|
| ``ml-1m``      | 20 to 50 interactions  | >= 200      | every user has >= 20                |
| ``amazon-cds`` | <= 25 (no lower bound) | >= 100      | 20-core CDs subset                  |
| ``synthetic``  | <= 40 (no lower bound) | >= 100      | fits ``generate_synthetic`` default |

Users with fewer than ``MIN_INTERACTIONS`` (3) interactions never get a task, whatever the
thresholds say: a task needs a test target, a validation target and one more interaction.
Everything else (candidates, sample sizes, seed) has the same default for every dataset;
override any field with ``protocol_config_for(dataset, field=value)``. Candidates: 10 per task
by default, the paper's leave-one-out protocol (the target plus 9 sampled negatives); 20 stays
available (``n_candidates=20``, or ``--set protocol.n_candidates=20`` for a pipeline run), and
every results table states which N it used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

MIN_INTERACTIONS = 3  # test target + validation target + at least one training interaction

DATASET_DEFAULTS: dict[str, dict[str, int]] = {
    "ml-1m": {"sparse_min": 20, "sparse_max": 50, "dense_min": 200},
    "amazon-cds": {"sparse_min": 0, "sparse_max": 25, "dense_min": 100},
    "synthetic": {"sparse_min": 0, "sparse_max": 40, "dense_min": 100},
}


@dataclass(frozen=True)
class ProtocolConfig:
    """Every knob of the evaluation protocol; defaults are ML-1M's."""

    n_candidates: int = 10  # target + n_candidates - 1 sampled negatives (the paper: 1 + 9; 20 also used)
    seed: int = 0  # drives user sampling and candidate sampling
    sparse_min: int = 20  # sparse: sparse_min <= total interactions <= sparse_max
    sparse_max: int = 50
    dense_min: int = 200  # dense: total interactions >= dense_min
    n_eval_users_per_group: int = 100  # each eval user gives one task: its test target
    n_valid_users_per_group: int = 50  # each valid user gives one task: its validation target
    n_train_users_per_group: int = 200  # each train user gives one task: last training item
    prompt_history_len: int = 10  # history items the agent's prompt shows (tools fetch more)

    def __post_init__(self) -> None:
        if self.n_candidates < 2:
            raise ValueError(f"n_candidates must be >= 2, got {self.n_candidates}")
        if not 0 <= self.sparse_min <= self.sparse_max < self.dense_min:
            raise ValueError(
                "need 0 <= sparse_min <= sparse_max < dense_min, got "
                f"{self.sparse_min}, {self.sparse_max}, {self.dense_min}"
            )
        for name in ("n_eval_users_per_group", "n_valid_users_per_group",
                     "n_train_users_per_group", "prompt_history_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, int]:
        """Plain values, e.g. for MLflow params or a Dagster metadata entry."""
        return asdict(self)

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: int) -> ProtocolConfig:
        return protocol_config_for(dataset, **overrides)


def protocol_config_for(dataset: str, **overrides: int) -> ProtocolConfig:
    """The default config for ``dataset`` (see the module table), with ``overrides`` applied."""
    if dataset not in DATASET_DEFAULTS:
        known = ", ".join(sorted(DATASET_DEFAULTS))
        raise ValueError(f"no protocol defaults for dataset {dataset!r}; known: {known}")
    return replace(ProtocolConfig(**DATASET_DEFAULTS[dataset]), **overrides)
