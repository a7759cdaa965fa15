"""Profile resolution (settings.load_profile), the Dagster config classes over it, and `recthinker config`."""

from __future__ import annotations

import json
import textwrap

import pytest

from recthinker_dagster.cli import main, parse_overrides
from recthinker_dagster.defs.config import (
    EvaluationConfig,
    IngestConfig,
    SFTTrainingConfig,
    TaskSplitConfig,
    TeacherConfig,
    ToolIndexesConfig,
)
from recthinker_dagster.settings import PROFILE_NAMES, load_profile


@pytest.fixture
def profiles_dir(tmp_path, monkeypatch):
    """A profiles folder of one's own: ``write(name, yaml)`` adds a profile to it."""
    monkeypatch.setenv("RECTHINKER_PROFILES_DIR", str(tmp_path))

    def write(name: str, text: str):
        path = tmp_path / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    return write


def test_every_named_profile_loads():
    for name in PROFILE_NAMES:
        profile = load_profile(name)
        assert profile.name == name and profile.description
        assert set(profile.sources) == set(profile.flat())


def test_each_value_comes_from_the_most_specific_source(profiles_dir):
    profiles_dir("mine", """
        description: test
        max_turns: 5
        teacher:
          max_turns: 3
          samples_per_task: 2
    """)
    profile = load_profile("mine", {"teacher.samples_per_task": 7})
    assert (profile.registry.model_name, profile.sources["registry.model_name"]) == ("recthinker-agent", "default")
    assert (profile.evaluation.max_turns, profile.sources["evaluation.max_turns"]) == (5, "profile")
    assert (profile.teacher.max_turns, profile.sources["teacher.max_turns"]) == (3, "profile:teacher")
    assert (profile.teacher.samples_per_task, profile.sources["teacher.samples_per_task"]) == (7, "override")
    # the shared value reaches nested sections too
    assert (profile.sft.validation.max_turns, profile.sources["sft.validation.max_turns"]) == (5, "profile")


def test_zero_false_and_empty_overrides_are_honoured_and_none_is_not():
    profile = load_profile("demo", {
        "teacher.max_tool_calls": 0,
        "ingest.allow_download": False,
        "evaluation.llm_tasks": 0,
        "sft.validation.n_tasks": 0,
        "teacher.llm_model": "",
        "teacher.samples_per_task": None,
    })
    assert profile.teacher.max_tool_calls == 0 and profile.sources["teacher.max_tool_calls"] == "override"
    assert profile.ingest.allow_download is False
    assert profile.evaluation.llm_tasks == 0
    assert profile.sft.validation.n_tasks == 0 and profile.sources["sft.validation.n_tasks"] == "override"
    assert profile.sources["teacher.llm_model"] == "override"
    assert profile.teacher.samples_per_task == 2 and profile.sources["teacher.samples_per_task"] == "profile:teacher"


def test_unknown_sections_and_keys_are_errors_naming_the_file(profiles_dir):
    path = profiles_dir("typo", "teachr:\n  samples_per_task: 2\n")
    with pytest.raises(ValueError, match="unknown sections") as error:
        load_profile("typo")
    assert str(path) in str(error.value)
    path = profiles_dir("badkey", "teacher:\n  samples_per_taks: 2\n")
    with pytest.raises(ValueError, match="samples_per_taks") as error:
        load_profile("badkey")
    assert str(path) in str(error.value)
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        load_profile("huge")


def test_scalar_settings_are_type_checked_naming_the_field_and_file(profiles_dir):
    # YAML 1.1 reads 7e-1 (no dot) as a string: a float setting takes it as 0.7
    profiles_dir("sci", "teacher:\n  temperature: 7e-1\n")
    assert load_profile("sci").teacher.temperature == 0.7
    path = profiles_dir("words", "protocol:\n  n_candidates: ten\n")
    with pytest.raises(ValueError, match="'protocol.n_candidates' must be int") as error:
        load_profile("words")
    assert str(path) in str(error.value)
    with pytest.raises(ValueError, match="'teacher.samples_per_task' must be int"):
        load_profile("sci", {"teacher.samples_per_task": True})


