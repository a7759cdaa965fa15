"""McAuley-lab Amazon review data as JSON lines (plain or gzip'd).

Reviews (2014 or 2018, e.g. ``CDs_and_Vinyl_5.json.gz``): one JSON object per line with
``reviewerID``, ``asin``, ``overall``, ``unixReviewTime``. Metadata (``meta_<Category>.json.gz``):
2018 lines are JSON (``category`` list, ``description`` list, ``brand``, ``date``); 2014
lines are Python dict literals (``categories`` list of lists, ``description`` string), read
with ``ast.literal_eval``. User ids are reviewer ids, item ids are ASINs. Lines are UTF-8;
a byte-order mark at the start is removed (and noted). A reviews file without a single
review is an error.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

from recthinker_dagster.data import textio
from recthinker_dagster.data.errors import DataFormatError
from recthinker_dagster.data.notes import CleaningNote
from recthinker_dagster.data.schema import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    RATING_RANGE,
    USERS_SCHEMA,
    Dataset,
    FrameSchema,
    conform,
)

REVIEW_KEYS = ("reviewerID", "asin", "overall", "unixReviewTime")
REVIEW_SCHEMA: FrameSchema = {"reviewerID": pl.Utf8, "asin": pl.Utf8, "overall": pl.Float64,
                 "unixReviewTime": pl.Int64}
META_SCHEMA: FrameSchema = {"asin": pl.Utf8, "title": pl.Utf8, "category": pl.List(pl.Utf8),
               "categories": pl.List(pl.List(pl.Utf8)),  # 2014 style: the line-by-line path
               "brand": pl.Utf8, "description": pl.List(pl.Utf8), "date": pl.Utf8}
BLOCK = 64 << 20


def fast_read(path: Path, schema: FrameSchema) -> pl.DataFrame | None:
    """Read the ``schema`` keys with polars' JSON reader, in blocks of whole lines.

    Returns None on any problem (bad JSON, other types, Python literals, damaged gzip,
    a byte-order mark): the caller then parses line by line, which names the exact line
    that is wrong (and strips a byte-order mark, noting it).
    """
    frames: list[pl.DataFrame] = []
    rest = b""
    opener = gzip.open if textio.is_gzip(path) else open
    try:
        with opener(path, "rb") as handle:
            while block := handle.read(BLOCK):
                if not frames and not rest and block.startswith(textio.BOM):
                    return None
                block = rest + block
                cut = block.rfind(b"\n") + 1
                rest, block = block[cut:], block[:cut]
                if block.strip():
                    frames.append(pl.read_ndjson(io.BytesIO(block), schema=schema))
        if rest.strip():
            frames.append(pl.read_ndjson(io.BytesIO(rest), schema=schema))
    except (pl.exceptions.PolarsError, *textio.GZIP_ERRORS):
        return None
    return pl.concat(frames) if frames else pl.DataFrame(schema=schema)


def iter_records(
    path: Path, notes: list[CleaningNote] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line; bad lines raise DataFormatError."""
    literal_first = False
    for number, raw in textio.iter_raw_lines(path):
        if number == 1:
            raw = textio.strip_bom(raw, path, notes)
        if not raw.strip():
            continue
        try:
            record = _parse(raw, literal_first)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
            textio.check_gzip_complete(path)
            column = getattr(exc, "colno", None) or getattr(exc, "offset", None) or 1
            problem = "malformed JSON"
            if isinstance(exc, UnicodeDecodeError):
                problem, column = "not valid UTF-8", exc.start + 1
            raise DataFormatError(
                path,
                f"{problem}: {exc}",
                line=number,
                column=str(column),
                expected="one JSON object per line",
            ) from exc
        if not isinstance(record, dict):
            raise DataFormatError(
                path, f"line holds a {type(record).__name__}", line=number, column="1",
                expected="one JSON object per line",
            )
        literal_first = literal_first or raw.lstrip().startswith(b"{'")
        yield number, record


def _parse(raw: bytes, literal_first: bool) -> Any:
    if literal_first:
        return ast.literal_eval(raw.decode("utf-8"))
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        try:  # 2014 metadata: Python dict literals
            return ast.literal_eval(raw.decode("utf-8"))
        except (ValueError, SyntaxError):
            raise exc from None


def _missing(path: Path, number: int, key: str, expected: str) -> DataFormatError:
    return DataFormatError(path, f"missing required key '{key}'", line=number, column=key,
                           expected=expected)


def read_reviews(path: Path, notes: list[CleaningNote] | None = None) -> pl.DataFrame:
    """Review lines -> INTERACTIONS_SCHEMA; ``order`` is the 0-based record index."""
    low, high = RATING_RANGE
    fast = fast_read(path, REVIEW_SCHEMA)
    if fast is not None and fast.height:
        ids_ok = fast.select(
            pl.all_horizontal(pl.col(k).is_not_null() for k in REVIEW_KEYS).all()
            & (pl.col("reviewerID") != "").all() & (pl.col("asin") != "").all()
            & pl.col("overall").is_between(low, high).all()
            & pl.col("unixReviewTime").is_between(1, textio.MAX_TIMESTAMP).all()
        ).item()
        if ids_ok:
            frame = fast.rename({"reviewerID": "user_id", "asin": "item_id", "overall": "rating",
                                 "unixReviewTime": "timestamp"})
            return conform(frame.with_row_index("order"), INTERACTIONS_SCHEMA)
    return read_reviews_by_line(path, notes)


