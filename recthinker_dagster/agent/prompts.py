"""The agent's conversation: system prompt, first user message and the loop's nudges.

A conversation is a list of OpenAI-style chat messages::

    system     SYSTEM_PROMPT (Analyze-Plan-Act rules and the answer format)
    user       the user's recent history and the labelled candidates
    assistant  "Analysis: ... Plan: ..." then <tool_call>{...}</tool_call> (one or more)
    tool       one message per call, in call order
    ...
    assistant  "Analysis: ... Plan: ..." then <answer>C, A, G, ...</answer>

Label examples follow the task's labels (``agent/labels.py``): ``C, A, G`` with letter labels,
``C3, C1, C7`` with numbered ones. Tool schemas are not written here: chat templates render them into the system turn
(``apply_chat_template(..., tools=...)``) and HTTP servers receive them as ``tools``.
"""

from __future__ import annotations

from collections.abc import Sequence

from recthinker_dagster.agent.labels import DEFAULT_LABEL_STYLE, candidate_labels

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def answer_block(order: Sequence[str]) -> str:
    """The answer as the model writes it: ``<answer>B, A, C</answer>``."""
    return f"{ANSWER_OPEN}{', '.join(order)}{ANSWER_CLOSE}"


SYSTEM_PROMPT = """\
You are RecThinker, a recommendation agent. Rank the candidates by how likely the user is to \
interact with each one next.
In every turn write "Analysis:" (what you know, what is missing) and "Plan:" (what to get next, \
or why you can rank now). Then either call tools, each as \
<tool_call>{"name": ..., "arguments": {...}}</tool_call>, or give the final ranking of all \
candidates by label ({label_list}), best first: <answer>{answer_example}</answer>
You have at most {max_turns} turns and {max_tool_calls} tool calls."""

FINAL_ANSWER_REQUEST = (
    "Your budget of turns and tool calls is used up. Do not call any more tools. Give your final "
    "ranking of all {n} candidates now, best first, as <answer>{answer_example}</answer>."
)

NO_ACTION_NUDGE = (
    "Your reply contained neither a tool call nor an answer. Call a tool as "
    '<tool_call>{"name": ..., "arguments": {...}}</tool_call> or give the final ranking as '
    "<answer>{answer_example}</answer>."
)


def answer_example(labels: Sequence[str] | None = None) -> str:
    """``C, A, G, ...``: three of the labels in a shuffled order (``C3, C1, C7, ...`` when numbered)."""
    labels = list(labels) if labels else candidate_labels(10, DEFAULT_LABEL_STYLE)
    picks = [labels[k] for k in (2, 0, 6) if k < len(labels)] or labels
    return ", ".join(picks) + ", ..."


def label_list(labels: Sequence[str] | None = None) -> str:
    """``A, B, ...``: how the rules name the labels."""
    labels = list(labels) if labels else candidate_labels(10, DEFAULT_LABEL_STYLE)
    return ", ".join(labels[:2]) + ", ..."


def system_prompt(max_turns: int, max_tool_calls: int, template: str = SYSTEM_PROMPT,
                  labels: Sequence[str] | None = None) -> str:
    """The system prompt with the budgets and label examples filled in (plain replacement: the
    JSON braces stay)."""
    values = {"max_turns": max_turns, "max_tool_calls": max_tool_calls,
              "answer_example": answer_example(labels), "label_list": label_list(labels)}
    for key, value in values.items():
        template = template.replace("{" + key + "}", str(value))
    return template


def user_prompt(history_lines: Sequence[str], candidate_lines: Sequence[str], user_id: str | None = None) -> str:
    """The first user message: recent history (oldest first) and the labelled candidates."""
    who = f"User {user_id}" if user_id is not None else "The user"
    if history_lines:
        history = "\n".join(f"{i}. {line}" for i, line in enumerate(history_lines, start=1))
        history_block = f"{who}'s most recent interactions, oldest first:\n{history}"
    else:
        history_block = f"{who} has no recorded interactions."
    candidates = "\n".join(candidate_lines)
    return (
        f"{history_block}\n\n"
        f"Candidates ({len(candidate_lines)}):\n{candidates}\n\n"
        f"Rank all {len(candidate_lines)} candidates for this user."
    )


def initial_messages(
    history_lines: Sequence[str],
    candidate_lines: Sequence[str],
    *,
    user_id: str | None = None,
    max_turns: int,
    max_tool_calls: int,
    template: str = SYSTEM_PROMPT,
    labels: Sequence[str] | None = None,
) -> list[dict]:
    """``[system, user]``: the start of every conversation (``labels``: the candidates' labels)."""
    return [
        {"role": "system", "content": system_prompt(max_turns, max_tool_calls, template, labels)},
        {"role": "user", "content": user_prompt(history_lines, candidate_lines, user_id)},
    ]


def final_answer_request(labels: Sequence[str]) -> dict:
    """The one request for the final answer, once the budgets are used up."""
    text = FINAL_ANSWER_REQUEST.replace("{n}", str(len(labels))).replace("{answer_example}", answer_example(labels))
    return {"role": "user", "content": text}


def no_action_nudge(labels: Sequence[str] | None = None) -> dict:
    return {"role": "user", "content": NO_ACTION_NUDGE.replace("{answer_example}", answer_example(labels))}
