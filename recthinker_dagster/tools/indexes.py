"""The five tool indexes together: :class:`ToolIndexes` and :func:`build_all`.

Folder layout (one folder per index, any parent; ``ToolIndexes.save(root)`` uses
``root/<name>``):

============== ========================================================================
``catalog``    ``items.parquet``, ``bm25.npz``, ``catalog.json``        (ItemCatalog)
``profiles``   ``profiles.json``, ``histories.npz``                    (UserProfiles)
``bprmf``      ``bprmf.npz``, ``bprmf.json``                           (BPRMF)
               ``itemknn/`` (ItemKNN) and ``sasrec/`` (SASRec): the other scorers
               behind ``score_candidates`` (``tools/signals.py``), absent in suites built
               before them (their signals are then unavailable)
``relations``  ``relations.npz``, ``relations.json``                   (ItemRelations)
``similar_users`` ``similar_users.npz``, ``similar_users.json``        (SimilarUsers)
============== ========================================================================
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import polars as pl

from recthinker_dagster.recommenders.bprmf import BPRMF, BPRConfig
from recthinker_dagster.recommenders.itemknn import ItemKNN
from recthinker_dagster.recommenders.sasrec import SASRec
from recthinker_dagster.tools.catalog import ItemCatalog
from recthinker_dagster.tools.profiles import UserProfiles
from recthinker_dagster.tools.relations import ItemRelations
from recthinker_dagster.tools.similar_users import SimilarUsers

INDEX_NAMES = ("catalog", "profiles", "bprmf", "relations", "similar_users")


@dataclass(frozen=True)
class ToolIndexConfig:
    """Every knob of the tool indexes."""

    bm25_k1: float = 1.2
    bm25_b: float = 0.75
    bpr: BPRConfig = field(default_factory=BPRConfig)
    relations_k: int = 20
    relations_min_count: int = 2
    similar_users_k: int = 20
    liked_per_user: int = 10
    itemknn_neighbors: int = 100
    sasrec_train_windows: int = 50_000  # training sequences SASRec sees (sets its epochs); 0: no SASRec
    sasrec_seed: int = 2026

    @classmethod
    def from_dict(cls, values: Mapping | None) -> ToolIndexConfig:
        """From plain values; ``bpr`` may be a dict, and ``bpr_<field>`` keys set BPR fields."""
        values = dict(values or {})
        bpr = values.pop("bpr", None) or {}
        bpr = asdict(bpr) if isinstance(bpr, BPRConfig) else dict(bpr)
        bpr_fields = {f.name for f in fields(BPRConfig)}
        for key in [k for k in values if k.startswith("bpr_") and k[4:] in bpr_fields]:
            bpr[key[4:]] = values.pop(key)
        return cls(bpr=BPRConfig(**bpr), **values)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ToolIndexes:
    catalog: ItemCatalog
    profiles: UserProfiles
    bprmf: BPRMF
    relations: ItemRelations
    similar_users: SimilarUsers
    itemknn: ItemKNN | None = None  # saved in the bprmf folder (the cf_model asset)
    sasrec: SASRec | None = None  # ditto
    build_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, folders: Mapping[str, Path | str]) -> ToolIndexes:
        """Load from ``{name: folder}`` for every name in ``INDEX_NAMES``."""
        missing = [n for n in INDEX_NAMES if n not in folders]
        if missing:
            raise ValueError(f"no folder given for indexes {missing}; need {list(INDEX_NAMES)}")
        scorers = Path(folders["bprmf"])
        return cls(
            catalog=ItemCatalog.load(Path(folders["catalog"])),
            profiles=UserProfiles.load(Path(folders["profiles"])),
            bprmf=BPRMF.load(scorers),
            relations=ItemRelations.load(Path(folders["relations"])),
            similar_users=SimilarUsers.load(Path(folders["similar_users"])),
            itemknn=ItemKNN.load(scorers / "itemknn") if (scorers / "itemknn").is_dir() else None,
            sasrec=SASRec.load(scorers / "sasrec") if (scorers / "sasrec").is_dir() else None,
        )

    def save(self, root: Path) -> dict[str, Path]:
        """Save each index under ``root/<name>``; returns ``{name: folder}``."""
        folders = folders_under(root)
        for name, folder in folders.items():
            self.save_index(name, folder)
        return folders

    def save_index(self, name: str, folder: Path) -> None:
        """Save index ``name`` into ``folder`` (``bprmf``: with the other scorers in subfolders)."""
        getattr(self, name).save(folder)
        if name == "bprmf":
            for scorer in ("itemknn", "sasrec"):
                if (model := getattr(self, scorer)) is not None:
                    model.save(Path(folder) / scorer)


def folders_under(root: Path | str) -> dict[str, Path]:
    return {name: Path(root) / name for name in INDEX_NAMES}


def build_all(
    index_interactions: pl.DataFrame,
    items: pl.DataFrame,
    users: pl.DataFrame | None,
    valid_tasks: pl.DataFrame | None,
    config: ToolIndexConfig | Mapping | None = None,
    *,
    monitor: Callable[[str], AbstractContextManager] | None = None,
) -> ToolIndexes:
    """Build the five indexes from the index interactions (see ``index_interactions``);
    BPR-MF is evaluated on ``valid_tasks`` (its ``validation_metrics``). ``monitor(name)``,
    if given, is a context manager entered around each index's build (e.g. to measure it)."""
    if not isinstance(config, ToolIndexConfig):
        config = ToolIndexConfig.from_dict(config)
    seconds: dict[str, float] = {}

    def timed(name, fn):
        with monitor(name) if monitor else nullcontext():
            start = time.perf_counter()
            out = fn()
            seconds[name] = time.perf_counter() - start
        return out

    catalog = timed("catalog", lambda: ItemCatalog.build(items, index_interactions, k1=config.bm25_k1,
                                                         b=config.bm25_b))
    profiles = timed("profiles", lambda: UserProfiles.build(index_interactions, items, users))

    def bpr():
        model = BPRMF(config.bpr).fit(index_interactions)
        if valid_tasks is not None and valid_tasks.height:
            model.evaluate(valid_tasks, seed=config.bpr.seed)
        return model

    bprmf = timed("bprmf", bpr)
    itemknn = timed("itemknn", lambda: ItemKNN(neighbors=config.itemknn_neighbors).fit(index_interactions))
    sasrec = timed("sasrec", lambda: SASRec(train_windows=config.sasrec_train_windows, seed=config.sasrec_seed)
                   .fit(index_interactions)) if config.sasrec_train_windows > 0 else None
    relations = timed("relations", lambda: ItemRelations.build(
        index_interactions, k=config.relations_k, min_count=config.relations_min_count))
    similar = timed("similar_users", lambda: SimilarUsers.build(
        index_interactions, k=config.similar_users_k, n_liked=config.liked_per_user))
    return ToolIndexes(catalog, profiles, bprmf, relations, similar, itemknn=itemknn, sasrec=sasrec,
                       build_seconds=seconds)