def read_reviews_by_line(path: Path, notes: list[CleaningNote] | None = None) -> pl.DataFrame:
    """``read_reviews`` parsing one line at a time: slower, but names the exact line that is wrong."""
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    times: list[int] = []
    low, high = RATING_RANGE
    for number, record in iter_records(path, notes):
        for key in REVIEW_KEYS:
            if record.get(key) in (None, ""):
                raise _missing(path, number, key, f"keys {', '.join(REVIEW_KEYS)}")
        rating = record["overall"]
        numeric = isinstance(rating, (int, float)) and not isinstance(rating, bool)
        if not numeric or not low <= rating <= high:
            raise DataFormatError(path, f"rating {rating!r} is invalid", line=number,
                                  column="overall", expected=f"a number from {low:g} to {high:g}")
        try:
            stamp = int(record["unixReviewTime"])
        except (TypeError, ValueError):
            raise DataFormatError(
                path, f"{record['unixReviewTime']!r} is not a unix time", line=number,
                column="unixReviewTime", expected="an integer (unix seconds)") from None
        if not 1 <= stamp <= textio.MAX_TIMESTAMP:
            raise DataFormatError(
                path, f"unix time {stamp} is out of range", line=number, column="unixReviewTime",
                expected=f"unix seconds from 1 to {textio.MAX_TIMESTAMP}")
        users.append(str(record["reviewerID"]))
        items.append(str(record["asin"]))
        ratings.append(float(rating))
        times.append(stamp)
    if not users:
        raise DataFormatError(path, "no reviews: the file has no data lines", line=1,
                              expected=f"one JSON object per line with {', '.join(REVIEW_KEYS)}")
    frame = pl.DataFrame(
        {"user_id": users, "item_id": items, "rating": ratings, "timestamp": times},
        schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "rating": pl.Float64,
                "timestamp": pl.Int64},
    ).with_row_index("order")
    return conform(frame, INTERACTIONS_SCHEMA)


def _strings(value: Any) -> list[str]:
    """Flatten a string / list / list of lists into a list of non-empty strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [s for part in value for s in _strings(part)]
    return [str(value)]


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(v.strip() for v in values if v.strip()))


def read_metadata(path: Path, notes: list[CleaningNote] | None = None) -> pl.DataFrame:
    """Metadata lines -> ITEMS_SCHEMA. ``creator`` is ``brand``; ``year`` comes from ``date``."""
    fast = fast_read(path, META_SCHEMA)
    if (
        fast is not None
        and fast["categories"].is_null().all()
        and fast["asin"].is_not_null().all()
        and (fast["asin"] != "").all()
    ):
        def text(expr: pl.Expr) -> pl.Expr:
            return expr.str.strip_chars().replace("", None)

        words = pl.element().str.strip_chars()
        frame = fast.select(
            item_id=pl.col("asin"),
            title=text(pl.col("title")),
            categories=pl.col("category").list.eval(words.filter(words != "")).list.unique(
                maintain_order=True).fill_null([]),
            creator=text(pl.col("brand")),
            description=text(pl.col("description").list.eval(words.filter(words != ""))
                             .list.join(" ")),
            date=pl.col("date"),
        )
        return _finish_metadata(frame)
    return read_metadata_by_line(path, notes)


def read_metadata_by_line(path: Path, notes: list[CleaningNote] | None = None) -> pl.DataFrame:
    """``read_metadata`` parsing one line at a time (2014 literals, or a line the fast path rejects)."""
    keys = ("item_id", "title", "categories", "creator", "description", "date")
    rows: dict[str, list[Any]] = {k: [] for k in keys}
    for number, record in iter_records(path, notes):
        asin = record.get("asin")
        if asin in (None, ""):
            raise _missing(path, number, "asin", "an 'asin' key on every line")
        rows["item_id"].append(str(asin))
        rows["title"].append(_text(record.get("title")))
        categories = record.get("category", record.get("categories"))
        rows["categories"].append(_unique(_strings(categories)))
        rows["creator"].append(_text(record.get("brand")))
        rows["description"].append(_text(" ".join(_strings(record.get("description")))))
        rows["date"].append(_text(record.get("date")))
    schema: FrameSchema = {**{k: pl.Utf8 for k in rows}, "categories": pl.List(pl.Utf8)}
    frame = pl.DataFrame(rows, schema=schema)
    return _finish_metadata(frame)


def _finish_metadata(frame: pl.DataFrame) -> pl.DataFrame:
    frame = frame.with_columns(
        year=pl.col("date").str.extract(r"\b(1[89]\d\d|20\d\d)\b").cast(pl.Int32),
        has_metadata=pl.lit(True),
    )
    return conform(frame, ITEMS_SCHEMA)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = " ".join(_strings(value)).strip()
    return text or None


def load_amazon_json(
    reviews_path: Path, meta_path: Path | None = None, *, name: str = "amazon"
) -> Dataset:
    """Reviews plus optional metadata; Amazon has no user demographics (empty users table)."""
    notes: list[CleaningNote] = []
    interactions = read_reviews(reviews_path, notes)
    items = read_metadata(meta_path, notes) if meta_path else pl.DataFrame(schema=ITEMS_SCHEMA)
    source = {"format": "amazon-json", "reviews": str(reviews_path)}
    if meta_path:
        source["metadata"] = str(meta_path)
    return Dataset(
        name=name,
        interactions=interactions,
        items=items,
        users=pl.DataFrame(schema=USERS_SCHEMA),
        source=source,
        notes=notes,
    )
