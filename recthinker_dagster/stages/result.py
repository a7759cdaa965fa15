"""What a stage hands to whoever publishes it: the finished folder and its figures.

A stage function builds its artifact folder (atomically, see ``storage.staged_directory``)
and returns a :class:`StageArtifact` per folder. The orchestration layer versions the
folder (DVC), logs the figures (MLflow) and shows the metadata (Dagster); a script may
just print them. Metadata values are plain scalars, or :class:`Markdown`, :class:`Json`
or a :class:`~pathlib.Path` (shown relative to the project root).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Markdown(str):
    """A metadata value to render as Markdown."""


@dataclass(frozen=True)
class Json:
    """A metadata value to render as JSON."""

    value: Any


@dataclass
class StageArtifact:
    folder: Path
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)  # small files logged next to the run
    series: dict[str, list[float]] = field(default_factory=dict)  # per-step curves
    artifacts: dict[str, Path] = field(default_factory=dict)  # files or folders logged with the run
    cleanup: tuple[Path, ...] = ()  # work files and folders to delete once the artifact is published
