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
- When ``max_turns`` turns or the tool budget are used up, or the model answered without a
  single valid label, the model is asked once more for its final answer
  (``finish="forced_answer"``). If that fails too, the ranking comes from the label head
  (``finish="forced_head"``: the conversation plus an assistant turn opened with ``<answer>``,
  one forward pass, labels by their logits; the head's answer is appended as an assistant
  message). Only a backend without a head (HTTP) falls back to the candidates' original order
  (``finish="fallback"``, invalid, reason ``no_answer``): never silently.

Answers (``AgentConfig.answer_mode``, recorded on every trajectory):

- ``generate``: the model writes the ranking. On a backend that constrains answers (the
  transformers backend), every ``<answer>`` it opens decodes as a permutation of the labels,
  so answers are valid by construction. Elsewhere (HTTP) the strict parser reads the answer and
  an incomplete one takes the documented repair (``parser.py``), counted as ``repaired``.
- ``logits``: the ranking head. Once the model opens ``<answer>``, the labels are ordered by
  their log-probabilities at that position (``Trajectory.head_scores``) and that order is the
  answer. With sampled decoding (``temperature > 0``, single-token labels) the first label is
  drawn among the labels and the rest follow in the head's order, so a rollout's answer is a
  sample whose log-prob the learner can score (``AnswerState.start_head``). It needs a backend
  with a head; others are refused up front.

Labels: when the backend can tell (``labels_fit``, local models), a task whose labels are not
single tokens of its tokenizer is relabelled ``C1..CN`` (``agent/labels.py``), with a warning.

The toolbox is duck-typed (:class:`TaskToolbox`): ``schemas()``, ``call(name, arguments) -> result``
with ``.ok``, ``.output``, ``.error_kind``; ``labels`` (label -> item id, candidate order),
``candidate_lines()`` and, optionally, ``use_label_style(style)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from recthinker_dagster.agent import parser as P
from recthinker_dagster.agent import prompts
from recthinker_dagster.agent.backends.base import (
    ANSWER_MODES,
    AnswerSpec,
    Backend,
    Generation,
    SamplingParams,
    constrains_answers,
    has_label_head,
    head_ranking,
    tracks_tokens,
)
from recthinker_dagster.agent.labels import NUMBERED_STYLE, label_style_of
from recthinker_dagster.agent.trajectory import (
    REASON_BACKEND_ERROR,
    REASON_DUPLICATES,
    REASON_EMPTY_ANSWER,
    REASON_FORCED_HEAD,
    REASON_HALLUCINATED,
    REASON_NO_ANSWER,
    REASON_PARTIAL,
    REASON_UNCLOSED,
    AgentTask,
    ToolCallRecord,
    Trajectory,
)
from recthinker_dagster.agent.transcript import TokenTranscript
from recthinker_dagster.metrics import task_metrics

