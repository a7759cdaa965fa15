"""Errors raised for bad input data. Each names the file and, where known, the line and column."""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A source file does not match the format its loader expects."""

    def __init__(
        self,
        path: str | Path,
        problem: str,
        *,
        line: int | None = None,
        column: str | None = None,
        expected: str | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.column = column
        self.problem = problem
        self.expected = expected
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column '{column}'"
        message = f"{where}: {problem}"
        if expected:
            message += f" (expected {expected})"
        super().__init__(message)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are absent and could not be downloaded."""


class MetadataQualityError(DataFormatError):
    """Too few items have metadata (a non-empty title): the ingest stops before publishing."""
