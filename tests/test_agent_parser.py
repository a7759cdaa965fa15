"""The turn parser on well-formed and malformed model outputs; it must never raise."""

from __future__ import annotations

import json
import random

import pytest

from recthinker_dagster.agent import parser as P
from recthinker_dagster.agent.parser import (
    format_tool_call,
    normalize_label,
    parse_answer,
    parse_turn,
)

LABELS = {f"C{i}": f"item{i}" for i in range(1, 6)}  # C1..C5 -> item1..item5
TOOLS = {"get_item_info", "search_history"}


def turn(text, finish_reason="stop", tool_names=TOOLS):
    return parse_turn(text, LABELS, tool_names, finish_reason)


# -- tool calls ------------------------------------------------------------------------------


def test_well_formed_turn_with_two_calls():
    text = (
        "Analysis: the user likes comedies; I know nothing about C2.\n"
        "Plan: look up C2 and search the history.\n"
        '<tool_call>\n{"name": "get_item_info", "arguments": {"label": "C2"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "search_history", "arguments": {"query": "comedy", "k": 5}}\n</tool_call>'
    )
    parsed = turn(text)
    assert parsed.action == "tool_calls"
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        ("get_item_info", {"label": "C2"}),
        ("search_history", {"query": "comedy", "k": 5}),
    ]
    assert all(c.ok and c.structured for c in parsed.tool_calls)
    assert parsed.issues == []
    assert parsed.analysis == "the user likes comedies; I know nothing about C2."
    assert parsed.plan == "look up C2 and search the history."
    assert "<tool_call>" not in parsed.content and parsed.content.startswith("Analysis:")


@pytest.mark.parametrize(
    "block, kind",
    [
        ('{"name": "get_item_info", "arguments": {"label": "C2"}', P.MALFORMED_JSON),  # missing brace
        ("{'name': 'get_item_info'}", P.MALFORMED_JSON),  # Python quotes
        ("get_item_info(label='C2')", P.MALFORMED_JSON),
        ("", P.MALFORMED_JSON),
        ('["get_item_info", {"label": "C2"}]', P.MALFORMED_JSON),  # not an object
        ('{"arguments": {"label": "C2"}}', P.MISSING_NAME),
        ('{"name": 7, "arguments": {}}', P.MISSING_NAME),
        ('{"name": "get_item_info", "arguments": ["C2"]}', P.ARGUMENTS_NOT_OBJECT),
        ('{"name": "get_item_info", "arguments": "C2"}', P.ARGUMENTS_NOT_OBJECT),
        ('{"name": "get_item_info", "arguments": 3}', P.ARGUMENTS_NOT_OBJECT),
        ('{"name": "recommend_everything", "arguments": {}}', P.UNKNOWN_TOOL),
    ],
)
def test_invalid_calls_are_reported_not_raised(block, kind):
    parsed = turn(f"Analysis: a\nPlan: b\n<tool_call>\n{block}\n</tool_call>")
    assert len(parsed.tool_calls) == 1
    call = parsed.tool_calls[0]
    assert call.error_kind == kind and not call.ok and call.error
    assert kind in parsed.issue_kinds
    assert parsed.action == "tool_calls"


def test_unknown_tool_is_structured_but_malformed_json_stays_in_the_text():
    unknown = turn('<tool_call>{"name": "nope", "arguments": {}}</tool_call>').tool_calls[0]
    assert unknown.structured and not unknown.ok
    parsed = turn("Plan: x\n<tool_call>{not json}</tool_call>")
    assert not parsed.tool_calls[0].structured
    assert "<tool_call>{not json}</tool_call>" in parsed.content


def test_lenient_but_exact_variants():
    fenced = turn('<tool_call>\n```json\n{"name": "get_item_info", "arguments": {"label": "C1"}}\n```\n</tool_call>')
    assert fenced.tool_calls[0].ok and fenced.tool_calls[0].arguments == {"label": "C1"}
    stringly = turn('<tool_call>{"name": "get_item_info", "arguments": "{\\"label\\": \\"C4\\"}"}</tool_call>')
    assert stringly.tool_calls[0].arguments == {"label": "C4"}
    no_args = turn('<tool_call>{"name": "search_history"}</tool_call>')
    assert no_args.tool_calls[0].ok and no_args.tool_calls[0].arguments == {}
    two_in_one = turn(
        '<tool_call>{"name": "get_item_info", "arguments": {"label": "C1"}}\n'
        '{"name": "get_item_info", "arguments": {"label": "C2"}}</tool_call>'
    )
    assert [c.arguments["label"] for c in two_in_one.tool_calls] == ["C1", "C2"]
    mixed = turn('<tool_call>{"name": "get_item_info", "arguments": {}} [1, 2]</tool_call>')
    assert len(mixed.tool_calls) == 1 and mixed.tool_calls[0].error_kind == P.MALFORMED_JSON
    upper = turn('<TOOL_CALL>{"name": "search_history", "arguments": {}}</TOOL_CALL>')
    assert upper.tool_calls[0].ok


