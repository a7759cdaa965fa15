"""The thinking teacher: the scripted investigator's ranking, written as think-before-recommend
reasoning for the no-tool conversation (``agent/think.py``), the RecOne recipe's SFT data.

    trajectories = ThinkingTeacher().run(tasks, toolboxes, sample_index=0, seed=2026)

Per task, one turn: the teacher takes the weights the investigator would ask ``score_candidates``
for (the user's history regime, the tuned table; perturbed for samples k > 0), ranks the
candidates by their fused score, and explains the head of that order from what the prompt
shows: the categories of the recent items, the leading candidates' titles and categories, and
which of them share the user's categories. A leader that shares none is credited to "users with
similar histories": the collaborative signals, which the student cannot see but must learn to
stand in for. The ranking is the tool-using teacher's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

from recthinker_dagster.agent import prompts
from recthinker_dagster.agent.loop import AgentConfig
from recthinker_dagster.agent.teachers import fusion
from recthinker_dagster.agent.teachers.scripted import Investigator, InvestigatorSettings, ScriptedTeacher
from recthinker_dagster.agent.think import section, think_config, without_tools
from recthinker_dagster.agent.trajectory import AgentTask, Trajectory

THINKER = "scripted-thinker-v1"
LEADERS = 3  # candidates the reasoning discusses


class Thinker(Investigator):
    """One task's think-before-recommend turn (see the module docstring)."""

    def next_turn(self, messages: list[dict]) -> str:
        self.turn += 1
        weights = self._weights(fusion.regime(self.box.profile()["n_items"]))  # as the investigator reads it
        order = self._fused_labels(weights)
        taste = self._recent_categories()
        leaders = order[:LEADERS]
        return "\n".join([
            section("user", self._user(taste)),
            section("candidates", "; ".join(self._describe(label) for label in leaders) + "."),
            section("match", self._match(leaders, taste)),
            prompts.answer_block(order),
        ])

    def _recent_categories(self) -> Counter:
        recent = self.task.history_item_ids[-len(self.task.history_lines):] if self.task.history_lines else []
        return Counter(c for item in recent for c in self.box.indexes.catalog.categories_of(item))

    def _user(self, taste: Counter) -> str:
        shown = len(self.task.history_lines)
        if not shown:
            return "No history is shown, so only what most users choose can guide the ranking."
        top = ", ".join(f"{c} ({n} of {shown})" for c, n in taste.most_common(3))
        return f"The {shown} recent items are mostly {top}." if top else f"The {shown} recent items have no categories."

    def _describe(self, label: str) -> str:
        catalog = self.box.indexes.catalog
        item = self.box.labels[label]
        categories = ", ".join(catalog.categories_of(item)[:3])
        return f"{label} is {catalog.title(item)}" + (f" ({categories})" if categories else "")

    def _match(self, leaders: Sequence[str], taste: Counter) -> str:
        catalog = self.box.indexes.catalog
        favourite = [c for c, _ in taste.most_common(3)]
        reasons = []
        for label in leaders:
            shared = [c for c in favourite if c in catalog.categories_of(self.box.labels[label])]
            reasons.append(f"{label} shares {' and '.join(shared)} with the recent items" if shared
                           else f"{label} is chosen by users with similar histories")
        return "; ".join(reasons) + f". So {', '.join(leaders)} lead."


class ThinkingTeacher(ScriptedTeacher):
    """``ThinkingTeacher().run(tasks, toolbox_factory)``: one think turn per task (producer
    ``scripted-thinker-v1``), through ``run_agent`` without tools."""

    name = THINKER

    def __init__(self, config: AgentConfig | None = None, settings: InvestigatorSettings | None = None):
        base = config or think_config()
        super().__init__(replace(base, max_turns=1, max_tool_calls=0, system_prompt=think_config().system_prompt),
                         settings)
        self.policy = Thinker

    def run(self, tasks: Iterable[AgentTask | Mapping], toolbox_factory: Callable, config: AgentConfig | None = None,
            *, sample_index: int = 0, seed: int = 0) -> list[Trajectory]:
        return super().run(tasks, without_tools(toolbox_factory), config, sample_index=sample_index, seed=seed)
