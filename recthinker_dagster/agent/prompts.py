"""The agent's conversation: system prompt, first user message and the loop's nudges.

A conversation is a list of OpenAI-style chat messages::

    system     SYSTEM_PROMPT (Analyze-Plan-Act rules and the answer format)
    user       the user's recent history and the labelled candidates
    assistant  "Analysis: ... Plan: ..." then <tool_call>{...}</tool_call> (one or more)
    tool       one message per call, in call order
    ...
    assistant  "Analysis: ... Plan: ..." then <answer>C3, C1, C7, ...</answer>

Tool schemas are not written here: chat templates render them into the system turn
(``apply_chat_template(..., tools=...)``) and HTTP servers receive them as ``tools``.
"""

from __future__ import annotations

from collections.abc import Sequence

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"

SYSTEM_PROMPT = """\
You are RecThinker, a recommendation agent. Rank the candidate items by how likely the user \
is to interact with each one next.

Work in turns. In every turn first write:
Analysis: what you know about the user's preferences and about the candidates, and what is still missing.
Plan: which information you will get next and why, or why you can rank now.
Then act in exactly one of two ways:
1. Call one or more tools, each as <tool_call>{"name": "<tool name>", "arguments": {...}}</tool_call>. \
The results come back in the next message.
2. When you know enough, give the final ranking of ALL candidates by label, best first, and stop: \
<answer>C3, C1, C7, ...</answer>

Rules:
- Refer to candidates by their labels (C1, C2, ...); rank every candidate exactly once.
- Do not call tools and answer in the same turn.
- You have at most {max_turns} turns and {max_tool_calls} tool calls; use them only where they help."""

FINAL_ANSWER_REQUEST = (
    "Your budget of turns and tool calls is used up. Do not call any more tools. Give your final "
    "ranking of all {n} candidates now, best first, as <answer>C.., C.., ...</answer>."
)

NO_ACTION_NUDGE = (
    "Your reply contained neither a tool call nor an answer. Call a tool as "
    '<tool_call>{"name": ..., "arguments": {...}}</tool_call> or give the final ranking as '
    "<answer>C.., C.., ...</answer>."
)


def system_prompt(max_turns: int, max_tool_calls: int, template: str = SYSTEM_PROMPT) -> str:
    """The system prompt with the budgets filled in (plain replacement: the JSON braces stay)."""
    return template.replace("{max_turns}", str(max_turns)).replace("{max_tool_calls}", str(max_tool_calls))


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
) -> list[dict]:
    """``[system, user]``: the start of every conversation."""
    return [
        {"role": "system", "content": system_prompt(max_turns, max_tool_calls, template)},
        {"role": "user", "content": user_prompt(history_lines, candidate_lines, user_id)},
    ]


def final_answer_request(n_candidates: int) -> dict:
    return {"role": "user", "content": FINAL_ANSWER_REQUEST.format(n=n_candidates)}


def no_action_nudge() -> dict:
    return {"role": "user", "content": NO_ACTION_NUDGE}