BUDGET_EXHAUSTED = "budget_exhausted"
TOOL_EXCEPTION = "tool_exception"
logger = logging.getLogger(__name__)


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
    answer_mode: str = "generate"  # "generate": the model writes the ranking; "logits": the label head
    constrain_answers: bool = True  # decode answers under the label constraint where the backend can
    exact_tokens: bool = True  # keep conversations as the exact tokens where the backend can (transcript.py)

    def __post_init__(self):
        if self.max_turns < 1 or self.max_tool_calls < 0:
            raise ValueError("max_turns must be >= 1 and max_tool_calls >= 0")
        if self.answer_mode not in ANSWER_MODES:
            raise ValueError(f"answer_mode must be one of {list(ANSWER_MODES)}, got {self.answer_mode!r}")


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
    constrained = config.constrain_answers and constrains_answers(backend)
    if config.answer_mode == "logits" and not (constrained and has_label_head(backend)):
        raise ValueError("answer_mode='logits' needs a backend with a label head (the transformers backend) "
                         "and constrain_answers=True; use answer_mode='generate' with this backend")
    fits = _LabelCheck(backend)
    tokens = backend if config.exact_tokens and tracks_tokens(backend) else None
    episodes = [
        _Episode(task if isinstance(task, AgentTask) else AgentTask.from_mapping(task), toolbox_factory, config, fits,
                 tokens)
        for task in tasks
    ]
    step = 0
    while active := [episode for episode in episodes if not episode.done]:
        if on_step is not None:
            on_step(step, len(active))
        seed = None if config.sampling.seed is None else config.sampling.seed + step
        extra: dict[str, Any] = {"answers": [episode.answer_spec() for episode in active]} if constrained else {}
        if tokens is not None:
            extra["prompt_ids"] = [episode.transcript.ids for episode in active]  # type: ignore[union-attr]
        generations = backend.generate(
            [episode.messages for episode in active],
            [episode.tools for episode in active],
            config.sampling.with_seed(seed),
            **extra,
        )
        if len(generations) != len(active):
            raise RuntimeError(f"backend returned {len(generations)} generations for {len(active)} prompts")
        for episode, generation in zip(active, generations):
            episode.advance(generation)
        _rank_by_head(backend, [episode for episode in active if episode.needs_head])
        step += 1
    backend_name: str = getattr(backend, "name", type(backend).__name__)
    producer = config.producer or backend_name
    return [episode.trajectory(producer) for episode in episodes]


def _rank_by_head(backend: Backend, episodes: list[_Episode]) -> None:
    """The forced head for episodes that never gave a usable answer; without a head, the fallback."""
    if not episodes:
        return
    if not has_label_head(backend):
        for episode in episodes:
            episode.give_up()
        return
    started = time.perf_counter()
    extra = {}
    if all(episode.transcript is not None for episode in episodes):
        extra["prompt_ids"] = [episode.transcript.ids for episode in episodes]  # type: ignore[union-attr]
    scores = backend.rank_labels(  # type: ignore[attr-defined]
        [episode.messages for episode in episodes],
        [episode.tools for episode in episodes],
        [list(episode.labels) for episode in episodes],
        **extra,
    )
    seconds = time.perf_counter() - started  # like a generation: the wall time of the batch
    for episode, label_scores in zip(episodes, scores):
        episode.latency += seconds
        episode.accept_head(label_scores)


class _LabelCheck:
    """Whether a task's labels are single tokens of the backend's tokenizer (cached per label set;
    always true for backends that cannot tell); warns once per run about a fallback."""

    def __init__(self, backend: Backend):
        self.check = getattr(backend, "labels_fit", None)
        self.known: dict[tuple[str, ...], bool] = {}
        self.warned = False

    def __call__(self, labels: tuple[str, ...]) -> bool:
        if self.check is None or label_style_of(labels) == NUMBERED_STYLE:
            return True
        if labels not in self.known:
            self.known[labels] = bool(self.check(labels))
        if not self.known[labels] and not self.warned:
            self.warned = True
            logger.warning("labels %s are not single tokens of the backend's tokenizer: falling back to "
                           "C1..CN labels", ", ".join(labels))
        return self.known[labels]


