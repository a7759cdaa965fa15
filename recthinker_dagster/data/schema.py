"""The normalized schema every loader produces.

One schema for every source, so the protocol, the tools and the agent never care where
the data came from. Identifiers are strings (MovieLens ids, Amazon ASINs and reviewer ids
all fit). Documented for users in ``docs/artifacts.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

import polars as pl
from polars.datatypes import DataTypeClass

from recthinker_dagster.data.notes import CleaningNote

FrameSchema: TypeAlias = dict[str, pl.DataType | DataTypeClass]
"""Column name -> polars dtype: a dtype class (``pl.Utf8``) or instance (``pl.List(pl.Utf8)``)."""

INTERACTIONS_SCHEMA: FrameSchema = {
    "user_id": pl.Utf8,
    "item_id": pl.Utf8,
    "rating": pl.Float32,  # explicit rating, 1-5 on both datasets
    "timestamp": pl.Int64,  # unix seconds
    "order": pl.Int64,  # 0-based row position in the source file; breaks timestamp ties
}

ITEMS_SCHEMA: FrameSchema = {
    "item_id": pl.Utf8,
    "title": pl.Utf8,  # null when unknown
    "year": pl.Int32,  # release year, null when unknown
    "categories": pl.List(pl.Utf8),  # genres (ML-1M) or categories (Amazon); may be empty
    "creator": pl.Utf8,  # artist or brand (Amazon); null when unknown
    "description": pl.Utf8,  # free text, null when unknown
    "has_metadata": pl.Boolean,  # True only with a non-empty title (after cleaning)
}

USERS_SCHEMA: FrameSchema = {
    "user_id": pl.Utf8,
    "gender": pl.Utf8,  # "M" / "F" or null
    "age": pl.Int32,  # ML-1M age bracket lower bound (1, 18, 25, 35, 45, 50, 56) or null
    "occupation": pl.Utf8,  # occupation name or null
    "zip_code": pl.Utf8,
    "has_demographics": pl.Boolean,
}

RATING_RANGE = (1.0, 5.0)


@dataclass
class Dataset:
    """One dataset in the normalized schema, plus where it came from."""

    name: str
    interactions: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame
    source: dict[str, str] = field(default_factory=dict)  # file role -> path or description
    notes: list[CleaningNote] = field(default_factory=list)  # what reading changed (BOMs, encodings)


def empty_frame(schema: FrameSchema) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def conform(frame: pl.DataFrame, schema: FrameSchema) -> pl.DataFrame:
    """Select and cast ``frame`` to exactly ``schema`` (column order included)."""
    missing = [name for name in schema if name not in frame.columns]
    if missing:
        raise ValueError(f"frame is missing columns {missing}; has {frame.columns}")
    return frame.select([pl.col(name).cast(dtype) for name, dtype in schema.items()])
