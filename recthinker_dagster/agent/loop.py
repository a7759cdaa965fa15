"""The Analyze-Plan-Act loop over many tasks at once.

    trajectories = run_agent(tasks, backend, toolbox_factory, AgentConfig(max_turns=6))

Each step sends every unfinished conversation to the backend as one batch, parses the
replies, runs the tool calls, appends the results as ``tool`` messages and goes on until each
task has answered. Rules per task:

- A turn with an answer ends the task (calls in the same turn are not executed; see parser).
- Each ``<tool_call>`` block consumes one unit of ``max_tool_calls``, valid or not. Invalid
  calls (malformed JSON, unknown tool, bad arguments) are not run; the model gets an
  ``Error: ...`` observation instead and can recover. Calls beyond the budget are refused.
- A turn with neither calls nor an answer gets a nudge message.
- When ``max_turns`` turns or the tool budget are used up, the model is asked once more for
  its final answer (``finish="forced_answer"``). If that fails too, the ranking falls back to
  the candidates' original order (``finish="fallback"``, invalid).

The toolbox is duck-typed (:class:`TaskToolbox`): ``schemas()``, ``call(name, arguments) -> result``
with ``.ok``, ``.output``, ``.error_kind``; ``labels`` (label -> item id, candidate order) and
``candidate_lines()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from recthinker_dagster.agent import parser as P
from recthinker_dagster.agent import prompts
from recthinker_dagster.agent.backends.base import Backend, Generation, SamplingParams
from recthinker_dagster.agent.trajectory import (
    REASON_BACKEND_ERROR,
    REASON_DUPLICATES,
    REASON_EMPTY_ANSWER,
    REASON_HALLUCINATED,
    REASON_NO_ANSWER,
    REASON_PARTIAL,
    REASON_UNCLOSED,
    AgentTask,
    ToolCallRecord,
    Trajectory,
)
from recthinker_dagster.metrics import task_metrics

BUDGET_EXHAUSTED = "budget_exhausted"
TOOL_EXCEPTION = "tool_exception"


class TaskToolbox(Protocol):
    """What the loop needs from one task's tools (``tools.Toolbox`` is one)."""

    @property
    def labels(self) -> Mapping[str, str]: ...

    def schemas(self) -> list[dict]: ...

    def candidate_lines(self) -> list[str]: ...

    def call(self, name: str, arguments: dict) -> Any: ...


@dataclass
class AgentConfig:
    max_turns: int = 6  # assistant turns before the final answer is demanded
    max_tool_calls: int = 8  # tool calls per task, invalid ones included
    max_observation_chars: int = 2000  # longer tool outputs are cut (keeps prompts bounded)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    producer: str | None = None  # recorded on trajectories; defaults to the backend's name
    system_prompt: str = prompts.SYSTEM_PROMPT

    def __post_init__(self):
        if self.max_turns < 1 or self.max_tool_calls < 0:
            raise ValueError("max_turns must be >= 1 and max_tool_calls >= 0")


def run_agent(
    tasks: Iterable[AgentTask | Mapping],
    backend: Backend,
    toolbox_factory: Callable[[AgentTask], TaskToolbox],
    config: AgentConfig | None = None,
    *,
    on_step: Callable[[int, int], None] | None = None,
) -> list[Trajectory]:
    """Run every task to a final ranking; one trajectory per task, in input order."""
    config = config or AgentConfig()
    episodes = [
        _Episode(task if isinstance(task, AgentTask) else AgentTask.from_mapping(task), toolbox_factory, config)
        for task in tasks
    ]
    step = 0
    while active := [episode for episode in episodes if not episode.done]:
        if on_step is not None:
            on_step(step, len(active))
        seed = None if config.sampling.seed is None else config.sampling.seed + step
        generations = backend.generate(
            [episode.messages for episode in active],
            [episode.tools for episode in active],
            config.sampling.with_seed(seed),
        )
        if len(generations) != len(active):
            raise RuntimeError(f"backend returned {len(generations)} generations for {len(active)} prompts")
        for episode, generation in zip(active, generations):
            episode.advance(generation)
        step += 1
    backend_name: str = getattr(backend, "name", type(backend).__name__)
    producer = config.producer or backend_name
    return [episode.trajectory(producer) for episode in episodes]


