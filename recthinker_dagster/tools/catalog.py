"""The item catalog: metadata, popularity and average rating, and BM25 text search.

Popularity and average rating count the index interactions only (see the package
docstring), so they never include any task's target interaction.

Files: ``items.parquet`` (the items schema plus ``popularity`` Int32 and ``avg_rating``
Float32, null when unrated), ``bm25.npz`` (the search index) and ``catalog.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from recthinker_dagster.tools.formatting import clip
from recthinker_dagster.tools.store import prepare, read_json, write_json
from recthinker_dagster.tools.text import BM25, normalize

UNKNOWN_TITLE = "unknown title"
MAX_CATEGORIES = 4  # shown in compact lines
TITLE_CHARS = 60
DESCRIPTION_CHARS = 160


class ItemCatalog:
    """Item metadata and statistics, addressed by item id or by 0-based code (row)."""

    def __init__(self, table: pl.DataFrame, bm25: BM25, meta: dict | None = None):
        self.table = table
        self.bm25 = bm25
        self.meta = meta or {}
        self.item_ids: list[str] = table["item_id"].to_list()
        self.index = {item: k for k, item in enumerate(self.item_ids)}
        self.popularity = table["popularity"].to_numpy().astype(np.int64)
        self.avg_rating = table["avg_rating"].fill_null(np.nan).to_numpy().astype(np.float64)
        self.categories: list[list[str]] = [c or [] for c in table["categories"].to_list()]
        self.titles: list[str | None] = table["title"].to_list()
        self.creators: list[str | None] = table["creator"].to_list()
        self.has_metadata: list[bool] = table["has_metadata"].to_list()
        rows = table.select("title", "year", "categories", "creator", "description",
                            "has_metadata").iter_rows()
        self._lines, self._descriptions = [], []
        for title, year, cats, creator, description, has_meta in rows:
            self._lines.append(_compact(title, year, cats or [], creator, has_meta))
            self._descriptions.append(clip(description, DESCRIPTION_CHARS) if description else "")
        self._exact: dict[str, list[int]] = {}
        for k, (title, year) in enumerate(zip(self.titles, table["year"].to_list())):
            keys = {normalize(title), normalize(f"{title} {year}")} if title else set()
            for key in keys - {""}:
                self._exact.setdefault(key, []).append(k)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, items: pl.DataFrame, interactions: pl.DataFrame, *, k1: float = 1.2,
              b: float = 0.75) -> ItemCatalog:
        """``items`` in the items schema; ``interactions`` are the index interactions."""
        stats = interactions.group_by("item_id").agg(
            popularity=pl.len().cast(pl.Int32), avg_rating=pl.col("rating").mean().cast(pl.Float32))
        table = (
            items.join(stats, on="item_id", how="left")
            .with_columns(pl.col("popularity").fill_null(0))
            .sort("item_id")
        )
        documents = item_documents(table)
        meta = {"n_items": table.height, "n_interactions": interactions.height,
                "bm25": {"k1": k1, "b": b}}
        return cls(table, BM25.build(documents, k1=k1, b=b), meta)

    def save(self, folder: Path) -> None:
        folder = prepare(folder)
        self.table.write_parquet(folder / "items.parquet")
        self.bm25.save(folder / "bm25.npz")
        write_json(folder / "catalog.json", self.meta)

    @classmethod
    def load(cls, folder: Path) -> ItemCatalog:
        folder = Path(folder)
        return cls(pl.read_parquet(folder / "items.parquet"), BM25.load(folder / "bm25.npz"),
                   read_json(folder / "catalog.json"))

    # ----------------------------------------------------------------- lookup
    def code(self, item_id: str) -> int | None:
        return self.index.get(item_id)

    def categories_of(self, item_id: str) -> list[str]:
        k = self.index.get(item_id)
        return self.categories[k] if k is not None else []

    def line(self, item_id: str) -> str:
        """Compact one-line description: title (year) | categories | by creator."""
        k = self.index.get(item_id)
        return self._lines[k] if k is not None else f"{UNKNOWN_TITLE} (not in catalog)"

    def title(self, item_id: str, limit: int = 40) -> str:
        """The clipped title; else "unknown title", with the creator when known."""
        k = self.index.get(item_id)
        if k is None:
            return UNKNOWN_TITLE
        if title := self.titles[k]:
            return clip(title, limit)
        creator = self.creators[k]
        return f"{UNKNOWN_TITLE} by {clip(creator, limit)}" if creator else UNKNOWN_TITLE

    def details(self, item_id: str) -> str:
        """The compact line plus popularity, average rating and a clipped description."""
        k = self.index[item_id]
        parts = [self._lines[k]]
        if not (self.has_metadata[k] or self.categories[k] or self.creators[k]):
            parts[0] = f"{UNKNOWN_TITLE} (no metadata; known only from interactions)"
        n = int(self.popularity[k])
        parts.append(f"{n} ratings, avg {self.avg_rating[k]:.2f}" if n else "no ratings in training data")
        if self._descriptions[k]:
            parts.append(self._descriptions[k])
        return " | ".join(parts)

    def search(self, query: str, limit: int) -> list[int]:
        """Codes of the best BM25 matches (an exact title match first), ties by popularity then
        code; ``[]`` for an empty query or one without a term in the catalog."""
        scores = self.bm25.scores(query)
        exact = self._exact.get(normalize(query))
        if exact:
            scores[exact] += float(scores.max()) + 1.0
        hits = np.flatnonzero(scores > 0)
        order = np.lexsort((hits, -self.popularity[hits], -scores[hits]))
        return hits[order][:limit].tolist()


def item_documents(table: pl.DataFrame) -> list[str]:
    """The searchable text of each row: title, year, categories, creator and description."""
    return [
        " ".join(str(part) for part in (title, year, " ".join(cats or []), creator, description) if part)
        for title, year, cats, creator, description in table.select(
            "title", "year", "categories", "creator", "description").iter_rows()
    ]


def _compact(title, year, categories, creator, has_metadata) -> str:
    # has_metadata means "has a title"; an untitled row may still name categories or a creator
    if not (has_metadata or categories or creator):
        return f"{UNKNOWN_TITLE} (no metadata)"
    head = clip(title, TITLE_CHARS) if title else UNKNOWN_TITLE
    if year:
        head += f" ({year})"
    parts = [head]
    if categories:
        shown = ", ".join(categories[:MAX_CATEGORIES])
        extra = len(categories) - MAX_CATEGORIES
        parts.append(shown + (f" +{extra}" if extra > 0 else ""))
    if creator:
        parts.append(f"by {clip(creator, 40)}")
    return " | ".join(parts)
