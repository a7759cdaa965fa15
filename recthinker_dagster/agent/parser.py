"""Parse one assistant turn into reasoning, tool calls, a final ranking and the problems found.

``parse_turn`` never raises on model text. Its rules:

Tool calls
    Every ``<tool_call>...</tool_call>`` block holds a JSON object
    ``{"name": str, "arguments": object}`` (Qwen2.5 / TRL format). Accepted variants: several
    objects in one block, a Markdown code fence around the JSON, ``arguments`` as a JSON *string*
    that decodes to an object (OpenAI wire format), ``arguments`` missing (means ``{}``).
    Problems, one per call: ``malformed_json``, ``missing_name``, ``arguments_not_object``,
    ``unknown_tool`` (name not among the tools) and ``truncated_tool_call`` (opened, never closed,
    JSON incomplete). A block that is never closed but whose JSON is complete is accepted with an
    ``unclosed_tool_call`` note. A block with several objects is invalid as a whole if any is.

Answer
    The last ``<answer>...</answer>`` block (``multiple_answers`` if more than one), read in
    order against the task's labels, whose style the labels themselves tell (``agent/labels.py``):
    letters are single upper-case letters standing alone (``A, C, B``; so a stray ``I`` or
    ``A`` word inside the block counts as a label), numbered labels are ``C<n>``
    (case-insensitive, ``C07`` = ``C7``). Other text in the block is reported
    (``unparsed_answer_text``) but harmless. An ``<answer>`` still open at the end of the text is
    parsed as far as it goes (``unclosed_answer``). An answer without any valid label is
    ``empty_answer``.

    The strict reading: an answer is *complete* when it names every candidate exactly once,
    invents none and is closed. Anything else is *repaired*, always the same documented way:
    labels not among the candidates (``unknown_label``: hallucinated) and repeats
    (``duplicate_label``) are dropped, then the candidates never mentioned are appended in
    their original candidate order (``missing_labels``). So a non-empty answer always yields a
    permutation of the candidate item ids, and ``Answer.repaired`` says when it took the repair
    (the loop records it as the trajectory's ``repaired``; it is never a valid answer). Local
    models decode answers under a constraint and never need the repair; HTTP backends can.

Both in one turn
    The answer wins and ends the episode; the calls are not executed (``answer_with_tool_calls``).
    The ranking is the model's commitment, and results of calls made alongside it would never be
    read.

Other notes: ``no_action`` (neither calls nor an answer) and ``truncated`` (the generation hit
its token limit, from the backend's finish reason).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from recthinker_dagster.agent.labels import NUMBERED_STYLE, label_style_of
from recthinker_dagster.agent.prompts import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

# Problems with one tool call (each makes the call invalid).
MALFORMED_JSON = "malformed_json"
MISSING_NAME = "missing_name"
ARGUMENTS_NOT_OBJECT = "arguments_not_object"
UNKNOWN_TOOL = "unknown_tool"
TRUNCATED_CALL = "truncated_tool_call"
CALL_ERRORS = (MALFORMED_JSON, MISSING_NAME, ARGUMENTS_NOT_OBJECT, UNKNOWN_TOOL, TRUNCATED_CALL)
# Notes on the turn or its answer.
UNCLOSED_TOOL_CALL = "unclosed_tool_call"
UNKNOWN_LABEL = "unknown_label"
DUPLICATE_LABEL = "duplicate_label"
MISSING_LABELS = "missing_labels"
UNPARSED_ANSWER_TEXT = "unparsed_answer_text"
UNCLOSED_ANSWER = "unclosed_answer"
EMPTY_ANSWER = "empty_answer"
MULTIPLE_ANSWERS = "multiple_answers"
ANSWER_WITH_TOOL_CALLS = "answer_with_tool_calls"
NO_ACTION = "no_action"
TRUNCATED = "truncated"

_BLOCK = re.compile(
    r"<(tool_call|answer)>(.*?)(</\1>|(?=<(?:tool_call|answer)>)|\Z)", re.DOTALL | re.IGNORECASE
)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.DOTALL)
_LABEL = re.compile(r"(?<![A-Za-z0-9_])[Cc](\d{1,6})(?![A-Za-z0-9_])")
_LETTER = re.compile(r"(?<![A-Za-z0-9_])[A-Z](?![A-Za-z0-9_])")
_ENUMERATOR = re.compile(r"(?<![A-Za-z0-9_])\d+[.)](?!\d)")
_SEPARATORS = re.compile(r"[\s,;:>\-\u2013\u2014\[\]()\"'`.*#|/]+")
_ANALYSIS = re.compile(r"\**analysis\**\s*:\s*\**\s*(.*?)(?=\n\s*\**plan\**\s*:|\Z)", re.DOTALL | re.IGNORECASE)
_PLAN = re.compile(r"\**plan\**\s*:\s*\**\s*(.*)", re.DOTALL | re.IGNORECASE)


@dataclass
class Issue:
    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


@dataclass
class ToolCall:
    """One requested call. ``structured`` calls (a name and an object) render as real tool calls."""

    raw: str
    name: str | None = None
    arguments: dict | None = None
    error_kind: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def structured(self) -> bool:
        return isinstance(self.name, str) and isinstance(self.arguments, dict)


@dataclass
class Answer:
    """A final answer; ``ranking`` is always a full permutation of the candidates' item ids."""

    labels: list[str]  # valid labels in the model's order, repeats dropped
    ranking_labels: list[str]  # labels, then the missing ones in candidate order
    ranking: list[str]  # item ids of ranking_labels
    missing: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    extra_text: str = ""
    closed: bool = True

    @property
    def empty(self) -> bool:
        return not self.labels

    @property
    def complete(self) -> bool:
        """Every candidate ranked exactly once by the model, no hallucinated label, tag closed."""
        return bool(self.labels) and not (self.missing or self.duplicates or self.unknown) and self.closed

    @property
    def repaired(self) -> bool:
        """The ranking took the documented repair (some labels, but not a complete answer)."""
        return bool(self.labels) and not self.complete


