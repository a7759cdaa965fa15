"""Baselines by name: ``make_recommender("itemknn", shrink=10)``, ``load_recommender(name, folder)``.

BPR-MF is imported lazily (``recommenders/bprmf.py``), so the other baselines work
without it; ``available_baselines()`` lists the names whose module imports.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from recthinker_dagster.recommenders.base import Recommender
from recthinker_dagster.recommenders.itemknn import ItemKNN
from recthinker_dagster.recommenders.popularity import Popularity
from recthinker_dagster.recommenders.random_rec import RandomRecommender
from recthinker_dagster.recommenders.sasrec import SASRec


class LazyClass:
    """Stands in for a class that is imported on first use (call it, or ``.load`` from it)."""

    def __init__(self, module: str, attribute: str) -> None:
        self.module, self.attribute = module, attribute

    def resolve(self) -> type[Any]:
        return getattr(importlib.import_module(self.module), self.attribute)

    def __call__(self, **params: Any) -> Recommender:
        return self.resolve()(**params)

    def load(self, folder: Path) -> Recommender:
        return self.resolve().load(folder)

    def __repr__(self) -> str:
        return f"LazyClass({self.module}.{self.attribute})"


class LazyBPRMF(LazyClass):
    """BPR-MF takes its hyperparameters as ``config=BPRConfig(...)``; plain keyword
    parameters (``dim=32``) are wrapped into one."""

    def __call__(self, **params: Any) -> Recommender:
        module = importlib.import_module(self.module)
        if params and "config" not in params and hasattr(module, "BPRConfig"):
            params = {"config": module.BPRConfig(**params)}
        return self.resolve()(**params)


BASELINES: dict[str, Any] = {
    "random": RandomRecommender,
    "popularity": Popularity,
    "itemknn": ItemKNN,
    "bprmf": LazyBPRMF("recthinker_dagster.recommenders.bprmf", "BPRMF"),
    "sasrec": SASRec,
}


def _entry(name: str):
    if name not in BASELINES:
        raise ValueError(f"unknown recommender {name!r}; known: {', '.join(BASELINES)}")
    return BASELINES[name]


def make_recommender(name: str, **params: Any) -> Recommender:
    """A new, unfitted recommender ``name`` built with ``params``."""
    return _entry(name)(**params)


def load_recommender(name: str, folder: Path) -> Recommender:
    """Recommender ``name`` as saved by its ``save(folder)``."""
    return _entry(name).load(Path(folder))


def available_baselines() -> list[str]:
    """Names in ``BASELINES`` whose class can be imported now."""
    names = []
    for name, entry in BASELINES.items():
        try:
            if isinstance(entry, LazyClass):
                entry.resolve()
        except ImportError:
            continue
        names.append(name)
    return names
