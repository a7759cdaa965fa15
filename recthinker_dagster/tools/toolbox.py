"""The seven agent tools, bound to one task by :class:`Toolbox`.

Each public tool method below has real type annotations and a Google-style docstring, so
``transformers.utils.get_json_schema`` (and TRL's ``tools=``) can build its schema. The
current user is always the task's user; candidates are labelled in ``candidate_item_ids``
order, ``A``, ``B``, ... by default or ``C1..CN`` (``agent/labels.py``: the letters are
single tokens of the backbone), and any item argument may be a label or an item id.
``Toolbox.call`` validates the arguments and never raises: bad arguments give
``ToolResult(ok=False, output="Error: ...")``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass

import numpy as np
import polars as pl

from recthinker_dagster.agent.labels import DEFAULT_LABEL_STYLE, candidate_labels, label_range, looks_like_label
from recthinker_dagster.tools.formatting import clip, date, fit_to_budget, stars
from recthinker_dagster.tools.profiles import compute_profile, history_crc, render_profile
from recthinker_dagster.tools.signals import available_signals, format_score_lines, fused_scores

TOOL_GROUPS = {
    "get_user_profile": "user",
    "search_user_history": "user",
    "get_item_info": "item",
    "search_items": "item",
    "find_similar_users": "collaborative",
    "get_related_items": "collaborative",
    "score_candidates": "collaborative",
}
TOOL_NAMES = tuple(TOOL_GROUPS)
MAX_HISTORY_LIMIT = 50
MAX_LIMIT = 20
MAX_INFO_ITEMS = 10
DEFAULT_OUTPUT_BUDGET = 600  # characters per tool output: short conversations for small models
LIKED_SHOWN = 3
MAX_WEIGHT = 10.0  # score_candidates weights: |w| <= this (a negative weight prefers low values)
_SCHEMAS: list[dict] | None = None  # the same for every Toolbox: built once


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    output: str
    error_kind: str | None = None  # unknown_tool, bad_json, bad_arguments, wrong_type,
    # empty_list, too_many_items, unknown_item, not_candidate, forbidden_user, internal


class ToolError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class UserView:
    """What the tools know about the task user: its history, oldest first."""

    items: list[str]
    ratings: list[float]  # NaN where unknown
    timestamps: list[int] | None  # None when unknown
    from_index: bool  # ratings and timestamps come from the index (it matched the history)


def _task_dict(task) -> dict:
    if isinstance(task, pl.DataFrame):
        if task.height != 1:
            raise ValueError(f"a task frame must have exactly one row, got {task.height}")
        return task.row(0, named=True)
    if isinstance(task, Mapping):
        return dict(task)
    if is_dataclass(task) and hasattr(task, "history_item_ids"):  # agent.trajectory.AgentTask
        return {f.name: getattr(task, f.name) for f in fields(task)}
    raise TypeError(f"task must be an AgentTask, a dict or a one-row polars DataFrame, got {type(task).__name__}")


class Toolbox:
    """The tools of one task. ``labels`` maps the candidate labels (``"A"``, ``"B"``, ... or
    ``"C1"``, ``"C2"``, ... by ``label_style``) to candidate item ids, in candidate order."""

    def __init__(self, indexes, task, *, output_budget_chars: int = DEFAULT_OUTPUT_BUDGET, label_style: str = DEFAULT_LABEL_STYLE):
        task = _task_dict(task)
        self.indexes = indexes
        self.task_id: str = task.get("task_id", "")
        self.user_id: str = task["user_id"]
        self.history: list[str] = list(task["history_item_ids"])
        self.candidates: list[str] = list(task["candidate_item_ids"])
        self.labels: dict[str, str] = {}
        self.label_of: dict[str, str] = {}
        self.use_label_style(label_style)
        self.budget = output_budget_chars
        self._view: UserView | None = None
        self._history_set: set[str] | None = None
        self._history_codes: np.ndarray | None = None
        self._functions: list[Callable] | None = None

    # ============================================================ the tools
    # Docstrings become the schemas in every prompt: keep them short (tests/test_prompt_budget.py).
    def get_user_profile(self) -> str:
        """The user's profile: history length, top categories, ratings, recent versus earlier taste."""
        return self.call("get_user_profile", {}).output

    def search_user_history(self, query: str = "", limit: int = 10) -> str:
        """The user's past items, newest first, optionally matching a query (limit 1-50).

        Args:
            query: Words to match; empty lists all.
            limit: Items to list (1-50).
        """
        return self.call("search_user_history", {"query": query, "limit": limit}).output

    def get_item_info(self, item_ids: list[str]) -> str:
        """Details of 1-10 items (candidate labels or item ids): title, categories, creator, ratings.

        Args:
            item_ids: Candidate labels or item ids (1-10).
        """
        return self.call("get_item_info", {"item_ids": item_ids}).output

    def search_items(self, query: str, limit: int = 5) -> str:
        """Search the catalog by title, genre or artist words (limit 1-20).

        Args:
            query: Title, genre or artist words.
            limit: Results (1-20).
        """
        return self.call("search_items", {"query": query, "limit": limit}).output

    def find_similar_users(self, limit: int = 5) -> str:
        """The most similar users, and which candidates they have (limit 1-20).

        Args:
            limit: Users (1-20).
        """
        return self.call("find_similar_users", {"limit": limit}).output

    def get_related_items(self, item_id: str, limit: int = 5) -> str:
        """Items most often consumed together with an item (label or id; limit 1-20).

        Args:
            item_id: A candidate label or item id.
            limit: Items (1-20).
        """
        return self.call("get_related_items", {"item_id": item_id, "limit": limit}).output

    def score_candidates(self, weights: dict[str, float] | None = None) -> str:
        """Rank all candidates by a weighted sum of z-scored signals: bprmf, itemknn (co-occurrence), recent (last 5 items), sasrec (sequence), popularity, neighbours (similar users); e.g. {"sasrec": 1, "bprmf": 0.5}.

        Args:
            weights: Weight per signal, e.g. {"sasrec": 1, "bprmf": 0.5}.
        """
        return self.call("score_candidates", {"weights": weights}).output

    # ========================================================= public API
    def use_label_style(self, style: str) -> None:
        """Label the candidates in ``style`` (``letters`` or ``numbered``; see ``agent/labels.py``)."""
        self.labels = dict(zip(candidate_labels(len(self.candidates), style), self.candidates))
        self.label_of = {item: label for label, item in self.labels.items()}

    def functions(self) -> list[Callable[..., str]]:
        """The tools as plain functions (typed, documented, never raising) for TRL ``tools=``."""
        if self._functions is None:
            self._functions = [self._safe_function(name) for name in TOOL_NAMES]
        return list(self._functions)

    def schemas(self) -> list[dict]:
        """OpenAI function-calling schemas: ``{"type": "function", "function": {...}}``
        (``transformers.utils.get_json_schema`` of each function, without ``return`` and without
        parameter descriptions: every prompt carries them, and the function descriptions say enough)."""
        global _SCHEMAS
        if _SCHEMAS is None:
            from transformers.utils import get_json_schema

            _SCHEMAS = []
            for fn in self.functions():
                schema = get_json_schema(fn)
                schema["function"].pop("return", None)
                for spec in schema["function"]["parameters"]["properties"].values():
                    spec.pop("description", None)  # the function's description says it: shorter prompts
                _SCHEMAS.append(schema)
        return copy.deepcopy(_SCHEMAS)

    def candidate_lines(self) -> list[str]:
        """One compact line per candidate, e.g. ``"C: Toy Story (1995) | Animation, Comedy"``."""
        catalog = self.indexes.catalog
        return [f"{label}: {catalog.line(item)}" for label, item in self.labels.items()]

    def call(self, name: str, arguments: dict | str | None = None) -> ToolResult:
        """Run tool ``name`` with ``arguments`` (a dict or a JSON object string); never raises."""
        try:
            if not isinstance(name, str) or name not in TOOL_GROUPS:
                raise ToolError("unknown_tool", f"unknown tool {name!r}; available tools: {', '.join(TOOL_NAMES)}")
            kwargs = self._validate(name, _parse_arguments(arguments))
            header, lines, *more = getattr(self, f"_run_{name}")(**kwargs)
            return ToolResult(True, fit_to_budget(header, lines, self.budget, *more))
        except ToolError as err:
            return ToolResult(False, clip(f"Error: {err}", self.budget), err.kind)
        except Exception as err:  # a bug must not crash an agent rollout
            return ToolResult(False, clip(f"Error: internal error in {name}: {type(err).__name__}: {err}",
                                          self.budget), "internal")

    # ==================================================== argument checks
    def _safe_function(self, name: str) -> Callable[..., str]:
        method = getattr(Toolbox, name)
        params, hints = _spec(name)
        names = list(params)

        def tool(*args, **kwargs) -> str:
            if len(args) > len(names):
                return self.call(name, {"_positional": list(args)}).output
            return self.call(name, {**dict(zip(names, args)), **kwargs}).output

        tool.__name__ = tool.__qualname__ = name
        tool.__doc__ = method.__doc__
        # read by inspect.signature (and so by the tool schema)
        tool.__signature__ = inspect.Signature(list(params.values()), return_annotation=str)  # type: ignore[attr-defined]
        tool.__annotations__ = dict(hints)
        return tool

    def _validate(self, name: str, args: dict) -> dict:
        params, hints = _spec(name)
        expected = ", ".join(f"{p} ({_type_name(hints[p])})" for p in params) or "no arguments"
        args = dict(args)
        if "user_id" in args and "user_id" not in params:
            if str(args.pop("user_id")) != self.user_id:
                raise ToolError("forbidden_user", "tools only describe the current user; other users' data "
                                "is not available (leave out user_id)")
        unknown = [k for k in args if k not in params]
        if unknown:
            raise ToolError("bad_arguments", f"{name} got unexpected arguments {unknown}; it takes {expected}")
        missing = [p for p, spec in params.items() if spec.default is inspect.Parameter.empty and p not in args]
        if missing:
            raise ToolError("bad_arguments", f"{name} is missing required arguments {missing}; it takes {expected}")
        for key, value in args.items():
            args[key] = _check_type(name, key, value, hints[key], list(self.labels)[:2] or ["A", "B"])
        return args

    def _resolve(self, ref: str) -> str:
        key = ref.strip()
        if key.upper() in self.labels:
            return self.labels[key.upper()]
        if key in self.indexes.catalog.index:
            return key
        labels = list(self.labels)
        if looks_like_label(key, labels):
            raise ToolError("unknown_item", f"no candidate {key}; candidates are {label_range(labels)}")
        raise ToolError("unknown_item", f"unknown item {ref!r}; use a candidate label ({label_range(labels)}) "
                        "or an item id from a tool output")

    def _resolve_list(self, item_ids: list[str], max_items: int) -> list[str]:
        if not item_ids:
            raise ToolError("empty_list", "item_ids is empty; give at least one candidate label or item id")
        resolved = list(dict.fromkeys(self._resolve(ref) for ref in item_ids))
        if len(resolved) > max_items:
            raise ToolError("too_many_items", f"{len(resolved)} items given; at most {max_items} per call")
        return resolved

    @staticmethod
    def _check_limit(limit: int, maximum: int) -> int:
        if not 1 <= limit <= maximum:
            raise ToolError("bad_arguments", f"limit must be between 1 and {maximum}, got {limit}")
        return limit

    # ========================================================== helpers
    def ref(self, item_id: str) -> str:
        """How outputs name an item: its candidate label, else its id."""
        return self.label_of.get(item_id, item_id)

    def user_view(self) -> UserView:
        """The task user's history, with ratings and dates from the index when it matches."""
        if self._view is None:
            stored = self.indexes.profiles.history(self.user_id)
            if stored is not None and stored[0] == self.history:
                self._view = UserView(stored[0], stored[1].tolist(), stored[2].tolist(), True)
            else:
                self._view = UserView(self.history, [math.nan] * len(self.history), None, False)
        return self._view

    def history_codes(self) -> np.ndarray:
        """Catalog codes of the history items (-1 for items missing from the catalog)."""
        if self._history_codes is None:
            index = self.indexes.catalog.index
            self._history_codes = np.array([index.get(i, -1) for i in self.history], dtype=np.int64)
        return self._history_codes

    def in_history(self, item_id: str) -> bool:
        if self._history_set is None:
            self._history_set = set(self.history)
        return item_id in self._history_set

    def profile(self) -> dict:
        """The stored profile when it belongs to exactly this history, else computed now."""
        view = self.user_view()
        stored = self.indexes.profiles.profile(self.user_id) if view.from_index else None
        if stored is not None and stored["history_crc"] == history_crc(self.history) \
                and stored["n_items"] == len(self.history):
            return stored
        return compute_profile(view.items, view.ratings, view.timestamps,
                               self.indexes.catalog.categories_of,
                               self.indexes.profiles.demographics(self.user_id))

    def history_lines(self, query: str, limit: int | None) -> tuple[str, list[str], int]:
        """Header, one line per shown item (newest first) and the number of matches not shown."""
        view = self.user_view()
        catalog = self.indexes.catalog
        n = len(view.items)
        if query.strip():
            codes = self.history_codes()
            scores = np.append(catalog.bm25.scores(query), 0.0)  # code -1 (not in catalog) scores 0
            order = np.flatnonzero(scores[codes] > 0)[::-1].tolist()
        else:
            order = list(range(n - 1, -1, -1))
        if not order:
            if n == 0:
                return "The current user has no history.", [], 0
            return (f"No history items match {query!r} ({n} items in history); "
                    "try other words or an empty query.", [], 0)
        shown = order if limit is None else order[:limit]
        times = view.timestamps
        lines = [f"- {date(times[k] if times else None)} {stars(view.ratings[k])} "
                 f"{view.items[k]}: {catalog.line(view.items[k])}" for k in shown]
        if query.strip():
            header = f"History items matching {query!r}: {len(order)} of {n}, newest first:"
        else:
            header = f"History of the current user: {n} items, newest first (date, rating, item):"
        return header, lines, len(order) - len(shown)

    # ====================================================== implementations
    def _run_get_user_profile(self):
        lines = render_profile(self.profile())
        return lines[0], lines[1:]

    def _run_search_user_history(self, query: str = "", limit: int = 10):
        return self.history_lines(query, self._check_limit(limit, MAX_HISTORY_LIMIT))

    def _run_get_item_info(self, item_ids: list[str]):
        items = self._resolve_list(item_ids, MAX_INFO_ITEMS)
        lines = []
        for item in items:
            line = f"{self.ref(item)}: {self.indexes.catalog.details(item)}"
            lines.append(line + (" | in the user's history" if self.in_history(item) else ""))
        return "", lines

    def _run_search_items(self, query: str, limit: int = 5):
        limit = self._check_limit(limit, MAX_LIMIT)
        if not query.strip():
            raise ToolError("bad_arguments", "query is empty; give keywords such as a title, genre or artist")
        catalog = self.indexes.catalog
        codes = catalog.search(query, limit)
        if not codes:
            return f"No catalog items match {query!r}.", []
        lines = []
        for k in codes:
            item = catalog.item_ids[k]
            mark = " [in the user's history]" if self.in_history(item) else ""
            lines.append(f"- {self.ref(item)}: {catalog.line(item)} | {int(catalog.popularity[k])} ratings{mark}")
        return f"Catalog matches for {query!r}, best first:", lines

    def _run_find_similar_users(self, limit: int = 5):
        limit = self._check_limit(limit, MAX_LIMIT)
        similar, catalog = self.indexes.similar_users, self.indexes.catalog
        neighbours = similar.neighbours(self.user_id, self.history, limit)
        if not neighbours:
            return "No similar users found (no overlap with any other user's history).", []
        candidate_codes = np.array([similar.item_index.get(c, -1) for c in self.candidates])
        hits = np.zeros(len(self.candidates), np.int64)
        lines = []
        for rank, (v, cos, overlap) in enumerate(neighbours, start=1):
            hits += np.isin(candidate_codes, similar.row_codes(v), assume_unique=True)
            liked = [(i, r) for i, r in similar.liked(v) if not self.in_history(i)][:LIKED_SHOWN]
            shown = "; ".join(f"{self.ref(i)} {catalog.title(i, 30)} ({stars(r)})" for i, r in liked)
            lines.append(f"- U{rank}: cosine {cos:.2f}, {overlap} shared items; liked: {shown or 'nothing new'}")
        ranked = sorted((-int(n), k) for k, n in enumerate(hits) if n > 0)
        labels = list(self.labels)
        summary = ", ".join(f"{labels[k]} ({-n} of {len(neighbours)})" for n, k in ranked)
        header = (f"{len(neighbours)} most similar users (cosine over shared items; the current user has "
                  f"{len(set(self.history))} items).\nCandidates in their histories: {summary or 'none'}")
        return header, lines

    def _run_get_related_items(self, item_id: str, limit: int = 5):
        limit = self._check_limit(limit, MAX_LIMIT)
        item = self._resolve(item_id)
        catalog = self.indexes.catalog
        name = f"{self.ref(item)} ({catalog.title(item)})"
        related = self.indexes.relations.related(item, limit)
        if related is None:
            return f"No co-occurrence data for {name}: no user in the training data interacted with it.", []
        if not related:
            return f"No item co-occurs often enough with {name}.", []
        lines = []
        for other, cos, count in related:
            mark = " [in the user's history]" if self.in_history(other) else ""
            lines.append(f"- {self.ref(other)}: {catalog.line(other)} | {count} users, cosine {cos:.2f}{mark}")
        return f"Items most often consumed together with {name}:", lines

    def _run_score_candidates(self, weights: dict[str, float] | None = None):
        weights = self.signal_weights(weights)
        scores = self.fused_scores(weights)
        lines = format_score_lines(list(self.labels), scores)
        return f"Scores ({weight_mix(weights)}), best first:", lines

    def signal_weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        """Checked ``score_candidates`` weights (default ``{"bprmf": 1}``); zero weights dropped."""
        if not weights:
            return {"bprmf": 1.0}
        available = available_signals(self.indexes)
        unknown = [name for name in weights if name not in available]
        if unknown:
            raise ToolError("bad_arguments", f"unknown signals {unknown}; signals: {', '.join(available)}")
        bad = [weights[name] for name, w in weights.items() if not math.isfinite(w) or abs(w) > MAX_WEIGHT]
        if bad:
            raise ToolError("bad_arguments", f"weights must be between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}, not {bad}")
        kept = {name: float(w) for name, w in weights.items() if w}
        if not kept:
            raise ToolError("bad_arguments", "every weight is 0; give at least one signal a non-zero weight")
        return kept

    def fused_scores(self, weights: Mapping[str, float]) -> np.ndarray:
        """The fused score of every candidate (``tools/signals.py``), as ``score_candidates`` shows it."""
        return fused_scores(self.indexes, weights, self.user_id, self.history, self.candidates)


