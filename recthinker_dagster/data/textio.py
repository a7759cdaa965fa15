"""Shared file helpers for the loaders: find plain-or-gzip files, read them with loud
errors, split delimited text into columns and validate columns, all vectorized in polars.

Every frame built here carries a ``_line`` column (1-based line number in the source file)
so that a bad value can be reported with its exact place.

Text is decoded by :func:`read_text`: a UTF-8 byte-order mark at the start is removed (and
noted), UTF-8 files must be valid UTF-8 (the error names the line of the first bad byte),
and a file published as ISO-8859-1 that is in fact UTF-8 is read as UTF-8 (noted).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from recthinker_dagster.data.errors import DataFormatError, DatasetNotFoundError
from recthinker_dagster.data.notes import CleaningNote, add_note

LINE = "_line"
GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)
BOM = b"\xef\xbb\xbf"
ARCHIVES = {b"\x1f\x8b": "gzip-compressed, but its name does not end in .gz (rename it to <name>.gz)",
            b"PK\x03\x04": "a zip archive (unzip it and put the files it holds here)"}
LATIN_1 = "latin-1"
MAX_TIMESTAMP = 4_102_444_800  # 2100-01-01: a larger "unix time" is in milliseconds, or garbage


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


def check_not_archive(path: Path, head: bytes) -> None:
    """Raise DataFormatError when a file read as text starts like a compressed archive."""
    for magic, what in ARCHIVES.items():
        if head.startswith(magic) and not is_gzip(Path(path)):
            raise DataFormatError(path, f"the file is {what}", line=1, expected="plain text")


def strip_bom(data: bytes, path: Path, notes: list[CleaningNote] | None) -> bytes:
    """``data`` without a leading UTF-8 byte-order mark; noted in ``notes`` when there was one."""
    if not data.startswith(BOM):
        return data
    if notes is not None:
        add_note(notes, "byte_order_marks_stripped", 1, (Path(path).name,),
                 "UTF-8 byte-order mark removed from the start of the file")
    return data[len(BOM):]


def read_text(path: Path, encoding: str = "utf-8", notes: list[CleaningNote] | None = None) -> str:
    """The decoded text of ``path`` (see the module docstring for BOMs and encodings).

    ``encoding`` is "utf-8" (strict: a bad byte raises DataFormatError naming its line) or
    "latin-1" (the ML-1M files; read as UTF-8 when the bytes are valid UTF-8 and not ASCII,
    since ISO-8859-1 text with accents is practically never valid UTF-8).
    """
    data = read_bytes(path)
    check_not_archive(path, data[:4])
    data = strip_bom(data, path, notes)
    if encoding == LATIN_1:
        if data.isascii():
            return data.decode("ascii")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode(LATIN_1)
        if notes is not None:
            add_note(notes, "files_read_as_utf8", 1, (Path(path).name,),
                     "file is UTF-8, not ISO-8859-1 as published; read as UTF-8")
        return text
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataFormatError(
            path,
            f"byte 0x{data[exc.start]:02x} at character {column} is not valid {encoding}",
            line=line,
            expected=f"{encoding} text (convert it, e.g. `iconv -f latin1 -t utf-8`)",
        ) from None


def require_lines(lines: pl.DataFrame, path: Path, expected: str) -> None:
    """Raise DataFormatError when ``lines`` is empty: an empty file is never a dataset."""
    if lines.height == 0:
        raise DataFormatError(path, "file has no data lines (empty)", line=1, expected=expected)


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
                if number == 1:
                    check_not_archive(path, raw[:4])
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


def parse_int(
    frame: pl.DataFrame,
    column: str,
    path: Path,
    *,
    low: int | None = None,
    high: int | None = None,
    what: str = "an integer",
) -> pl.Series:
    """``frame[column]`` (strings) as Int64, optionally within ``[low, high]``; else DataFormatError."""
    raw = frame[column].str.strip_chars()
    parsed = raw.cast(pl.Int64, strict=False)
    _raise_first(frame, parsed.is_null(), column, path, "{value!r} is not an integer", "an integer")
    check_range(frame, parsed, column, path, low, high, what)
    return parsed


def parse_id(frame: pl.DataFrame, column: str, path: Path) -> pl.Series:
    """A positive integer id column (ML-1M's UserID, MovieID) as strings of its integer."""
    parsed = parse_int(frame, column, path)
    _raise_first(frame, parsed < 1, column, path, "id {value!r} is not positive", "a positive integer")
    return parsed.cast(pl.Utf8)


def parse_unix_seconds(frame: pl.DataFrame, column: str, path: Path, *, integer: bool = True) -> pl.Series:
    """Unix seconds from 1 to :data:`MAX_TIMESTAMP` (2100-01-01; larger values are usually
    milliseconds); ``integer=False`` also accepts floats (floored), as RecBole writes them."""
    if integer:
        return parse_int(frame, column, path, low=1, high=MAX_TIMESTAMP, what="unix seconds")
    parsed = parse_float(frame, column, path).floor()
    check_range(frame, parsed, column, path, 1, MAX_TIMESTAMP, "unix seconds")
    return parsed.cast(pl.Int64)


def check_range(
    frame: pl.DataFrame,
    values: pl.Series,
    column: str,
    path: Path,
    low: float | None,
    high: float | None,
    what: str,
) -> None:
    """Raise DataFormatError at the first value outside ``[low, high]`` (either may be None)."""
    if low is None and high is None:
        return
    outside = pl.Series([False] * values.len())
    if low is not None:
        outside = outside | (values < low)
    if high is not None:
        outside = outside | (values > high)
    bounds = f"from {_number(low)}" if low is not None else ""
    bounds += f" to {_number(high)}" if high is not None else ""
    _raise_first(frame, outside, column, path, "value {value!r} is out of range", f"{what} {bounds.strip()}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def require_token(frame: pl.DataFrame, column: str, path: Path) -> pl.Series:
    """A non-empty id token; a token that is an integer must be positive (0 is RecBole's padding)."""
    values = require_nonempty(frame, column, path)
    as_int = values.cast(pl.Int64, strict=False)
    bad = (as_int <= 0).fill_null(False)
    _raise_first(frame, bad, column, path, "id {value!r} is not positive",
                 "a positive integer or a non-numeric token")
    return values


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
    bad = parsed.is_null() | parsed.is_nan() | parsed.is_infinite()
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
