"""Shared file helpers for the loaders: find plain-or-gzip files, read them with loud
errors, split delimited text into columns and validate columns, all vectorized in polars.

Every frame built here carries a ``_line`` column (1-based line number in the source file)
so that a bad value can be reported with its exact place.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from recthinker_dagster.data.errors import DataFormatError, DatasetNotFoundError

LINE = "_line"
GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def find_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists (plain first); else None."""
    for candidate in (Path(folder) / name, Path(folder) / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def require_file(folder: Path, name: str, hint: str = "") -> Path:
    """Like :func:`find_file` but raises :class:`DatasetNotFoundError` naming what to put where."""
    found = find_file(folder, name)
    if found is None:
        message = f"missing {name} (or {name}.gz) in {Path(folder).resolve()}"
        raise DatasetNotFoundError(f"{message}. {hint}".strip())
    return found


def is_gzip(path: Path) -> bool:
    return str(path).endswith(".gz")


def gzip_error(path: Path, exc: BaseException, after_line: int | None = None) -> DataFormatError:
    where = f" after line {after_line}" if after_line else ""
    return DataFormatError(
        path,
        f"gzip stream is truncated or corrupt{where} ({exc}); re-download or re-copy the file",
        expected="a complete gzip file",
    )


def read_bytes(path: Path) -> bytes:
    """The whole (decompressed) content of ``path``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"missing file {path}")
    if not is_gzip(path):
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except GZIP_ERRORS as exc:
        raise gzip_error(path, exc) from exc


def iter_raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` without decoding; gzip damage raises DataFormatError.

    A truncated gzip often yields a half line before the error; on a parse error callers
    use :func:`check_gzip_complete` to tell a damaged gzip from a bad line.
    """
    path = Path(path)
    opener = gzip.open if is_gzip(path) else open
    number = 0
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):  # noqa: B007
                yield number, raw
    except GZIP_ERRORS as exc:
        raise gzip_error(path, exc, after_line=number) from exc


def check_gzip_complete(path: Path) -> None:
    """Raise the gzip DataFormatError if ``path`` is a damaged gzip; no-op for plain files.

    Used on a parse error: a truncated gzip usually shows up first as a half line.
    """
    if not is_gzip(path):
        return
    try:
        with gzip.open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass
    except GZIP_ERRORS as exc:
        raise gzip_error(path, exc) from exc


def split_lines(text: str) -> pl.DataFrame:
    """One row per non-blank line: columns ``text`` and ``_line`` (1-based)."""
    lines = pl.Series("text", text.split("\n"), dtype=pl.Utf8)
    frame = pl.DataFrame({"text": lines.str.strip_suffix("\r")}).with_row_index(LINE, offset=1)
    frame = frame.with_columns(pl.col(LINE).cast(pl.Int64))
    return frame.filter(pl.col("text").str.strip_chars() != "")


def split_fields(lines: pl.DataFrame, sep: str, names: list[str], path: Path) -> pl.DataFrame:
    """Split ``lines.text`` on ``sep`` into exactly ``len(names)`` string columns.

    A line with another field count raises DataFormatError with its line number.
    """
    parts = lines.select(pl.col(LINE), pl.col("text").str.split(sep).alias("parts"))
    counts = parts["parts"].list.len()
    bad = counts != len(names)
    if bad.any():
        index = int(bad.arg_true()[0])
        line = int(parts[LINE][index])
        found = int(counts[index])
        # name the first missing column, or the first extra field
        column = names[found] if found < len(names) else f"extra field {len(names) + 1}"
        raise DataFormatError(
            path,
            f"wrong number of fields: {found} found",
            line=line,
            column=column,
            expected=f"{len(names)} fields separated by {sep!r}: {', '.join(names)}",
        )
    columns = [pl.col("parts").list.get(i).alias(name) for i, name in enumerate(names)]
    return parts.select(pl.col(LINE), *columns)


def _raise_first(
    frame: pl.DataFrame, bad: pl.Series, column: str, path: Path, problem: str, expected: str
) -> None:
    if bad.any():
        index = int(bad.arg_true()[0])
        value = frame[column][index]
        raise DataFormatError(
            path,
            problem.format(value=value),
            line=int(frame[LINE][index]),
            column=column,
            expected=expected,
        )


def parse_int(frame: pl.DataFrame, column: str, path: Path) -> pl.Series:
    """``frame[column]`` (strings) as Int64; any non-integer raises DataFormatError."""
    raw = frame[column].str.strip_chars()
    parsed = raw.cast(pl.Int64, strict=False)
    _raise_first(frame, parsed.is_null(), column, path, "{value!r} is not an integer", "an integer")
    return parsed


def parse_float(
    frame: pl.DataFrame,
    column: str,
    path: Path,
    *,
    low: float | None = None,
    high: float | None = None,
) -> pl.Series:
    """``frame[column]`` as Float64, optionally within ``[low, high]``; else DataFormatError."""
    expected = "a number" if low is None else f"a number from {low:g} to {high:g}"
    parsed = frame[column].str.strip_chars().cast(pl.Float64, strict=False)
    bad = parsed.is_null() | parsed.is_nan()
    _raise_first(frame, bad, column, path, "{value!r} is not a number", expected)
    if low is not None and high is not None:
        outside = (parsed < low) | (parsed > high)
        _raise_first(frame, outside, column, path, "value {value!r} is out of range", expected)
    return parsed


def require_nonempty(frame: pl.DataFrame, column: str, path: Path) -> pl.Series:
    """``frame[column]`` stripped; an empty value raises DataFormatError."""
    values = frame[column].str.strip_chars()
    bad = values.is_null() | (values == "")
    _raise_first(frame, bad, column, path, "empty value {value!r}", "a non-empty identifier")
    return values