@dataclass
class ParsedTurn:
    text: str
    content: str  # the text minus structured tool-call blocks: the assistant message content
    reasoning: str  # the text minus all tool-call and answer blocks
    analysis: str | None
    plan: str | None
    tool_calls: list[ToolCall]
    answer: Answer | None
    issues: list[Issue]
    truncated: bool = False

    @property
    def action(self) -> str:
        """``answer`` (wins over calls), ``tool_calls`` or ``none``."""
        if self.answer is not None:
            return "answer"
        return "tool_calls" if self.tool_calls else "none"

    @property
    def issue_kinds(self) -> list[str]:
        return [issue.kind for issue in self.issues]


def normalize_label(token: str) -> str | None:
    """``"c07"`` -> ``"C7"``; None when the token is not a label."""
    match = _LABEL.fullmatch(token.strip())
    return f"C{int(match.group(1))}" if match else None


def format_tool_call(name: str, arguments: dict | str) -> str:
    """A call in the exact text form the Qwen2.5 template renders."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}\n{TOOL_CALL_CLOSE}'


def parse_answer(body: str, labels: Mapping[str, str], *, closed: bool = True) -> tuple[Answer, list[Issue]]:
    """Read an answer block against ``labels`` (candidate label -> item id, in candidate order)."""
    numbered = label_style_of(list(labels)) == NUMBERED_STYLE
    pattern = _LABEL if numbered else _LETTER
    known = {(normalize_label(label) or label) if numbered else label: label for label in labels}
    ranked: list[str] = []
    duplicates: list[str] = []
    unknown: list[str] = []
    for match in pattern.finditer(body):
        label = known.get(f"C{int(match.group(1))}" if numbered else match.group(0))
        if label is None:
            unknown.append(match.group(0))
        elif label in ranked:
            duplicates.append(label)
        else:
            ranked.append(label)
    leftover = _ENUMERATOR.sub(" ", pattern.sub(" ", body))
    extra = _SEPARATORS.sub(" ", leftover).strip()
    missing = [label for label in labels if label not in ranked] if ranked else []
    order = ranked + missing if ranked else list(labels)
    answer = Answer(
        labels=ranked,
        ranking_labels=order,
        ranking=[labels[label] for label in order],
        missing=missing,
        duplicates=duplicates,
        unknown=unknown,
        extra_text=extra,
        closed=closed,
    )
    issues = []
    if not ranked:
        issues.append(Issue(EMPTY_ANSWER, body.strip()[:80]))
    if unknown:
        issues.append(Issue(UNKNOWN_LABEL, ", ".join(unknown)))
    if duplicates:
        issues.append(Issue(DUPLICATE_LABEL, ", ".join(duplicates)))
    if missing:
        issues.append(Issue(MISSING_LABELS, f"{len(missing)} appended in candidate order"))
    if extra:
        issues.append(Issue(UNPARSED_ANSWER_TEXT, extra[:80]))
    if not closed:
        issues.append(Issue(UNCLOSED_ANSWER))
    return answer, issues


def parse_turn(
    text: str | None,
    labels: Mapping[str, str],
    tool_names: Collection[str] | None = None,
    finish_reason: str | None = None,
) -> ParsedTurn:
    """Parse one generation. ``tool_names=None`` accepts any tool name."""
    text = text or ""
    calls: list[ToolCall] = []
    answers: list[tuple[str, bool]] = []
    issues: list[Issue] = []
    removed_for_content: list[tuple[int, int]] = []
    removed_for_reasoning: list[tuple[int, int]] = []

    for match in _BLOCK.finditer(text):
        kind, body, closing = match.group(1).lower(), match.group(2), match.group(3)
        closed = bool(closing)
        removed_for_reasoning.append(match.span())
        if kind == "answer":
            answers.append((body, closed))
            continue
        block_calls = _parse_call_block(body, closed, tool_names)
        if not closed and all(call.ok for call in block_calls):
            issues.append(Issue(UNCLOSED_TOOL_CALL))
        if all(call.structured for call in block_calls):
            removed_for_content.append(match.span())
        calls.extend(block_calls)

    for call in calls:
        if call.error_kind is not None:  # not call.ok
            issues.append(Issue(call.error_kind, call.error or ""))

    answer = None
    if answers:
        if len(answers) > 1:
            issues.append(Issue(MULTIPLE_ANSWERS, f"{len(answers)} blocks; the last one counts"))
        body, closed = answers[-1]
        answer, answer_issues = parse_answer(body, labels, closed=closed)
        issues.extend(answer_issues)
        if calls:
            issues.append(Issue(ANSWER_WITH_TOOL_CALLS, f"{len(calls)} call(s) not executed"))
    elif not calls:
        issues.append(Issue(NO_ACTION))

    truncated = finish_reason == "length"
    if truncated:
        issues.append(Issue(TRUNCATED, "the generation hit its token limit"))

    reasoning = _cut(text, removed_for_reasoning).strip()
    analysis_match = _ANALYSIS.search(reasoning)
    plan_match = _PLAN.search(reasoning)
    return ParsedTurn(
        text=text,
        content=_cut(text, removed_for_content).strip(),
        reasoning=reasoning,
        analysis=analysis_match.group(1).strip() if analysis_match else None,
        plan=plan_match.group(1).strip() if plan_match else None,
        tool_calls=calls,
        answer=answer,
        issues=issues,
        truncated=truncated,
    )


def _cut(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` without ``spans`` (sorted, disjoint); the gaps are joined by a newline."""
    if not spans:
        return text
    pieces, start = [], 0
    for begin, end in spans:
        pieces.append(text[start:begin].rstrip())
        start = end
    pieces.append(text[start:].lstrip())
    return "\n".join(piece for piece in pieces if piece)


