"""Small save/load helpers of the tool indexes: JSON and ``.npz`` (never pickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def write_json(path: Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    np.savez(path, **arrays)  # type: ignore[arg-type]  # the stub takes any keyword for allow_pickle


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def str_array(values) -> np.ndarray:
    """A fixed-width unicode array (saved by ``np.savez`` without pickle)."""
    values = list(values)
    return np.array(values, dtype=str) if values else np.array([], dtype="<U1")


def prepare(folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