def test_any_tool_name_when_no_tool_list_is_given():
    parsed = parse_turn('<tool_call>{"name": "whatever", "arguments": {}}</tool_call>', LABELS, None)
    assert parsed.tool_calls[0].ok


def test_truncated_and_unclosed_calls():
    cut = turn('Plan: p\n<tool_call>\n{"name": "get_item_info", "argum', finish_reason="length")
    assert cut.tool_calls[0].error_kind == P.TRUNCATED_CALL
    assert P.TRUNCATED in cut.issue_kinds and cut.truncated
    unclosed = turn('<tool_call>\n{"name": "get_item_info", "arguments": {"label": "C3"}}\n')
    assert unclosed.tool_calls[0].ok and P.UNCLOSED_TOOL_CALL in unclosed.issue_kinds
    # a new block starting before the previous one closed
    chained = turn(
        '<tool_call>{"name": "get_item_info", "arguments": {"label": "C1"}}'
        '<tool_call>{"name": "get_item_info", "arguments": {"label": "C2"}}</tool_call>'
    )
    assert [c.arguments["label"] for c in chained.tool_calls] == ["C1", "C2"]


# -- answers ---------------------------------------------------------------------------------


def test_complete_answer_is_a_permutation():
    parsed = turn("Analysis: enough.\nPlan: rank.\n<answer>C3, C1, C5, C2, C4</answer>")
    answer = parsed.answer
    assert parsed.action == "answer" and answer.complete
    assert answer.ranking == ["item3", "item1", "item5", "item2", "item4"]
    assert parsed.issues == []


@pytest.mark.parametrize(
    "body",
    ["C3 > C1 > C5 > C2 > C4", "1. C3\n2. C1\n3. C5\n4. C2\n5. C4", "[C3, C1, C5, C2, C4]", "c3 c01 C5; C2; C4."],
)
def test_answer_separators_and_label_spellings(body):
    answer = turn(f"<answer>{body}</answer>").answer
    assert answer.complete and answer.ranking_labels == ["C3", "C1", "C5", "C2", "C4"]
    assert answer.extra_text == ""


def test_partial_answer_appends_missing_in_candidate_order():
    parsed = turn("<answer>C4, C2</answer>")
    answer = parsed.answer
    assert answer.ranking_labels == ["C4", "C2", "C1", "C3", "C5"]
    assert answer.missing == ["C1", "C3", "C5"] and not answer.complete
    assert P.MISSING_LABELS in parsed.issue_kinds


def test_duplicates_and_hallucinated_labels_are_dropped():
    parsed = turn("<answer>C2, C9, C2, C1, C0, C5, C3, C4, C3</answer>")
    answer = parsed.answer
    assert answer.ranking_labels == ["C2", "C1", "C5", "C3", "C4"]
    assert answer.duplicates == ["C2", "C3"] and answer.unknown == ["C9", "C0"]
    assert sorted(answer.ranking) == sorted(LABELS.values())
    assert {P.DUPLICATE_LABEL, P.UNKNOWN_LABEL} <= set(parsed.issue_kinds)
    assert not answer.complete


def test_titles_in_the_answer_are_reported_but_harmless():
    parsed = turn("<answer>C2 (Toy Story), C1 (Heat), C3, C4, C5</answer>")
    assert parsed.answer.ranking_labels == ["C2", "C1", "C3", "C4", "C5"]
    assert parsed.answer.complete
    assert P.UNPARSED_ANSWER_TEXT in parsed.issue_kinds and "Toy Story" in parsed.answer.extra_text


