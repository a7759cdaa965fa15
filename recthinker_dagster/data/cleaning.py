"""Source-independent cleaning applied to every loaded dataset.

``clean_dataset`` returns ``(dataset, stats)``; ``stats`` counts what was removed or added.

1. Interactions: drop exact duplicates (same user, item and timestamp), keeping the first
   by ``order``; rows come out sorted by ``order``.
2. Optional iterative k-core: keep users and items with at least ``kcore`` interactions.
3. Items: one row per item id (first metadata row wins), and exactly the interacted items:
   an interacted item without metadata gets a placeholder row (``has_metadata`` False,
   every field null, empty categories); metadata rows of items no interaction mentions
   (the rest of a large Amazon catalog, or items cut by the k-core) are dropped, counted.
4. Item text (title, creator, description, categories): drop HTML tags and leftovers,
   unclosed ones included (the Amazon ``<span id=parentalAdvisory class=...`` titles, a
   stray ``/>``), unescape entities (``&amp;`` -> ``&``), collapse whitespace; empty text
   becomes null.
   ``html_titles_cleaned`` counts titles this changed, ``titles_nulled`` those it emptied.
5. Users: likewise exactly the interacting users; unknown ones get placeholder rows with
   ``has_demographics`` False and null fields.
"""

from __future__ import annotations

import html
from dataclasses import replace

import polars as pl

from recthinker_dagster.data.schema import ITEMS_SCHEMA, USERS_SCHEMA, Dataset, conform

# A tag, closed or not: '<' + letter or '/' or '!' and everything up to '>' or end of text.
_TAG = r"<[A-Za-z/!][^>]*(?:>|$)"
_STRAY_CLOSE = r"\s*/?>\s*$"


def _unescape(text: pl.Series) -> pl.Series:
    """``html.unescape`` on the (few) values that contain '&'."""
    mask = text.str.contains("&", literal=True).fill_null(False)
    if not mask.any():
        return text
    fixed = text.filter(mask).map_elements(html.unescape, return_dtype=pl.Utf8)
    return text.scatter(mask.arg_true(), fixed)


def clean_text(text: pl.Series) -> pl.Series:
    """Remove HTML tags/leftovers and entities, collapse whitespace; empty becomes null."""
    stripped = text.str.replace_all(_TAG, " ").str.replace_all(_STRAY_CLOSE, "")
    stripped = _unescape(stripped).str.replace_all(r"\s+", " ").str.strip_chars()
    return stripped.replace("", None)


_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&#39;": "'", "&apos;": "'",
             "&nbsp;": " "}


def clean_categories(categories: pl.Series) -> pl.Series:
    """Per element: drop tags, decode the common entities, strip; drop empty elements."""
    cleaned = (
        pl.element().str.replace_all(_TAG, " ")
        .str.replace_many(list(_ENTITIES), list(_ENTITIES.values()))
        .str.replace_all(r"\s+", " ").str.strip_chars()
    )
    return categories.list.eval(cleaned.filter(cleaned != ""))


def kcore_filter(interactions: pl.DataFrame, k: int) -> pl.DataFrame:
    """Iteratively keep users and items with at least ``k`` interactions each."""
    frame = interactions
    while True:
        before = frame.height
        frame = frame.filter(
            (pl.len().over("user_id") >= k) & (pl.len().over("item_id") >= k)
        )
        if frame.height == before:
            return frame


def _clean_items(items: pl.DataFrame, stats: dict[str, int]) -> pl.DataFrame:
    titles = clean_text(items["title"])
    before = items["title"].str.strip_chars()
    changed = before.is_not_null() & (titles.is_null() | (titles != before)).fill_null(True)
    stats["html_titles_cleaned"] = int(changed.sum())
    stats["titles_nulled"] = int((before.is_not_null() & titles.is_null()).sum())
    return items.with_columns(
        title=titles,
        categories=clean_categories(items["categories"]).fill_null([]),
        creator=clean_text(items["creator"]),
        description=clean_text(items["description"]),
    )


def _complete(table: pl.DataFrame, ids: pl.Series, key: str, flag: str, schema: dict) -> tuple:
    """Restrict ``table`` to ``ids`` and add placeholder rows for ids it lacks."""
    wanted = pl.DataFrame({key: ids.unique(maintain_order=True)})
    kept = table.join(wanted, on=key, how="semi")
    missing = wanted.join(table, on=key, how="anti")
    placeholders = missing.with_columns(
        [pl.lit(None, dtype).alias(c) for c, dtype in schema.items() if c not in (key, flag)]
        + [pl.lit(False).alias(flag)]
    )
    if "categories" in schema:
        placeholders = placeholders.with_columns(categories=pl.lit([], pl.List(pl.Utf8)))
    combined = pl.concat([conform(kept, schema), conform(placeholders, schema)])
    return combined.sort(key), table.height - kept.height, missing.height


def clean_dataset(dataset: Dataset, kcore: int | None = None) -> tuple[Dataset, dict[str, int]]:
    """Clean ``dataset`` (see module docstring); returns the new dataset and removal counts."""
    stats: dict[str, int] = {}
    inter = dataset.interactions.sort("order")
    deduped = inter.unique(subset=["user_id", "item_id", "timestamp"], keep="first",
                           maintain_order=True)
    stats["duplicate_interactions_dropped"] = inter.height - deduped.height
    cored = kcore_filter(deduped, kcore) if kcore and kcore > 1 else deduped
    stats["kcore_interactions_dropped"] = deduped.height - cored.height

    items = dataset.items.unique(subset="item_id", keep="first", maintain_order=True)
    stats["duplicate_item_rows_dropped"] = dataset.items.height - items.height
    items, stats["unused_item_rows_dropped"], stats["items_without_metadata_added"] = _complete(
        items, cored["item_id"], "item_id", "has_metadata", ITEMS_SCHEMA
    )
    items = _clean_items(items, stats)
    users = dataset.users.unique(subset="user_id", keep="first", maintain_order=True)
    users, stats["unused_user_rows_dropped"], stats["users_without_demographics_added"] = (
        _complete(users, cored["user_id"], "user_id", "has_demographics", USERS_SCHEMA)
    )
    stats["interactions"] = cored.height
    stats["users"] = users.height
    stats["items"] = items.height
    stats["items_with_metadata"] = int(items["has_metadata"].sum())
    stats["items_without_metadata"] = items.height - stats["items_with_metadata"]
    cleaned = replace(dataset, interactions=cored, items=items, users=users)
    return cleaned, stats
