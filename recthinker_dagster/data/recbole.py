"""RecBole atomic files: ``<stem>.inter`` (required), ``<stem>.item`` and ``<stem>.user``.

Tab-separated UTF-8, plain or gzip'd, with a ``name:type`` header (the ``:type`` part is
optional). Fields are mapped by name; unknown fields are ignored. Ids are kept as the
file's tokens (a numeric token must be positive: RecBole reserves 0 for padding). A
``.inter`` without ``rating`` gives null ratings; one without data lines is an error, while
a header-only ``.item`` or ``.user`` simply describes no item or user.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recthinker_dagster.data import textio
from recthinker_dagster.data.errors import DataFormatError, DatasetNotFoundError
from recthinker_dagster.data.notes import CleaningNote
from recthinker_dagster.data.schema import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    RATING_RANGE,
    USERS_SCHEMA,
    Dataset,
    conform,
)

URL = "https://github.com/RUCAIBox/RecSysDatasets"
TITLE_FIELDS = ("title", "movie_title")
YEAR_FIELDS = ("release_year", "year")
CATEGORY_FIELDS = ("categories", "genre", "class")
CREATOR_FIELDS = ("brand", "artist", "director")


def read_atomic(path: Path, notes: list[CleaningNote] | None = None) -> pl.DataFrame:
    """All fields of one atomic file as strings (header names without ``:type``), plus ``_line``."""
    lines = textio.split_lines(textio.read_text(path, "utf-8", notes))
    if lines.height == 0:
        raise DataFormatError(path, "file is empty", line=1, expected="a `name:type` header")
    header = lines["text"][0]
    names = [field.split(":", 1)[0].strip() for field in header.split("\t")]
    return textio.split_fields(lines.slice(1), "\t", names, path)


def _first(frame: pl.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in frame.columns), None)


def _require(frame: pl.DataFrame, field: str, path: Path) -> None:
    if field not in frame.columns:
        raise DataFormatError(
            path,
            f"header has no '{field}' field (fields: {', '.join(frame.columns[1:])})",
            line=1,
            column=field,
            expected=f"a tab-separated header with a '{field}' field",
        )


def _text(frame: pl.DataFrame, field: str | None) -> pl.Series:
    if field is None:
        return pl.Series([None] * frame.height, dtype=pl.Utf8)
    values = frame[field].str.strip_chars()
    return values.replace("", None)


def _categories(frame: pl.DataFrame, field: str | None) -> pl.Series:
    """Split on ',' if any value of the column has a comma, else on whitespace."""
    if field is None:
        return pl.Series([[]] * frame.height, dtype=pl.List(pl.Utf8))
    values = frame[field].str.strip_chars()
    if values.str.contains(",").any():
        parts = values.str.split(",")
    else:
        parts = values.str.split(" ")
    word = pl.element().str.strip_chars()
    return parts.list.eval(word.filter(word != ""))


def read_inter(path: Path, notes: list[CleaningNote] | None = None) -> pl.DataFrame:
    raw = read_atomic(path, notes)
    for field in ("user_id", "item_id", "timestamp"):
        _require(raw, field, path)
    if raw.height == 0:
        raise DataFormatError(path, "no interactions: the file has only its header", line=2,
                              expected="one tab-separated interaction per line after the header")
    if "rating" in raw.columns:
        low, high = RATING_RANGE
        rating = textio.parse_float(raw, "rating", path, low=low, high=high)
    else:
        rating = pl.Series([None] * raw.height, dtype=pl.Float64)
    frame = pl.DataFrame(
        {
            "user_id": textio.require_token(raw, "user_id", path),
            "item_id": textio.require_token(raw, "item_id", path),
            "rating": rating,
            "timestamp": textio.parse_unix_seconds(raw, "timestamp", path, integer=False),
            "order": raw[textio.LINE] - 2,  # line 1 is the header
        }
    )
    return conform(frame, INTERACTIONS_SCHEMA)


def read_item(path: Path, notes: list[CleaningNote] | None = None) -> pl.DataFrame:
    raw = read_atomic(path, notes)
    _require(raw, "item_id", path)
    year_field = _first(raw, YEAR_FIELDS)
    year = _text(raw, year_field).str.extract(r"(\d{4})").cast(pl.Int32, strict=False)
    frame = pl.DataFrame(
        {
            "item_id": textio.require_token(raw, "item_id", path),
            "title": _text(raw, _first(raw, TITLE_FIELDS)),
            "year": year,
            "categories": _categories(raw, _first(raw, CATEGORY_FIELDS)),
            "creator": _text(raw, _first(raw, CREATOR_FIELDS)),
            "description": _text(raw, "description" if "description" in raw.columns else None),
            "has_metadata": True,
        }
    )
    return conform(frame, ITEMS_SCHEMA)


def read_user(path: Path, notes: list[CleaningNote] | None = None) -> pl.DataFrame:
    raw = read_atomic(path, notes)
    _require(raw, "user_id", path)
    age = _text(raw, "age" if "age" in raw.columns else None).cast(pl.Int32, strict=False)
    frame = pl.DataFrame(
        {
            "user_id": textio.require_token(raw, "user_id", path),
            "gender": _text(raw, "gender" if "gender" in raw.columns else None),
            "age": age,
            "occupation": _text(raw, "occupation" if "occupation" in raw.columns else None),
            "zip_code": _text(raw, "zip_code" if "zip_code" in raw.columns else None),
            "has_demographics": True,
        }
    )
    return conform(frame, USERS_SCHEMA)


def inter_stems(folder: Path) -> list[str]:
    """Every ``<stem>`` with a ``<stem>.inter`` or ``<stem>.inter.gz`` in ``folder``."""
    names = [p.name.removesuffix(".gz") for p in Path(folder).glob("*.inter*") if p.is_file()]
    return sorted({n.removesuffix(".inter") for n in names if n.endswith(".inter")})


def find_stem(folder: Path) -> str:
    """The one ``<stem>`` with a ``<stem>.inter(.gz)`` in ``folder``."""
    stems = inter_stems(folder)
    if not stems:
        raise DatasetNotFoundError(
            f"no RecBole <name>.inter (or .inter.gz) file in {Path(folder).resolve()}; put the "
            f"atomic files (<name>.inter, optional <name>.item/<name>.user) there (see {URL})"
        )
    if len(stems) > 1:
        raise DataFormatError(folder, f"several RecBole datasets found: {stems}", expected="one")
    return stems[0]


def recbole_files(folder: Path, stem: str | None = None) -> dict[str, Path]:
    """Role ('inter', 'item', 'user') -> path of the files present in ``folder``."""
    stem = stem or find_stem(folder)
    found = {role: textio.find_file(folder, f"{stem}.{role}") for role in ("inter", "item", "user")}
    if found["inter"] is None:
        raise DatasetNotFoundError(f"missing {stem}.inter (or .gz) in {Path(folder).resolve()}")
    return {role: path for role, path in found.items() if path is not None}


def load_recbole(folder: Path, *, stem: str | None = None, name: str | None = None) -> Dataset:
    """Load ``<stem>.inter`` plus the optional ``.item``/``.user`` from ``folder``."""
    files = recbole_files(folder, stem)
    notes: list[CleaningNote] = []
    interactions = read_inter(files["inter"], notes)
    items = read_item(files["item"], notes) if "item" in files else pl.DataFrame(schema=ITEMS_SCHEMA)
    users = read_user(files["user"], notes) if "user" in files else pl.DataFrame(schema=USERS_SCHEMA)
    return Dataset(
        name=name or files["inter"].name.split(".")[0],
        interactions=interactions,
        items=items,
        users=users,
        source={"format": "recbole", **{role: str(path) for role, path in files.items()}},
        notes=notes,
    )
