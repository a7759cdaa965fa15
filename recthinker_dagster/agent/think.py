"""Think before recommend: the no-tool conversation of the RecZero and RecOne recipes.

    config = think_config(SamplingParams(max_new_tokens=256), producer="reczero")
    trajectories = run_agent(tasks, backend, without_tools(toolbox_factory), config)

One assistant turn, no tools. The model reads the same first user message as the agent (the
recent history and the labelled candidates) and writes three short tagged sections, then the
answer::

    <user>what the history says the user likes</user>
    <candidates>what sets the leading candidates apart</candidates>
    <match>which candidates fit the user, and why</match>
    <answer>C, A, G, ...</answer>

Answers are constrained as in the agent (a local backend decodes every ``<answer>`` as a
permutation of the labels). A turn without an answer gets the loop's one final-answer request,
so ``max_turns`` is 1: the reasoning turn, then at most the forced answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from recthinker_dagster.agent.backends.base import SamplingParams
from recthinker_dagster.agent.loop import AgentConfig

SECTIONS = ("user", "candidates", "match")
THINK_PROMPT = """\
You are RecThinker. Rank the candidates by how likely the user is to interact with each one next.
Think before you recommend, in three short sections: <user>what the history says the user \
likes</user> <candidates>what sets the leading candidates apart</candidates> <match>which \
candidates fit the user best, and why</match>
Then give the ranking of all candidates by label ({label_list}), best first: <answer>{answer_example}</answer>"""


def think_config(sampling: SamplingParams | None = None, *, producer: str | None = None,
                 answer_mode: str = "generate") -> AgentConfig:
    """The agent loop's budgets for the think conversation: one turn (plus the forced answer), no tools."""
    return AgentConfig(max_turns=1, max_tool_calls=0, sampling=sampling or SamplingParams(), producer=producer,
                       system_prompt=THINK_PROMPT, answer_mode=answer_mode)


def sections_written(text: str) -> tuple[str, ...]:
    """The sections of ``SECTIONS`` that ``text`` writes, each opened and closed once, in order
    and with something inside (``("user", "candidates", "match")`` for a complete reasoning)."""
    found, position = [], 0
    for name in SECTIONS:
        match = re.compile(rf"<{name}>(.+?)</{name}>", re.DOTALL).search(text, position)
        if match is None or not match.group(1).strip():
            break
        found.append(name)
        position = match.end()
    return tuple(found)


def first_reply(messages) -> str:
    """The text of a conversation's first assistant turn (the reasoning turn of a think conversation)."""
    return next((str(m.get("content") or "") for m in messages if m.get("role") == "assistant"), "")


def section(name: str, text: str) -> str:
    return f"<{name}>{text}</{name}>"


class WithoutTools:
    """A toolbox that offers no tools: the model sees only the history and the candidates."""

    def __init__(self, toolbox):
        self._toolbox = toolbox

    def __getattr__(self, name):
        return getattr(self._toolbox, name)

    def schemas(self) -> list:
        return []


def without_tools(toolbox_factory: Callable) -> Callable:
    """A toolbox factory whose toolboxes offer no tools (zero-shot and think conversations)."""
    return lambda task: WithoutTools(toolbox_factory(task))
