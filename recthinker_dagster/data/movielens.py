"""MovieLens-1M as published by GroupLens: ``ratings.dat``, ``movies.dat``, ``users.dat``.

Each file is ``::``-separated ISO-8859-1 text, plain or gzip'd (a copy re-saved as UTF-8
is read as UTF-8, and noted). Ids are positive integers, kept as their decimal strings
("1", "1193"); ``order`` is the 0-based line index in ``ratings.dat``. An empty file is an
error: every one of the three files is needed.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recthinker_dagster.data import textio
from recthinker_dagster.data.notes import CleaningNote
from recthinker_dagster.data.schema import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    RATING_RANGE,
    USERS_SCHEMA,
    Dataset,
    conform,
)

URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
FILES = ("ratings.dat", "movies.dat", "users.dat")
SEP = "::"
ENCODING = "latin-1"

OCCUPATIONS = {
    0: "other or not specified",
    1: "academic/educator",
    2: "artist",
    3: "clerical/admin",
    4: "college/grad student",
    5: "customer service",
    6: "doctor/health care",
    7: "executive/managerial",
    8: "farmer",
    9: "homemaker",
    10: "K-12 student",
    11: "lawyer",
    12: "programmer",
    13: "retired",
    14: "sales/marketing",
    15: "scientist",
    16: "self-employed",
    17: "technician/engineer",
    18: "tradesman/craftsman",
    19: "unemployed",
    20: "writer",
}


def missing_hint(folder: Path) -> str:
    return (
        f"Put ratings.dat, movies.dat and users.dat (plain or .gz) from {URL} "
        f"(unzip it) into {Path(folder).resolve()}/"
    )


def _fields(path: Path, names: list[str], notes: list[CleaningNote] | None) -> pl.DataFrame:
    lines = textio.split_lines(textio.read_text(path, ENCODING, notes))
    textio.require_lines(lines, path, f"lines of {SEP.join(names)}")
    return textio.split_fields(lines, SEP, names, path)


def read_ratings(path: Path, notes: list[CleaningNote] | None = None) -> pl.DataFrame:
    """``UserID::MovieID::Rating::Timestamp`` -> INTERACTIONS_SCHEMA."""
    raw = _fields(path, ["UserID", "MovieID", "Rating", "Timestamp"], notes)
    low, high = RATING_RANGE
    frame = pl.DataFrame(
        {
            "user_id": textio.parse_id(raw, "UserID", path),
            "item_id": textio.parse_id(raw, "MovieID", path),
            "rating": textio.parse_float(raw, "Rating", path, low=low, high=high),
            "timestamp": textio.parse_unix_seconds(raw, "Timestamp", path),
            "order": raw[textio.LINE] - 1,
        }
    )
    return conform(frame, INTERACTIONS_SCHEMA)


def read_movies(path: Path, notes: list[CleaningNote] | None = None) -> pl.DataFrame:
    """``MovieID::Title (Year)::Genre|Genre`` -> ITEMS_SCHEMA (title without the year)."""
    raw = _fields(path, ["MovieID", "Title", "Genres"], notes)
    title = raw["Title"].str.strip_chars()
    parts = title.str.extract_groups(r"^(.*?)\s*\((\d{4})\)$")
    frame = pl.DataFrame(
        {
            "item_id": textio.parse_id(raw, "MovieID", path),
            "title": parts.struct.field("1").fill_null(title),
            "year": parts.struct.field("2").cast(pl.Int32, strict=False),
            "categories": raw["Genres"].str.strip_chars().str.split("|").list.eval(
                pl.element().filter(pl.element() != "")
            ),
            "creator": None,
            "description": None,
            "has_metadata": True,
        }
    )
    return conform(frame, ITEMS_SCHEMA)


def read_users(path: Path, notes: list[CleaningNote] | None = None) -> pl.DataFrame:
    """``UserID::Gender::Age::Occupation::Zip-code`` -> USERS_SCHEMA (occupation by name)."""
    raw = _fields(path, ["UserID", "Gender", "Age", "Occupation", "Zip-code"], notes)
    occupation = textio.parse_int(raw, "Occupation", path)
    names = pl.Series(list(OCCUPATIONS.values()), dtype=pl.Utf8)
    codes = pl.Series(list(OCCUPATIONS.keys()), dtype=pl.Int64)
    frame = pl.DataFrame(
        {
            "user_id": textio.parse_id(raw, "UserID", path),
            "gender": raw["Gender"].str.strip_chars().replace("", None),
            "age": textio.parse_int(raw, "Age", path),
            "occupation": occupation.replace_strict(codes, names, default=None),
            "zip_code": raw["Zip-code"].str.strip_chars(),
            "has_demographics": True,
        }
    )
    return conform(frame, USERS_SCHEMA)


def load_movielens_1m(folder: Path, *, name: str = "ml-1m") -> Dataset:
    """Read the three ML-1M files from ``folder`` (each plain or ``.gz``)."""
    hint = missing_hint(folder)
    paths = {stem: textio.require_file(folder, stem, hint) for stem in FILES}
    notes: list[CleaningNote] = []
    return Dataset(
        name=name,
        interactions=read_ratings(paths["ratings.dat"], notes),
        items=read_movies(paths["movies.dat"], notes),
        users=read_users(paths["users.dat"], notes),
        source={"format": "movielens-1m", **{k: str(v) for k, v in paths.items()}},
        notes=notes,
    )