def _json_values(body: str) -> list | None:
    """All JSON values in ``body`` one after another (whitespace or commas between), or None."""
    decoder = json.JSONDecoder()
    values: list = []
    index = 0
    while True:
        while index < len(body) and body[index] in " \t\r\n,":
            index += 1
        if index >= len(body):
            return values or None
        try:
            value, index = decoder.raw_decode(body, index)
        except json.JSONDecodeError:
            return None
        values.append(value)


def _parse_call_block(body: str, closed: bool, tool_names: Collection[str] | None) -> list[ToolCall]:
    raw = body.strip()
    fenced = _FENCE.match(raw)
    values = _json_values(fenced.group(1) if fenced else raw)
    if values is None:
        if not closed:
            return [ToolCall(raw, error_kind=TRUNCATED_CALL, error="the tool call was cut off before it ended")]
        return [ToolCall(raw, error_kind=MALFORMED_JSON, error="the tool call is not valid JSON")]
    calls = [_call_from_value(raw, value, tool_names) for value in values]
    if len(calls) > 1 and not all(call.structured for call in calls):
        first = next(call for call in calls if not call.structured)
        return [ToolCall(raw, error_kind=first.error_kind, error=first.error)]
    return calls


def _call_from_value(raw: str, value, tool_names: Collection[str] | None) -> ToolCall:
    if not isinstance(value, dict):
        return ToolCall(raw, error_kind=MALFORMED_JSON, error="the tool call is not a JSON object")
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        return ToolCall(raw, error_kind=MISSING_NAME, error='the tool call has no "name" string')
    name = name.strip()
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(raw, name=name, error_kind=ARGUMENTS_NOT_OBJECT, error='"arguments" must be a JSON object')
    if tool_names is not None and name not in tool_names:
        known = ", ".join(sorted(tool_names))
        return ToolCall(raw, name, arguments, UNKNOWN_TOOL, f"unknown tool {name!r}; available tools: {known}")
    return ToolCall(raw, name, arguments)
