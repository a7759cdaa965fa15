"""Candidate labels: the single-token check on SmolLM2's real tokenizer, the fallback, and one
labelling used by the tools, the prompts, the parser, the loop and the teacher."""

from __future__ import annotations

import logging

import pytest

from recthinker_dagster.agent import AgentConfig, Generation, run_agent
from recthinker_dagster.agent.labels import (
    LETTERS_STYLE,
    NUMBERED_STYLE,
    candidate_labels,
    choose_label_style,
    label_style_of,
    label_token_problems,
    labels_fit,
)
from recthinker_dagster.agent.parser import parse_answer
from recthinker_dagster.agent.prompts import final_answer_request, system_prompt
from recthinker_dagster.tools import Toolbox
from tests.support.agent_fakes import FakeToolbox, task


def test_labels_by_style():
    assert candidate_labels(10) == list("ABCDEFGHIJ")
    assert candidate_labels(20)[-1] == "T"
    assert candidate_labels(3, NUMBERED_STYLE) == ["C1", "C2", "C3"]
    assert candidate_labels(27)[-1] == "C27"  # more than the alphabet: numbered
    assert label_style_of(["A", "B"]) == LETTERS_STYLE and label_style_of(["C1", "C10"]) == NUMBERED_STYLE
    with pytest.raises(ValueError, match="unknown label style"):
        candidate_labels(3, "roman")


@pytest.mark.parametrize("n", [10, 20])
def test_letters_are_single_tokens_of_smollm2(smollm2_tokenizer, n):
    labels = candidate_labels(n)
    assert label_token_problems(smollm2_tokenizer, labels) == []
    for label in labels:  # bare after "<answer>", spaced after ", "
        assert len(smollm2_tokenizer.encode(label, add_special_tokens=False)) == 1
        assert len(smollm2_tokenizer.encode(" " + label, add_special_tokens=False)) == 1
    assert choose_label_style(smollm2_tokenizer, n) == LETTERS_STYLE
    # numbered labels are several tokens ("C", "1", "7"): not single tokens
    assert not labels_fit(smollm2_tokenizer, candidate_labels(20, NUMBERED_STYLE))


class SplittingTokenizer:
    """A tokenizer that writes " X" as two tokens (space, letter): letters do not fit."""

    def encode(self, text, add_special_tokens=False):
        return [ord(char) for char in text]


def test_a_tokenizer_without_single_token_labels_falls_back_with_a_warning(caplog):
    assert label_token_problems(SplittingTokenizer(), ["A", "B"]) == ["' A' (spaced) is 2 tokens [32, 65]",
                                                                      "' B' (spaced) is 2 tokens [32, 66]"]
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="fall back to multi-token C1..C10"):
        assert choose_label_style(SplittingTokenizer(), 10) == NUMBERED_STYLE
    assert "are not single tokens" in caplog.text
    with pytest.warns(UserWarning, match="more than the 26 letters"):
        assert choose_label_style(SplittingTokenizer(), 30) == NUMBERED_STYLE


def test_prompts_and_parser_follow_the_labels():
    letters = candidate_labels(10)
    prompt = system_prompt(6, 8, labels=letters)
    assert "<answer>C, A, G, ...</answer>" in prompt and "label (A, B, ...)" in prompt
    assert "<answer>C3, C1, C7, ...</answer>" in system_prompt(6, 8, labels=candidate_labels(10, NUMBERED_STYLE))
    assert "all 10 candidates" in final_answer_request(letters)["content"]
    answer, _ = parse_answer("B, A, J, C, D, E, F, G, H, I", dict(zip(letters, letters)))
    assert answer.complete and answer.labels[:3] == ["B", "A", "J"]
    answer, _ = parse_answer("B, A, K, a", dict(zip(letters, letters)))  # K: not a candidate; "a": prose
    assert answer.unknown == ["K"] and answer.labels == ["B", "A"] and answer.repaired


class RefusingBackend:
    """A local-model stand-in whose tokenizer does not fit letter labels."""

    name = "refusing"

    def labels_fit(self, labels):
        return False

    def generate(self, conversations, tools, params):
        return [Generation("<answer>C2, C1, C3, C4</answer>") for _ in conversations]


class LetterToolbox(FakeToolbox):
    def __init__(self, task):
        super().__init__(task)
        self.use_label_style(LETTERS_STYLE)

    def use_label_style(self, style):
        items = list(self.labels.values())
        self.labels = dict(zip(candidate_labels(len(items), style), items))


def test_the_loop_relabels_when_the_backend_tokenizer_does_not_fit(caplog):
    with caplog.at_level(logging.WARNING):
        (t,) = run_agent([task("u1")], RefusingBackend(), LetterToolbox, AgentConfig())
    assert "falling back to C1..CN labels" in caplog.text
    assert "C1: Movie u1-i1" in t.messages[1]["content"] and t.valid and t.final_labels[0] == "C2"


def test_tools_accept_labels_and_item_ids_in_either_style():
    from tests.support.trajectories import agent_tasks, real_world

    world = real_world()
    (agent_task,) = agent_tasks("eval", 1)
    box = Toolbox(world.indexes, agent_task)
    first, second = agent_task.candidate_item_ids[:2]
    assert list(box.labels)[:2] == ["A", "B"] and box.labels["A"] == first
    assert box.candidate_lines()[0].startswith("A: ")
    by_label = box.call("get_item_info", {"item_ids": ["B"]})
    by_id = box.call("get_item_info", {"item_ids": [second]})
    assert by_label.ok and by_label.output == by_id.output and by_label.output.startswith("B: ")
    bad = box.call("get_related_items", {"item_id": "Z"})  # a label, but not a candidate's
    assert not bad.ok and bad.error_kind == "unknown_item" and f"A..{list(box.labels)[-1]}" in bad.output
    box.use_label_style(NUMBERED_STYLE)
    assert box.labels["C2"] == second and box.call("get_item_info", {"item_ids": ["c2"]}).output.startswith("C2: ")
    assert box.call("get_item_info", {"item_ids": ["B"]}).error_kind == "unknown_item"
