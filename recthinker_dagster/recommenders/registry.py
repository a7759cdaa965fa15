"""Baselines by name: ``make_recommender("itemknn", shrink=10)``, ``load_recommender(name, folder)``.

BPR-MF (``recommenders/bprmf.py``, torch) and the ``implicit`` library models
(``recommenders/implicit_models.py``: ``implicit_bpr``, ``implicit_als``, ``implicit_itemknn``)
are imported lazily, so the other baselines work without them; ``available_baselines()``
lists the names whose module imports. ``BASELINES`` holds the project's own five (the
evaluation's classical systems); ``LIBRARY_BASELINES`` the library ones, for comparison.
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


class LazyImplicit(LazyClass):
    """One ``implicit`` model kind (``bpr``, ``als``, ``itemknn``); needs the package installed."""

    def __init__(self, kind: str) -> None:
        super().__init__("recthinker_dagster.recommenders.implicit_models", "ImplicitRecommender")
        self.kind = kind

    def resolve(self) -> type[Any]:
        importlib.import_module("implicit")  # an ImportError here: the library is not installed
        return super().resolve()

    def __call__(self, **params: Any) -> Recommender:
        return self.resolve()(kind=self.kind, **params)


BASELINES: dict[str, Any] = {
    "random": RandomRecommender,
    "popularity": Popularity,
    "itemknn": ItemKNN,
    "bprmf": LazyBPRMF("recthinker_dagster.recommenders.bprmf", "BPRMF"),
    "sasrec": SASRec,
}
LIBRARY_BASELINES: dict[str, Any] = {f"implicit_{kind}": LazyImplicit(kind) for kind in ("bpr", "als", "itemknn")}


def _entry(name: str):
    known = {**BASELINES, **LIBRARY_BASELINES}
    if name not in known:
        raise ValueError(f"unknown recommender {name!r}; known: {', '.join(known)}")
    return known[name]


def make_recommender(name: str, **params: Any) -> Recommender:
    """A new, unfitted recommender ``name`` built with ``params``."""
    return _entry(name)(**params)


def load_recommender(name: str, folder: Path) -> Recommender:
    """Recommender ``name`` as saved by its ``save(folder)``."""
    return _entry(name).load(Path(folder))


def available_baselines(library: bool = False) -> list[str]:
    """Names in ``BASELINES`` (and ``LIBRARY_BASELINES`` when ``library``) whose class imports now."""
    names = []
    for name, entry in {**BASELINES, **(LIBRARY_BASELINES if library else {})}.items():
        try:
            if isinstance(entry, LazyClass):
                entry.resolve()
        except ImportError:
            continue
        names.append(name)
    return names
