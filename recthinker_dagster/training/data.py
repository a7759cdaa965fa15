"""Training data: trajectories as conversational examples, tokenized with assistant-only labels.

Each trajectory is one example (its messages and tool schemas) rendered with the agent's chat
template in its training variant (``agent/backends/chat_template.training_template`` for the
compact tool template, else ``trl.chat_template_utils.get_training_chat_template``), whose ``{% generation %}``
markers cover every assistant turn (its text, its ``<tool_call>`` blocks and ``<|im_end|>``).
Labels are the input ids with everything outside those markers set to -100, so the system
prompt, the tool schemas, the user turn and the tool results are never trained on. This is
exactly what ``SFTConfig(assistant_only_loss=True)`` computes, done before the trainer sees the
data: a ``datasets.Dataset`` of raw messages would merge the ``arguments`` objects of different
tools into one Arrow struct (``get_user_profile`` would be rendered with ``{"item_ids": null}``),
so the trainer gets token ids and labels instead. GRPO splits its rollouts with the same rule.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from recthinker_dagster.agent.trajectory import Trajectory

IGNORE_INDEX = -100


def sft_examples(items: Iterable[Trajectory | Mapping]) -> list[dict]:
    """``{"messages", "tools", "task_id"}`` per trajectory (objects, ``to_dict`` rows or plain
    ``{"messages", "tools"}`` mappings)."""
    examples = []
    for item in items:
        tools: Any  # schemas as a list, or as JSON text in older records
        if isinstance(item, Trajectory):
            messages, tools, task_id = item.messages, item.tools, item.task_id
        else:
            messages, tools, task_id = item["messages"], item.get("tools"), item.get("task_id", "")
        tool_schemas = json.loads(tools) if isinstance(tools, str) else tools
        examples.append({"messages": list(messages), "tools": list(tool_schemas or []), "task_id": task_id})
    return examples


def training_chat_template(tokenizer) -> str:
    """The tokenizer's (tool) template with ``{% generation %}`` markers around assistant turns."""
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
    )

    from recthinker_dagster.agent.backends.chat_template import training_template

    template = training_template(tokenizer.chat_template) or get_training_chat_template(tokenizer) \
        or tokenizer.chat_template
    if not has_generation_markers(template):
        raise ValueError("no training chat template with generation markers for this tokenizer")
    return template


def tokenize_conversation(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None,
                          chat_template: str) -> dict[str, list[int]]:
    """Token ids and labels of one conversation: labels are -100 outside the assistant turns.

    The same call TRL's SFTTrainer makes for ``assistant_only_loss=True`` (``apply_chat_template``
    with ``return_assistant_tokens_mask``), followed by the same label rule."""
    out = tokenizer.apply_chat_template(
        list(messages), tools=list(tools) if tools else None, chat_template=chat_template,
        tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
    )
    ids = list(out["input_ids"])
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, out["assistant_masks"])]
    return {"input_ids": ids, "labels": labels}


def tokenize_examples(tokenizer, examples: Sequence[dict], max_length: int | None,
                      chat_template: str | None = None) -> tuple[list[dict], dict]:
    """Tokenized examples that fit ``max_length`` and have trainable tokens, and counts.

    Longer conversations are dropped, never cut (a cut one would lose its answer)."""
    chat_template = chat_template or training_chat_template(tokenizer)
    rows, too_long, no_labels, lengths = [], 0, 0, []
    for example in examples:
        row = tokenize_conversation(tokenizer, example["messages"], example["tools"], chat_template)
        if max_length is not None and len(row["input_ids"]) > max_length:
            too_long += 1
        elif all(label == IGNORE_INDEX for label in row["labels"]):
            no_labels += 1
        else:
            rows.append(row)
            lengths.append(len(row["input_ids"]))
    stats = {
        "n_examples": len(rows), "n_dropped_too_long": too_long, "n_dropped_no_labels": no_labels,
        "tokens_total": sum(lengths), "tokens_mean": statistics.fmean(lengths) if lengths else 0.0,
        "tokens_max": max(lengths, default=0),
        "trained_tokens_total": sum(sum(label != IGNORE_INDEX for label in r["labels"]) for r in rows),
    }
    return rows, stats


def tokenized_trajectory_file(tokenizer, path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` trajectories of a jsonl file (for example the kept ones,
    ``filtered_trajectories/trajectories.jsonl``), tokenized as ``tokenize_examples`` does."""
    with open(path, encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    rows, _ = tokenize_examples(tokenizer, sft_examples(records[:limit]), None)
    return rows