def weight_mix(weights: Mapping[str, float]) -> str:
    """``3 sasrec + 1.4 bprmf - 0.6 popularity``."""
    terms = [f"{'-' if w < 0 else '+'} {abs(w):g} {name}" for name, w in weights.items()]
    return " ".join(terms).removeprefix("+ ")


@functools.cache
def _spec(name: str) -> tuple[dict[str, inspect.Parameter], dict[str, type]]:
    """The parameters (without ``self``) and type hints of tool ``name``."""
    method = getattr(Toolbox, name)
    params = {p.name: p for p in inspect.signature(method).parameters.values() if p.name != "self"}
    hints = {k: v for k, v in typing.get_type_hints(method).items() if k != "self"}
    return params, hints


def _parse_arguments(arguments) -> dict:
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        if not arguments.strip():
            return {}
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise ToolError("bad_json", f"arguments are not valid JSON ({err.msg} at position {err.pos}); "
                            'expected a JSON object such as {"item_ids": ["A", "B"]}') from None
    if not isinstance(arguments, Mapping):
        raise ToolError("bad_arguments", f"arguments must be a JSON object, got {type(arguments).__name__}")
    return dict(arguments)


def _type_name(tp) -> str:
    names = {str: "string", int: "integer", list[str]: "list of strings", dict[str, float]: "object of numbers"}
    return names.get(_optional_inner(tp), str(tp))


def _optional_inner(tp):
    """``X`` for ``X | None``, else ``tp``."""
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return tp


def _check_type(tool: str, key: str, value, tp, labels: list[str]):
    if value is None and _optional_inner(tp) is not tp:
        return value
    tp = _optional_inner(tp)
    if tp == dict[str, float] and isinstance(value, Mapping) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in value.items()):
        return {k: float(v) for k, v in value.items()}
    if tp is str and isinstance(value, str):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp == list[str] and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    example = {str: json.dumps(labels[0]), int: "5", list[str]: json.dumps(labels),
               dict[str, float]: '{"bprmf": 1}'}.get(tp, "")
    raise ToolError("wrong_type", f"{tool}: {key} must be a {_type_name(tp)} (e.g. {example}), "
                    f"got {type(value).__name__} {clip(json.dumps(value, default=str), 60)}")