class _Episode:
    """The state of one task's conversation."""

    def __init__(self, task: AgentTask, toolbox_factory: Callable[[AgentTask], TaskToolbox], config: AgentConfig,
                 labels_fit: Callable[[tuple[str, ...]], bool] | None = None, tokens: Any = None):
        self.task, self.config = task, config
        self.toolbox = toolbox_factory(task)
        if labels_fit is not None and not labels_fit(tuple(self.toolbox.labels)) \
                and hasattr(self.toolbox, "use_label_style"):
            self.toolbox.use_label_style(NUMBERED_STYLE)
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
            labels=list(self.labels),
        )
        self.records: list[ToolCallRecord] = []
        self.turns = self.tool_calls_used = self.parse_issues = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.latency = 0.0
        self.forced = self.done = self.needs_head = False
        self.answer: P.Answer | None = None
        self.head_scores: dict[str, float] | None = None
        self.finish = "fallback"
        self.reasons: list[str] = []
        # the exact tokens, kept with a backend that tracks them (``tokens``)
        self.tokens = tokens
        self.transcript = TokenTranscript(tokens.encode(self.messages, self.tools)) if tokens is not None else None

    def answer_spec(self) -> AnswerSpec:
        return AnswerSpec(tuple(self.labels), self.config.answer_mode)

    # -- one step ----------------------------------------------------------------------------

    def advance(self, generation: Generation) -> None:
        turn_index = len(self.messages)  # where this turn's assistant message goes
        self._advance(generation)
        if self.transcript is not None and generation.finish_reason != "error":
            self._record_tokens(generation, turn_index)

    def _record_tokens(self, generation: Generation, turn_index: int) -> None:
        """The sampled ids, then (unless the task ended) the template's tokens up to the next prompt."""
        transcript = self.transcript
        assert transcript is not None and generation.token_ids is not None
        if generation.prompt_ids is not None:
            transcript.check_prompt(generation.prompt_ids)
        transcript.add_sampled(generation.token_ids, generation.logprobs)
        if not self.done:
            stopped = generation.finish_reason == "stop"
            transcript.add_environment(self.tokens.environment_ids(self.messages, self.tools, turn_index, stopped))

    def _advance(self, generation: Generation) -> None:
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

        if parsed.answer is not None and not parsed.answer.empty:
            self.messages.append({"role": "assistant", "content": parsed.text.strip()})
            self.head_scores = generation.head_scores
            self._accept(parsed.answer)
            return
        if parsed.answer is not None:  # an answer without a single valid label: ask once more
            self.reasons.append(REASON_EMPTY_ANSWER)
        if self.forced:  # the last chance went unused: calls are not run any more; the head ranks (run_agent)
            self.messages.append({"role": "assistant", "content": parsed.text.strip()})
            self.needs_head = True
            return
        if parsed.tool_calls and parsed.answer is None:
            self._act(parsed)
        else:
            self.messages.append({"role": "assistant", "content": parsed.text.strip()})
        if parsed.answer is not None or self.turns >= self.config.max_turns \
                or self.tool_calls_used >= self.config.max_tool_calls:
            self.forced = True
            self.messages.append(prompts.final_answer_request(list(self.labels)))
        elif not parsed.tool_calls:
            self.messages.append(prompts.no_action_nudge(list(self.labels)))

    def accept_head(self, scores: Mapping[str, float]) -> None:
        """The forced head's ranking (after the final request went unanswered), as an assistant turn."""
        order = head_ranking(dict(scores), list(self.labels))
        content = prompts.answer_block(order)
        self.messages.append({"role": "assistant", "content": content})
        if self.transcript is not None:  # the policy's head chose it; no token was sampled
            self.transcript.add_sampled(self.tokens.head_answer_ids(list(self.labels), order))
        answer, _ = P.parse_answer(", ".join(order), self.labels)
        self.head_scores = {label: round(float(scores[label]), 4) for label in self.labels}
        self.answer, self.finish = answer, "forced_head"
        self.reasons.append(REASON_FORCED_HEAD)
        self.needs_head, self.done = False, True

    def give_up(self) -> None:
        """No answer and no head: the candidates' original order, marked invalid."""
        self.reasons.append(REASON_NO_ANSWER)
        self.needs_head, self.done = False, True

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
            answer_mode=self.config.answer_mode,
            repaired=self.answer is not None and self.answer.repaired,
            head_scores=None if self.head_scores is None else {k: round(v, 4) for k, v in self.head_scores.items()},
            transcript=self.transcript,
            metrics=task_metrics(ranking, task.target_item_id),
            n_turns=self.turns,
            n_tool_calls=sum(1 for r in self.records if r.error_kind != BUDGET_EXHAUSTED),
            n_invalid_calls=sum(1 for r in self.records if not r.ok and r.error_kind != BUDGET_EXHAUSTED),
            n_parse_issues=self.parse_issues,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            latency_s=round(self.latency, 4),
        )
