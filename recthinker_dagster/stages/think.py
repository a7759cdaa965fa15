"""Think before recommend (RecZero, RecOne): the tool-free recipes, trained beside the agent.

    build_think_trajectories_stage(settings, teacher_settings, layout, "ml-1m")   # assets/think_trajectories/ml-1m
    build_recone_sft_stage(settings, layout, datasets)     # assets/recone_sft_model: SFT on the thinking teacher
    build_think_rl_stage(settings, layout, datasets, RECONE)   # assets/recone_model: GRPO on it
    build_think_rl_stage(settings, layout, datasets, RECZERO)  # assets/reczero_model: GRPO from the base model

The stages are the agent's own (``stages/trajectories.py``, ``stages/sft.py``, ``stages/rl.py``)
with other inputs and outputs: the thinking teacher's trajectories (``agent/teachers/thinking.py``)
instead of the investigator's, the ``think`` conversation in the recipes and the validation
(``agent/think.py``). The SFT set keeps, per train task, the best sample whose target ranks within
``keep_top_k`` and whose reasoning writes every section.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import replace

from recthinker_dagster.agent.think import SECTIONS, first_reply, sections_written
from recthinker_dagster.artifacts import ArtifactLayout, asset_label, read_published_jsonl, tracked_md5
from recthinker_dagster.settings import RLSettings, SFTSettings, TeacherSettings, ThinkSettings, ValidationSettings
from recthinker_dagster.stages.rl import RLModelResult, build_rl_model_stage
from recthinker_dagster.stages.sft import SFTModelResult, build_sft_model_stage, file_md5
from recthinker_dagster.stages.trajectories import THINK_ASSET, TrajectoriesResult, build_teacher_trajectories_stage

RECONE_SFT = "recone_sft_model"
RECONE = "recone_model"
RECZERO = "reczero_model"
START = {RECONE: RECONE_SFT, RECZERO: None}  # the policy each RL asset starts from (None: the base model)


def think_validation(settings: ThinkSettings) -> ValidationSettings:
    """The section's validation slice, always in the think conversation."""
    return replace(settings.validation, conversation="think")


def build_think_trajectories_stage(settings: ThinkSettings, teacher: TeacherSettings, layout: ArtifactLayout,
                                   dataset: str, log: Callable[[str], None] = print) -> TrajectoriesResult:
    """The thinking teacher's trajectories on the train tasks of ``dataset`` (the teacher section's
    batch size, seed and prompt history; this section's samples per task)."""
    thinking = replace(teacher, teacher="thinking", samples_per_task=settings.samples_per_task)
    return build_teacher_trajectories_stage(thinking, layout, dataset, log, asset=THINK_ASSET)


def think_sft_records(layout: ArtifactLayout, datasets: Sequence[str], keep_top_k: int) -> tuple[list[dict], str]:
    """Per train task, the best thinking-teacher sample (NDCG@10; the first on ties) that answered
    validly, wrote every reasoning section and ranked the target within ``keep_top_k``; and the
    version of the sources (an md5 of their DVC md5s or contents)."""
    kept: list[dict] = []
    versions: list[str] = []
    for dataset in datasets:
        path = layout.asset_dir(THINK_ASSET, dataset) / "trajectories.jsonl"
        records = read_published_jsonl(path, asset_label(THINK_ASSET, dataset))
        versions.append(tracked_md5(path.parent) or file_md5(path))
        best: dict[str, dict] = {}
        for record in records:
            if not usable(record, keep_top_k):
                continue
            current = best.get(record["task_id"])
            if current is None or record["metrics"]["ndcg@10"] > current["metrics"]["ndcg@10"]:
                best[record["task_id"]] = record
        kept.extend(record | {"dataset": dataset} for record in best.values())
    return kept, hashlib.md5(json.dumps([versions, keep_top_k]).encode()).hexdigest()


def usable(record: dict, keep_top_k: int) -> bool:
    """A valid answer of the model's own, with every reasoning section, and the target within the top k."""
    reply = first_reply(record["messages"])
    ranking = record.get("final_ranking") or []
    target = record.get("target_item_id")
    within = target in ranking[:keep_top_k]
    return bool(record.get("valid")) and record.get("finish") == "answer" and within \
        and len(sections_written(reply)) == len(SECTIONS)


def build_recone_sft_stage(settings: ThinkSettings, layout: ArtifactLayout, datasets: Sequence[str],
                           log: Callable[[str], None] = print) -> SFTModelResult:
    """RecOne's cold start: SFT on the kept thinking-teacher samples, validated in the think conversation."""
    records, version = think_sft_records(layout, datasets, settings.keep_top_k)
    if not records:
        raise ValueError(f"no thinking-teacher sample ranked its target within the top {settings.keep_top_k} with "
                         "every reasoning section: nothing to train RecOne on (raise think.keep_top_k, or add samples)")
    log(f"RecOne SFT set: {len(records)} thinking-teacher samples (best per task, target within the top "
        f"{settings.keep_top_k})")
    # RecZero's validation scores the base model in the think conversation already
    sft = SFTSettings(recipe=settings.sft_recipe, max_steps=settings.sft_max_steps, resume=settings.resume,
                      validation=think_validation(settings), validate_base=False)
    return build_sft_model_stage(sft, layout, datasets, log, asset=RECONE_SFT, data=(records, version))


def build_think_rl_stage(settings: ThinkSettings, layout: ArtifactLayout, datasets: Sequence[str], asset: str,
                         log: Callable[[str], None] = print) -> RLModelResult:
    """RecZero (``asset=RECZERO``: GRPO from the base model) or RecOne (``RECONE``: GRPO on the
    RecOne SFT policy), on think rollouts."""
    if asset not in START:
        raise ValueError(f"unknown think policy {asset!r}; known: {sorted(START)}")
    recipe = settings.recone_recipe if asset == RECONE else settings.reczero_recipe
    rl = RLSettings(recipe=recipe, max_steps=settings.rl_max_steps, resume=settings.resume,
                    validation=think_validation(settings))
    return build_rl_model_stage(rl, layout, datasets, log, asset=asset, start=START[asset])