@pytest.mark.parametrize("body", ["", "Toy Story, Heat", "C6, C7", "none of them"])
def test_empty_answer_falls_back_to_candidate_order(body):
    parsed = turn(f"<answer>{body}</answer>")
    assert parsed.answer.empty and not parsed.answer.complete
    assert parsed.answer.ranking == list(LABELS.values())
    assert P.EMPTY_ANSWER in parsed.issue_kinds


def test_unclosed_and_multiple_answers():
    cut = turn("Plan: rank\n<answer>C5, C4, C3", finish_reason="length")
    assert cut.answer.ranking_labels == ["C5", "C4", "C3", "C1", "C2"] and not cut.answer.closed
    assert {P.UNCLOSED_ANSWER, P.MISSING_LABELS, P.TRUNCATED} <= set(cut.issue_kinds)
    twice = turn("<answer>C1, C2, C3, C4, C5</answer> on second thought <answer>C5, C4, C3, C2, C1</answer>")
    assert twice.answer.ranking_labels == ["C5", "C4", "C3", "C2", "C1"]
    assert P.MULTIPLE_ANSWERS in twice.issue_kinds


def test_answer_wins_over_tool_calls_in_the_same_turn():
    parsed = turn(
        '<tool_call>{"name": "get_item_info", "arguments": {"label": "C1"}}</tool_call>\n'
        "<answer>C1, C2, C3, C4, C5</answer>"
    )
    assert parsed.action == "answer" and parsed.answer.complete
    assert P.ANSWER_WITH_TOOL_CALLS in parsed.issue_kinds


def test_no_action_and_degenerate_inputs():
    for text in ["Analysis: hmm.\nPlan: think more.", "", None, "</answer></tool_call>", "<answer", "\x00\ufffd"]:
        parsed = turn(text)
        assert parsed.action == "none" and P.NO_ACTION in parsed.issue_kinds


def test_parse_answer_with_item_ids_not_labels_and_normalize_label():
    answer, issues = parse_answer("item3, item1", LABELS)
    assert answer.empty and issues[0].kind == P.EMPTY_ANSWER
    assert normalize_label(" c012 ") == "C12" and normalize_label("CX") is None


def test_format_tool_call_round_trips_through_the_parser():
    text = format_tool_call("get_item_info", {"label": "C2", "fields": ["title", "genres"], "note": "é"})
    call = turn(text).tool_calls[0]
    assert call.ok and call.arguments == {"label": "C2", "fields": ["title", "genres"], "note": "é"}


def test_parser_never_raises_on_random_garbage():
    rng = random.Random(0)
    alphabet = list("<>/{}[]\":,CC12345 \nabc_") + ["<tool_call>", "</tool_call>", "<answer>", "</answer>", "\\"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        parsed = parse_turn(text, LABELS, TOOLS, rng.choice(["stop", "length", None]))
        if parsed.answer is not None:
            assert sorted(parsed.answer.ranking) == sorted(LABELS.values())
        json.dumps([str(issue) for issue in parsed.issues])


# -- letter labels and the repair ------------------------------------------------------------

LETTERS = {label: f"item{k}" for k, label in enumerate("ABCDE", start=1)}  # A..E -> item1..item5


def test_letter_labels_are_read_in_order_and_only_standing_alone():
    answer, issues = parse_answer("1. C\n2. A\n3. E, D, B", LETTERS)
    assert answer.complete and answer.ranking == ["item3", "item1", "item5", "item4", "item2"] and issues == []
    answer, issues = parse_answer("E > Apple, b, D", LETTERS)  # "Apple" and lower-case "b" are not labels
    assert answer.labels == ["E", "D"] and answer.repaired and P.UNPARSED_ANSWER_TEXT in [i.kind for i in issues]


def test_the_repair_drops_duplicates_and_unknown_labels_then_appends_the_missing_ones():
    answer, issues = parse_answer("D, Z, D, B", LETTERS)
    assert answer.labels == ["D", "B"] and answer.duplicates == ["D"] and answer.unknown == ["Z"]
    assert answer.ranking_labels == ["D", "B", "A", "C", "E"]  # then the missing ones, in candidate order
    assert answer.repaired and not answer.complete
    assert {i.kind for i in issues} == {P.DUPLICATE_LABEL, P.UNKNOWN_LABEL, P.MISSING_LABELS}
    clean, _ = parse_answer("E, D, C, B, A", LETTERS)
    assert clean.complete and not clean.repaired
    empty, _ = parse_answer("none of them", LETTERS)
    assert empty.empty and not empty.repaired  # nothing to repair: the loop asks again
