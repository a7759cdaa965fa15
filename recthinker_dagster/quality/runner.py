"""Run a list of Great Expectations expectations on a pandas frame; report plainly.

GE 1.x validates pandas, not polars. Importing GE takes seconds, so it is imported lazily
and the ephemeral context (one pandas datasource, one dataframe asset and whole-dataframe
batch definition per suite name) is created once per process. Analytics and progress bars
are switched off.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

_LOCK = threading.Lock()  # one validation at a time: GE's pandas engine is shared state
_STATE: dict[str, Any] = {}
_PARTIAL = 5  # example values shown per failed expectation


@dataclass
class QualityResult:
    """The outcome of one suite on one frame."""

    suite: str
    success: bool
    failures: list[str] = field(default_factory=list)  # one readable line per failed expectation
    evaluated: int = 0  # expectations evaluated
    statistics: dict[str, Any] = field(default_factory=dict)  # GE statistics, rows, timings

    def __str__(self) -> str:
        head = f"{self.suite}: {'passed' if self.success else 'FAILED'} " \
               f"({self.evaluated - len(self.failures)}/{self.evaluated} expectations)"
        return "\n  ".join([head, *self.failures])


def gx():
    """The ``great_expectations`` module, imported on first use with analytics off."""
    if "gx" not in _STATE:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        import great_expectations

        _STATE["gx"] = great_expectations
    return _STATE["gx"]


def _batch_definition(suite_name: str):
    if "context" not in _STATE:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx().get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        _STATE["context"] = context
        _STATE["datasource"] = context.data_sources.add_pandas("recthinker")
        _STATE["batch_definitions"] = {}
    definitions = _STATE["batch_definitions"]
    if suite_name not in definitions:
        asset = _STATE["datasource"].add_dataframe_asset(name=suite_name)
        definitions[suite_name] = asset.add_batch_definition_whole_dataframe("whole")
    return definitions[suite_name]


def run_suite(
    name: str, frame: pd.DataFrame, expectations: list, index_column: str | None = None
) -> QualityResult:
    """Validate ``frame`` against ``expectations``; ``index_column`` names failing rows."""
    started = time.perf_counter()
    suite = gx().ExpectationSuite(name=name, expectations=expectations)
    result_format: dict[str, Any] = {"result_format": "SUMMARY",
                                     "partial_unexpected_count": _PARTIAL}
    if index_column is not None and index_column in frame.columns:
        result_format["unexpected_index_column_names"] = [index_column]
    with _LOCK:
        batch = _batch_definition(name).get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(suite, result_format=result_format)
    failures = [describe(r) for r in result.results if not r.success]
    stats = dict(result.statistics)
    stats.update(rows=len(frame), ge_seconds=round(time.perf_counter() - started, 3))
    return QualityResult(name, bool(result.success), failures,
                         int(stats.get("evaluated_expectations", 0)), stats)


def describe(expectation_result) -> str:
    """One line: ``expectation(arguments): what went wrong``."""
    config = expectation_result.expectation_config
    call = f"{config.type}({_arguments(config.kwargs)})"
    errors = [e.get("exception_message") for e in _exceptions(expectation_result.exception_info)]
    if errors:
        return f"{call}: could not be evaluated: {errors[0]}"
    if config.type == "expect_column_to_exist":
        return f"{call}: column is missing"
    res = expectation_result.result or {}
    if "unexpected_count" in res:
        line = f"{call}: {res['unexpected_count']} unexpected values " \
               f"e.g. {_plain(res.get('partial_unexpected_list', []))}"
        index = res.get("partial_unexpected_index_list") or []
        name = (res.get("unexpected_index_column_names") or [None])[0]
        if index and isinstance(index[0], dict) and name not in (None, config.kwargs.get(
                "column")):
            line += f" at {name} {_plain([row.get(name) for row in index])}"
        return line
    if "observed_value" in res:
        return f"{call}: observed {_plain(res['observed_value'])}"
    return f"{call}: failed"


def _arguments(kwargs: dict) -> str:
    parts = []
    if "column" in kwargs:
        parts.append(str(kwargs["column"]))
    if "column_list" in kwargs:
        parts.append(", ".join(kwargs["column_list"]))
    if "min_value" in kwargs or "max_value" in kwargs:
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        if low is not None and high is not None:
            parts.append(f"{_num(low)}..{_num(high)}")
        elif low is not None:
            parts.append(f"{'>' if kwargs.get('strict_min') else '>='}{_num(low)}")
        elif high is not None:
            parts.append(f"{'<' if kwargs.get('strict_max') else '<='}{_num(high)}")
    if "value_set" in kwargs:
        parts.append("in {" + ", ".join(map(str, kwargs["value_set"])) + "}")
    if "value" in kwargs:
        parts.append(f"= {kwargs['value']}")
    return ", ".join(parts)


def _exceptions(info) -> list[dict]:
    if not info:
        return []
    if info.get("raised_exception"):
        return [info]
    return [v for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]


def _num(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _plain(values):
    """Plain Python values, so messages read ``[9.0]``, not ``[np.float64(9.0)]``; nulls: None."""
    if isinstance(values, list):
        return [_plain(v) for v in values]
    value = values.item() if isinstance(values, np.generic) else values
    return None if value is pd.NA or (isinstance(value, float) and np.isnan(value)) else value
