"""Source-independent cleaning applied to every loaded dataset.

``clean_dataset`` returns ``(dataset, stats)``: ``stats`` counts what was removed or added,
and ``stats["cleaning_notes"]`` holds one note per action that changed something (its count
and 3 examples, see ``notes.py``), the reading notes of the loader first.

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
5. ``has_metadata`` is True only for an item with a non-empty (cleaned) title: a row whose
   title is empty or only HTML keeps its other fields but counts as without metadata
   (``item_rows_without_title``). ``items_with_metadata_share`` is the share with one.
6. Users: likewise exactly the interacting users (first row per id); unknown ones get
   placeholder rows with ``has_demographics`` False and null fields.
7. Timestamp ties at the end of a user's history: the protocol orders a user's interactions
   by (timestamp, order), so when the last (second-to-last) interaction shares its timestamp
   with another one, the file order decides the test (validation) target.
   ``tied_test_targets`` and ``tied_valid_targets`` count those users.
"""

from __future__ import annotations

import html
from dataclasses import replace
from typing import Any

import polars as pl

from recthinker_dagster.data.notes import NOTES_KEY, CleaningNote, add_note, examples, row_examples
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


def _clip(text: Any, limit: int = 50) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _clean_items(items: pl.DataFrame, stats: dict[str, Any], notes: list[CleaningNote]) -> pl.DataFrame:
    titles = clean_text(items["title"])
    before = items["title"].str.strip_chars()
    changed = before.is_not_null() & (titles.is_null() | (titles != before)).fill_null(True)
    nulled = before.is_not_null() & titles.is_null()
    stats["html_titles_cleaned"] = int(changed.sum())
    stats["titles_nulled"] = int(nulled.sum())
    fixed = changed & ~nulled
    shown = [f"{i}: {_clip(b)} -> {_clip(a)}" for i, b, a in
             zip(items["item_id"].filter(fixed), before.filter(fixed), titles.filter(fixed))]
    add_note(notes, "html_titles_cleaned", stats["html_titles_cleaned"], examples(shown),
             "titles cleaned of HTML tags, entities or extra whitespace (emptied ones included)")
    untitled = items["has_metadata"] & titles.is_null()
    stats["item_rows_without_title"] = int(untitled.sum())
    shown = [f"{i}: {_clip(b)}" for i, b in zip(items["item_id"].filter(untitled), items["title"].filter(untitled))]
    add_note(notes, "item_rows_without_title", stats["item_rows_without_title"], examples(shown),
             "item rows without a title (empty, or only HTML: titles_nulled), counted as items without metadata")
    return items.with_columns(
        title=titles,
        categories=clean_categories(items["categories"]).fill_null([]),
        creator=clean_text(items["creator"]),
        description=clean_text(items["description"]),
        has_metadata=items["has_metadata"] & titles.is_not_null(),
    )


def _complete(
    table: pl.DataFrame, ids: pl.Series, key: str, flag: str, schema: dict
) -> tuple[pl.DataFrame, pl.Series, pl.Series]:
    """Restrict ``table`` to ``ids`` and add placeholder rows for ids it lacks.

    Returns the table, the ids of the rows dropped and the ids of the placeholders added.
    """
    wanted = pl.DataFrame({key: ids.unique(maintain_order=True)})
    kept = table.join(wanted, on=key, how="semi")
    dropped = table.join(wanted, on=key, how="anti")[key]
    missing = wanted.join(table, on=key, how="anti")
    placeholders = missing.with_columns(
        [pl.lit(None, dtype).alias(c) for c, dtype in schema.items() if c not in (key, flag)]
        + [pl.lit(False).alias(flag)]
    )
    if "categories" in schema:
        placeholders = placeholders.with_columns(categories=pl.lit([], pl.List(pl.Utf8)))
    combined = pl.concat([conform(kept, schema), conform(placeholders, schema)])
    return combined.sort(key), dropped, missing[key]


def _first_rows(table: pl.DataFrame, key: str, what: str, stats: dict[str, Any], notes: list[CleaningNote]) -> pl.DataFrame:
    """One row per ``key`` (the first); the dropped repeats are counted and noted."""
    repeated = table.filter(~pl.col(key).is_first_distinct())
    action = f"duplicate_{what}_rows_dropped"
    stats[action] = repeated.height
    add_note(notes, action, repeated.height, examples(repeated[key]),
             f"repeated {what} rows dropped (same {key}; the first row is kept)")
    return table.unique(subset=key, keep="first", maintain_order=True)


