"""Cleaning notes: what the loaders and the cleaning changed, each with a count and examples.

Every action that alters the data as read (a byte-order mark stripped, duplicates dropped,
placeholder rows added, a k-core removal, ...) yields one :class:`CleaningNote`. Its count is
also a statistic under ``note.action``; the notes themselves travel in the statistics as plain
dicts under ``stats["cleaning_notes"]`` (JSON-ready), and :func:`notes_of` turns them back
into notes, so the ingest stage can log one warning line per action.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import polars as pl

N_EXAMPLES = 3  # examples shown per note
NOTES_KEY = "cleaning_notes"
WARNINGS_KEY = "warnings"  # other data-quality warnings (lines), e.g. low metadata coverage


@dataclass(frozen=True)
class CleaningNote:
    """One cleaning action: ``count`` changes, a few ``examples``, and what was done."""

    action: str  # the statistic's name, e.g. "duplicate_interactions_dropped"
    count: int
    examples: tuple[str, ...]
    description: str  # what was done and why, in words

    @property
    def message(self) -> str:
        """The warning line: description, count and examples."""
        shown = "; ".join(self.examples)
        return f"{self.description}: {self.count}" + (f" (e.g. {shown})" if shown else "")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "examples": list(self.examples), "message": self.message}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CleaningNote:
        return cls(str(data["action"]), int(data["count"]), tuple(data["examples"]), str(data["description"]))


def examples(values: Iterable[Any], n: int = N_EXAMPLES) -> tuple[str, ...]:
    """The first ``n`` values as strings (a polars Series or any iterable)."""
    shown = []
    for value in values:
        shown.append(str(value))
        if len(shown) == n:
            break
    return tuple(shown)


def row_examples(frame: pl.DataFrame, columns: list[str], n: int = N_EXAMPLES) -> tuple[str, ...]:
    """The first ``n`` rows of ``frame`` as ``col=value`` strings over ``columns``."""
    rows = frame.head(n).select(columns).iter_rows()
    return tuple(", ".join(f"{c}={v}" for c, v in zip(columns, row)) for row in rows)


def add_note(notes: list[CleaningNote], action: str, count: int, shown: tuple[str, ...], description: str) -> None:
    """Append a note when ``count`` is positive (nothing happened otherwise)."""
    if count > 0:
        notes.append(CleaningNote(action, int(count), shown, description))


def notes_of(stats: Mapping[str, Any]) -> list[CleaningNote]:
    """The notes recorded in ``stats`` (see the module docstring); empty when none."""
    return [CleaningNote.from_dict(d) for d in stats.get(NOTES_KEY, [])]


def warning_lines(stats: Mapping[str, Any]) -> list[str]:
    """One warning line per cleaning note and per other warning in ``stats``, prefixed with
    the dataset name: what the ingest stage logs as warnings."""
    prefix = f"{stats['dataset']}: " if "dataset" in stats else ""
    lines = [note.message for note in notes_of(stats)] + list(stats.get(WARNINGS_KEY, []))
    return [prefix + line for line in lines]