def test_unknown_override_sections_and_keys_are_errors():
    with pytest.raises(ValueError, match="unknown keys in 'teacher'"):
        load_profile("demo", {"teacher.bogus": 1})
    with pytest.raises(ValueError, match="unknown settings sections"):
        load_profile("demo", {"nosuch.field": 1})


def test_dagster_config_fields_override_the_profile_and_honour_zero():
    assert TeacherConfig(profile="smoke", max_tool_calls=0).settings().max_tool_calls == 0
    assert TeacherConfig(profile="demo").settings().samples_per_task == 2
    assert TeacherConfig(profile="demo", samples_per_task=1).settings().samples_per_task == 1
    assert EvaluationConfig(profile="demo", llm_tasks=0).settings().llm_tasks == 0
    assert SFTTrainingConfig(profile="demo", eval_tasks_per_dataset=0).settings().validation.n_tasks == 0
    assert IngestConfig(profile="smoke", allow_download=False).settings().allow_download is False
    assert TaskSplitConfig(profile="smoke", seed=0).settings().seed == 0
    assert ToolIndexesConfig(profile="smoke", bpr_seed=0).settings().index_config().bpr.seed == 0


def test_task_split_config_reproduces_the_profile_protocol():
    protocol = TaskSplitConfig(profile="demo", n_candidates=10).settings().for_dataset("ml-1m")
    assert (protocol.n_candidates, protocol.n_eval_users_per_group, protocol.seed) == (10, 100, 2026)
    assert (protocol.sparse_min, protocol.sparse_max, protocol.dense_min) == (20, 50, 200)  # the dataset's


def test_config_command_prints_an_aligned_table_of_sources(capsys):
    assert main(["config", "smoke", "--set", "teacher.samples_per_task=0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "profile smoke: CI, minutes"
    assert lines[1].split() == ["setting", "source", "value"]
    rows = {line.split()[0]: line for line in lines[3:]}
    assert set(rows) == set(load_profile("smoke").flat())
    assert rows["teacher.samples_per_task"].split()[1:] == ["override", "0"]
    assert rows["registry.model_name"].split()[1:] == ["default", '"recthinker-agent"']
    assert rows["protocol.seed"].split()[1:] == ["profile", "2026"]
    columns = {line.index(line.split()[1]) for line in lines[3:]}
    assert len(columns) == 1  # the source column starts at the same place on every line


def test_config_command_json_output(capsys, monkeypatch):
    monkeypatch.setenv("RECTHINKER_PROFILE", "smoke")
    assert main(["config", "--json", "--set", "ingest.allow_download=false", "--set", "evaluation.systems=[random]"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["profile"] == "smoke"
    settings = document["settings"]
    assert settings["ingest.allow_download"] == {"value": False, "source": "override"}
    assert settings["evaluation.systems"] == {"value": ["random"], "source": "override"}
    assert settings["teacher.batch_size"] == {"value": 64, "source": "profile:teacher"}


def test_config_command_reports_bad_settings(capsys):
    assert main(["config", "smoke", "--set", "teacher.bogus=1"]) == 2
    assert "unknown keys in 'teacher'" in capsys.readouterr().err
    assert main(["config", "smoke", "--set", "teacher.samples_per_task"]) == 2
    assert "expected <section>.<field>=<value>" in capsys.readouterr().err


def test_set_values_are_typed():
    assert parse_overrides(["a.b=0", "a.c=false", "a.d=1e-5", "a.e=text", "a.f=", "a.g=null"]) == {
        "a.b": 0, "a.c": False, "a.d": 1e-5, "a.e": "text", "a.f": "", "a.g": None,
    }