def tied_targets(interactions: pl.DataFrame) -> dict[str, int]:
    """Users whose last / second-to-last interaction ties in timestamp with another of theirs.

    For them the file ``order`` decides which item is the test / validation target. From the
    sizes of each user's two latest timestamp groups: the last group has more than one row
    (both targets tie), or it has one and the group before it more than one (the validation
    target ties).
    """
    groups = interactions.group_by("user_id", "timestamp").agg(rows=pl.len())
    latest = groups.sort("timestamp", descending=True).group_by("user_id").agg(
        last=pl.col("rows").first(), before=pl.col("rows").slice(1, 1).first()
    )
    last, before = pl.col("last"), pl.col("before").fill_null(0)
    return {
        "tied_test_targets": latest.filter(last > 1).height,
        "tied_valid_targets": latest.filter((last > 1) | (before > 1)).height,
    }


def clean_dataset(dataset: Dataset, kcore: int | None = None) -> tuple[Dataset, dict[str, Any]]:
    """Clean ``dataset`` (see module docstring); returns the new dataset and its statistics."""
    stats: dict[str, Any] = {}
    notes = list(dataset.notes)
    for note in notes:
        stats[note.action] = note.count
    keys = ["user_id", "item_id", "timestamp"]
    inter = dataset.interactions.sort("order")
    first = inter.select(pl.struct(keys).is_first_distinct()).to_series()
    deduped, repeated = inter.filter(first), inter.filter(~first)
    stats["duplicate_interactions_dropped"] = repeated.height
    add_note(notes, "duplicate_interactions_dropped", repeated.height, row_examples(repeated, [*keys, "order"]),
             "duplicate interactions dropped (same user, item and timestamp; the first in file order is kept)")
    cored = kcore_filter(deduped, kcore) if kcore and kcore > 1 else deduped
    stats["kcore_interactions_dropped"] = deduped.height - cored.height
    if cored.height < deduped.height:
        removed = deduped.join(cored, on=keys, how="anti")
        add_note(notes, "kcore_interactions_dropped", removed.height, row_examples(removed, keys),
                 f"interactions removed by the {kcore}-core filter (users and items with fewer than {kcore})")

    items = _first_rows(dataset.items, "item_id", "item", stats, notes)
    items, dropped, added = _complete(items, cored["item_id"], "item_id", "has_metadata", ITEMS_SCHEMA)
    stats["unused_item_rows_dropped"], stats["items_without_metadata_added"] = dropped.len(), added.len()
    add_note(notes, "unused_item_rows_dropped", dropped.len(), examples(dropped),
             "item rows dropped: no interaction mentions them")
    add_note(notes, "items_without_metadata_added", added.len(), examples(added),
             "items that only appear in interactions, added without metadata")
    items = _clean_items(items, stats, notes)
    users = _first_rows(dataset.users, "user_id", "user", stats, notes)
    users, dropped, added = _complete(users, cored["user_id"], "user_id", "has_demographics", USERS_SCHEMA)
    stats["unused_user_rows_dropped"], stats["users_without_demographics_added"] = dropped.len(), added.len()
    add_note(notes, "unused_user_rows_dropped", dropped.len(), examples(dropped),
             "user rows dropped: no interaction mentions them")
    if dataset.users.height:  # a source without a user file (Amazon) has nothing to warn about
        add_note(notes, "users_without_demographics_added", added.len(), examples(added),
                 "users that only appear in interactions, added without demographics")
    stats["interactions"] = cored.height
    stats["users"] = users.height
    stats["items"] = items.height
    stats["items_with_metadata"] = int(items["has_metadata"].sum())
    stats["items_without_metadata"] = items.height - stats["items_with_metadata"]
    stats["items_with_metadata_share"] = round(stats["items_with_metadata"] / items.height, 4) if items.height else 0.0
    stats.update(tied_targets(cored))
    stats[NOTES_KEY] = [note.to_dict() for note in notes]
    cleaned = replace(dataset, interactions=cored, items=items, users=users, notes=notes)
    return cleaned, stats