class _Episode:
    """The state of one task's conversation."""

    def __init__(self, task: AgentTask, toolbox_factory: Callable[[AgentTask], TaskToolbox], config: AgentConfig):
        self.task, self.config = task, config
        self.toolbox = toolbox_factory(task)
        self.labels: dict[str, str] = dict(self.toolbox.labels)
        self.tools: list[dict] = list(self.toolbox.schemas())
        self.tool_names = {schema["function"]["name"] for schema in self.tools}
        self.messages = prompts.initial_messages(
            task.history_lines,
            self.toolbox.candidate_lines(),
            user_id=task.user_id,
            max_turns=config.max_turns,
            max_tool_calls=config.max_tool_calls,
            template=config.system_prompt,
        )
        self.records: list[ToolCallRecord] = []
        self.turns = self.tool_calls_used = self.parse_issues = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.latency = 0.0
        self.forced = self.done = False
        self.answer: P.Answer | None = None
        self.finish = "fallback"
        self.reasons: list[str] = []

    # -- one step ----------------------------------------------------------------------------

    def advance(self, generation: Generation) -> None:
        self.turns += 1
        self.prompt_tokens += generation.prompt_tokens
        self.completion_tokens += generation.completion_tokens
        self.latency += generation.seconds
        if generation.finish_reason == "error":
            self.reasons.append(f"{REASON_BACKEND_ERROR}: {generation.error or 'unknown'}")
            self.done = True
            return

        parsed = P.parse_turn(generation.text, self.labels, self.tool_names, generation.finish_reason)
        self.parse_issues += len(parsed.issues)

        if parsed.answer is not None:
            self.messages.append({"role": "assistant", "content": parsed.text.strip()})
            self._accept(parsed.answer)
            return
        if self.forced:  # the last chance went unused: calls are not run any more
            self.messages.append({"role": "assistant", "content": parsed.text.strip()})
            self.reasons.append(REASON_NO_ANSWER)
            self.done = True
            return
        if parsed.tool_calls:
            self._act(parsed)
        else:
            self.messages.append({"role": "assistant", "content": parsed.text.strip()})
        if self.turns >= self.config.max_turns or self.tool_calls_used >= self.config.max_tool_calls:
            self.forced = True
            self.messages.append(prompts.final_answer_request(len(self.labels)))
        elif not parsed.tool_calls:
            self.messages.append(prompts.no_action_nudge())

    def _act(self, parsed: P.ParsedTurn) -> None:
        """Append the assistant turn with its calls, then one tool message per call."""
        structured = [call for call in parsed.tool_calls if call.structured]
        ids = [f"call_{self.turns}_{k}" for k in range(len(structured))]
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        message["tool_calls"] = [
            {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call_id, call in zip(ids, structured)
        ]
        self.messages.append(message)
        # Structured calls first (so wire formats can pair them by id), then unparseable blocks.
        ordered: list[tuple[P.ToolCall, str | None]] = [(call, call_id) for call, call_id in zip(structured, ids)]
        ordered += [(call, None) for call in parsed.tool_calls if not call.structured]
        for call, call_id in ordered:
            output, ok, error_kind = self._execute(call)
            tool_message = {"role": "tool", "name": call.name or "invalid_tool_call", "content": output}
            if call_id is not None:
                tool_message["tool_call_id"] = call_id
            self.messages.append(tool_message)
            self.records.append(ToolCallRecord(
                turn=self.turns, name=call.name, arguments=call.arguments, ok=ok,
                output_chars=len(output), error_kind=error_kind,
            ))

    def _execute(self, call: P.ToolCall) -> tuple[str, bool, str | None]:
        if self.tool_calls_used >= self.config.max_tool_calls:
            return "Error: the tool-call budget is used up; give your final answer.", False, BUDGET_EXHAUSTED
        self.tool_calls_used += 1
        if not call.ok:
            return f"Error: {call.error} (tool call: {call.raw[:200]})", False, call.error_kind
        assert call.name is not None and call.arguments is not None  # a valid call is structured
        started = time.perf_counter()
        try:
            result = self.toolbox.call(call.name, call.arguments)
            output, ok, error_kind = str(result.output), bool(result.ok), getattr(result, "error_kind", None)
        except Exception as error:  # noqa: BLE001 - a tool must never end the episode
            output, ok, error_kind = f"Error: the tool failed: {type(error).__name__}: {error}", False, TOOL_EXCEPTION
        self.latency += time.perf_counter() - started
        limit = self.config.max_observation_chars
        if limit and len(output) > limit:
            output = output[:limit] + f"\n... [cut: {len(output) - limit} more characters]"
        return output, ok, (error_kind or "tool_error") if not ok else None

    def _accept(self, answer: P.Answer) -> None:
        self.done = True
        self.finish = "forced_answer" if self.forced else "answer"
        if answer.empty:
            self.reasons.append(REASON_EMPTY_ANSWER)
            self.finish = "fallback"
            return
        self.answer = answer
        if answer.missing:
            self.reasons.append(f"{REASON_PARTIAL}:{len(answer.missing)}")
        if answer.duplicates:
            self.reasons.append(f"{REASON_DUPLICATES}:{len(answer.duplicates)}")
        if answer.unknown:
            self.reasons.append(f"{REASON_HALLUCINATED}:{','.join(answer.unknown)}")
        if not answer.closed:
            self.reasons.append(REASON_UNCLOSED)

    # -- the record ----------------------------------------------------------------------------

    def trajectory(self, producer: str) -> Trajectory:
        if self.answer is not None:
            labels = self.answer.ranking_labels
        else:
            labels = list(self.labels)
        ranking = [self.labels[label] for label in labels]
        task = self.task
        return Trajectory(
            task_id=task.task_id,
            user_id=task.user_id,
            group=task.group,
            split=task.split,
            dataset=task.dataset,
            producer=producer,
            messages=self.messages,
            tools=self.tools,
            tool_calls=self.records,
            target_item_id=task.target_item_id,
            final_ranking=ranking,
            final_labels=labels,
            valid=self.answer is not None and self.answer.complete,
            reasons=self.reasons,
            finish=self.finish if self.answer is not None else "fallback",
            metrics=task_metrics(ranking, task.target_item_id),
            n_turns=self.turns,
            n_tool_calls=sum(1 for r in self.records if r.error_kind != BUDGET_EXHAUSTED),
            n_invalid_calls=sum(1 for r in self.records if not r.ok and r.error_kind != BUDGET_EXHAUSTED),
            n_parse_issues=self.parse_issues,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            latency_s=round(self.latency, 4),
        )
