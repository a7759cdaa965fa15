"""A corpus of bad inputs, each run through the real Dagster ingestion.

Every case starts from a small slice of the real shared data in one of three formats
(ML-1M ``.dat``, RecBole atomic files, Amazon JSON lines made from the RecBole slice),
applies one defect, and materializes ``raw_dataset`` and the three tables of its dataset in
a throwaway project that already published the good slice (once per format, module-scoped).
Each case declares its outcome:

- ``reject``: the run fails, its error names the file and the line or field, and the
  published tables, their ``.dvc`` pointers, ``data.dvc`` and the DVC remote are
  byte-identical before and after;
- ``handle``: the run succeeds, the cleaning statistics count the defect (an increase over
  the good slice's statistics) and the run's log has the cleaning warning.

The defective files are made at test time; nothing large is committed.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pytest

from recthinker_dagster.artifacts import TABLES
from recthinker_dagster.definitions import build_definitions
from recthinker_dagster.defs import keys
from recthinker_dagster.defs.config import IngestConfig
from tests.support.paths import require_shared

pytestmark = pytest.mark.usefixtures("_offline")

ML_LINES = 1500  # ratings lines of the ML-1M slice (users 1-10)
RECBOLE_USERS = 30  # the RecBole / JSON slice: every interaction of users 1-30 (~3,000)
BOM = b"\xef\xbb\xbf"


@pytest.fixture
def _offline(monkeypatch):
    monkeypatch.setenv("RECTHINKER_OFFLINE", "1")


# ---------------------------------------------------------------- file helpers


def read(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)


def lines(path: Path) -> list[bytes]:
    return read(path).rstrip(b"\n").split(b"\n")


def set_lines(path: Path, rows: list[bytes]) -> None:
    write(path, b"".join(row + b"\n" for row in rows))


def edit_line(path: Path, number: int, change: Callable[[bytes], bytes]) -> None:
    """Replace line ``number`` (1-based) of ``path`` by ``change(line)``."""
    rows = lines(path)
    rows[number - 1] = change(rows[number - 1])
    set_lines(path, rows)


def set_field(path: Path, number: int, index: int, value: bytes, sep: bytes) -> None:
    def change(row: bytes) -> bytes:
        parts = row.split(sep)
        parts[index] = value
        return sep.join(parts)

    edit_line(path, number, change)


def cut_gzip(path: Path) -> None:
    """Replace ``path`` (plain or .gz) by a gzip file cut in the middle of its stream."""
    packed = path.read_bytes() if path.name.endswith(".gz") else gzip.compress(path.read_bytes(), mtime=0)
    target = path if path.name.endswith(".gz") else path.with_name(path.name + ".gz")
    path.unlink()
    target.write_bytes(packed[: len(packed) // 2])


def zipped(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("ml-1m/ratings.dat", data)
    return buffer.getvalue()


def prepend(path: Path, data: bytes) -> None:
    write(path, data + read(path))


# ---------------------------------------------------------------- the three good slices


@dataclass(frozen=True)
class Source:
    """One file format: its dataset, the folder under ``data/`` and the good files there."""

    name: str
    dataset: str
    folder: str
    kcore: int | None
    files: Callable[[], dict[str, bytes]]  # file name -> bytes (.gz names are gzip'd)


def movielens_files() -> dict[str, bytes]:
    shared = {name: require_shared("ml-1m", f"{name}.gz") for name in ("ratings.dat", "movies.dat", "users.dat")}
    ratings = gzip.decompress(shared["ratings.dat"].read_bytes()).split(b"\n")[:ML_LINES]
    return {
        "ratings.dat": b"\n".join(ratings) + b"\n",
        "movies.dat": gzip.decompress(shared["movies.dat"].read_bytes()),
        "users.dat": gzip.decompress(shared["users.dat"].read_bytes()),
    }


def recbole_slice() -> tuple[list[bytes], list[bytes]]:
    """The .inter lines (header first) of users 1..RECBOLE_USERS, and every .item line."""
    folder = require_shared("amazon-cds", "recbole")
    inter = gzip.decompress((folder / "Amazon_CDs.inter.gz").read_bytes()).rstrip(b"\n").split(b"\n")
    item = gzip.decompress((folder / "Amazon_CDs.item.gz").read_bytes()).rstrip(b"\n").split(b"\n")
    kept = [row for row in inter[1:] if int(row.split(b"\t")[0]) <= RECBOLE_USERS]
    return [inter[0], *kept], item


def recbole_files() -> dict[str, bytes]:
    inter, item = recbole_slice()
    return {"Amazon_CDs.inter.gz": b"\n".join(inter) + b"\n", "Amazon_CDs.item.gz": b"\n".join(item) + b"\n"}


def amazon_json_files() -> dict[str, bytes]:
    """The RecBole slice as Amazon 2018 JSON lines: reviews and item metadata."""
    inter, item = recbole_slice()
    asins = {}
    meta = []
    for row in item[1:]:
        item_id, asin, title, categories, brand = row.decode().split("\t")[:5]
        asins[item_id] = asin
        meta.append({"asin": asin, "title": title, "category": [c for c in categories.split(",") if c], "brand": brand})
    reviews = []
    for row in inter[1:]:
        user, item_id, rating, stamp = row.decode().split("\t")
        reviews.append({"reviewerID": f"A{int(user):06d}", "asin": asins.get(item_id, f"X{int(item_id):09d}"),
                        "overall": float(rating), "unixReviewTime": int(float(stamp))})

    def dump(records: list[dict]) -> bytes:
        return b"".join(json.dumps(record).encode() + b"\n" for record in records)

    return {"CDs_and_Vinyl_5.json": dump(reviews), "meta_CDs_and_Vinyl.json": dump(meta)}


SOURCES = {
    "ml-1m": Source("ml-1m", "ml-1m", "ml-1m", None, movielens_files),
    "recbole": Source("recbole", "amazon-cds", "amazon-cds/recbole", None, recbole_files),
    "amazon-json": Source("amazon-json", "amazon-cds", "amazon-cds", 0, amazon_json_files),  # 0: not the 20-core
}


# ---------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    id: str
    source: str  # a SOURCES key
    defect: str  # the defect class
    apply: Callable[[Path], object]  # changes the good files in the source folder
    outcome: str  # "reject" or "handle"
    names: tuple[str, ...] = ()  # reject: what the error must name (the file, the line or field)
    counts: Mapping[str, int] = field(default_factory=dict)  # handle: statistic -> increase over the good slice


def ml(name: str) -> Callable[[Path], Path]:
    return lambda folder: folder / name


RATINGS, MOVIES, USERS = ml("ratings.dat"), ml("movies.dat"), ml("users.dat")
INTER, ITEM = (lambda folder: folder / "Amazon_CDs.inter.gz"), (lambda folder: folder / "Amazon_CDs.item.gz")
REVIEWS, META = ml("CDs_and_Vinyl_5.json"), ml("meta_CDs_and_Vinyl.json")


def json_edit(number: int, change: Callable[[dict], object]) -> Callable[[Path], None]:
    """Edit review ``number`` (1-based) as a dict; ``change`` returns the new JSON value."""
    return lambda folder: edit_line(REVIEWS(folder), number, lambda row: json.dumps(change(json.loads(row))).encode())


def without(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


def blank_titles(folder: Path) -> None:
    rows = lines(ITEM(folder))
    set_lines(ITEM(folder), [rows[0], *[b"\t".join([*row.split(b"\t")[:2], b"", *row.split(b"\t")[3:]]) for row in rows[1:]]])


def drop_column(path: Path, index: int) -> None:
    set_lines(path, [b"\t".join(p for i, p in enumerate(row.split(b"\t")) if i != index) for row in lines(path)])


CASES = [
    # ---- ML-1M .dat (ratings lines are 1-based; the slice has 1,500)
    Case("ml_empty_ratings", "ml-1m", "emptiness", lambda f: write(RATINGS(f), b""), "reject",
         ("ratings.dat", "line 1", "empty")),
    Case("ml_missing_field", "ml-1m", "structure: field count", lambda f: edit_line(
        RATINGS(f), 5, lambda r: r.rsplit(b"::", 1)[0]), "reject", ("ratings.dat", "line 5", "column 'Timestamp'")),
    Case("ml_non_integer_id", "ml-1m", "type: id", lambda f: set_field(RATINGS(f), 7, 0, b"u1", b"::"), "reject",
         ("ratings.dat", "line 7", "column 'UserID'")),
    Case("ml_rating_out_of_range", "ml-1m", "range: rating", lambda f: set_field(RATINGS(f), 9, 2, b"9", b"::"),
         "reject", ("ratings.dat", "line 9", "column 'Rating'")),
    Case("ml_user_id_zero", "ml-1m", "range: non-positive id", lambda f: set_field(RATINGS(f), 3, 0, b"0", b"::"),
         "reject", ("ratings.dat", "line 3", "column 'UserID'")),
    Case("ml_negative_movie_id", "ml-1m", "range: non-positive id", lambda f: set_field(MOVIES(f), 2, 0, b"-2", b"::"),
         "reject", ("movies.dat", "line 2", "column 'MovieID'")),
    Case("ml_timestamp_in_ms", "ml-1m", "range: timestamp", lambda f: edit_line(RATINGS(f), 11, lambda r: r + b"000"),
         "reject", ("ratings.dat", "line 11", "column 'Timestamp'")),
    Case("ml_bom", "ml-1m", "encoding: byte-order mark", lambda f: prepend(RATINGS(f), BOM), "handle",
         counts={"byte_order_marks_stripped": 1}),
    Case("ml_movies_as_utf8", "ml-1m", "encoding: UTF-8 instead of ISO-8859-1",
         lambda f: write(MOVIES(f), read(MOVIES(f)).decode("latin-1").encode("utf-8")), "handle",
         counts={"files_read_as_utf8": 1}),
    Case("ml_duplicate_lines", "ml-1m", "duplicates: interactions",
         lambda f: set_lines(RATINGS(f), lines(RATINGS(f)) + lines(RATINGS(f))[:3]), "handle",
         counts={"duplicate_interactions_dropped": 3}),
    Case("ml_duplicate_movie", "ml-1m", "duplicates: item rows",
         lambda f: set_lines(MOVIES(f), lines(MOVIES(f)) + [b"1::Toy Story again (1995)::Comedy"]), "handle",
         counts={"duplicate_item_rows_dropped": 1}),
    Case("ml_dangling_movie", "ml-1m", "dangling reference: item",
         lambda f: set_lines(RATINGS(f), lines(RATINGS(f)) + [b"1::99999::4::978300761"]), "handle",
         counts={"items_without_metadata_added": 1}),
    Case("ml_dangling_user", "ml-1m", "dangling reference: user",
         lambda f: set_lines(RATINGS(f), lines(RATINGS(f)) + [b"9999::1193::4::978300761"]), "handle",
         counts={"users_without_demographics_added": 1}),
    Case("ml_gzip_cut", "ml-1m", "truncation: gzip stream", lambda f: cut_gzip(RATINGS(f)), "reject",
         ("ratings.dat.gz", "gzip stream is truncated")),
    Case("ml_last_line_cut", "ml-1m", "truncation: last line", lambda f: write(
        RATINGS(f), b"\n".join([*lines(RATINGS(f))[:-1], lines(RATINGS(f))[-1][:5]])), "reject",
         ("ratings.dat", f"line {ML_LINES}")),
    Case("ml_csv_instead", "ml-1m", "wrong format: CSV", lambda f: write(
        RATINGS(f), b"userId,movieId,rating,timestamp\n1,1,4.0,964982703\n"), "reject", ("ratings.dat", "line 1")),
    Case("ml_gzip_without_suffix", "ml-1m", "wrong format: binary",
         lambda f: RATINGS(f).write_bytes(gzip.compress(read(RATINGS(f)), mtime=0)), "reject",
         ("ratings.dat", "line 1", "gzip-compressed")),
    Case("ml_zip_archive", "ml-1m", "wrong format: archive", lambda f: RATINGS(f).write_bytes(zipped(read(RATINGS(f)))),
         "reject", ("ratings.dat", "line 1", "zip archive")),
    Case("ml_empty_movies", "ml-1m", "emptiness", lambda f: write(MOVIES(f), b"\n\n"), "reject",
         ("movies.dat", "line 1", "empty")),
    # ---- RecBole atomic files (line 1 is the header)
    Case("rb_header_only_item", "recbole", "header only: items", lambda f: set_lines(ITEM(f), lines(ITEM(f))[:1]),
         "reject", ("Amazon_CDs.item.gz", "column 'title'", "0 of")),
    Case("rb_header_only_inter", "recbole", "header only: interactions",
         lambda f: set_lines(INTER(f), lines(INTER(f))[:1]), "reject", ("Amazon_CDs.inter.gz", "line 2", "header")),
    Case("rb_titles_blank", "recbole", "emptiness: item fields", blank_titles, "reject",
         ("Amazon_CDs.item.gz", "column 'title'", "ingest.metadata_min_share")),
    Case("rb_missing_timestamp_field", "recbole", "structure: header", lambda f: drop_column(INTER(f), 3), "reject",
         ("Amazon_CDs.inter.gz", "line 1", "column 'timestamp'")),
    Case("rb_item_latin1", "recbole", "encoding: ISO-8859-1 instead of UTF-8",
         lambda f: set_field(ITEM(f), 4, 2, "Beyoncé".encode("latin-1"), b"\t"), "reject",
         ("Amazon_CDs.item.gz", "line 4", "not valid utf-8")),
    Case("rb_bom", "recbole", "encoding: byte-order mark", lambda f: prepend(INTER(f), BOM), "handle",
         counts={"byte_order_marks_stripped": 1}),
    Case("rb_item_id_zero", "recbole", "range: non-positive id", lambda f: set_field(INTER(f), 6, 1, b"0", b"\t"),
         "reject", ("Amazon_CDs.inter.gz", "line 6", "column 'item_id'")),
    Case("rb_timestamp_text", "recbole", "type: timestamp", lambda f: set_field(INTER(f), 8, 3, b"yesterday", b"\t"),
         "reject", ("Amazon_CDs.inter.gz", "line 8", "column 'timestamp'")),
    Case("rb_gzip_cut", "recbole", "truncation: gzip stream", lambda f: cut_gzip(INTER(f)), "reject",
         ("Amazon_CDs.inter.gz", "gzip stream is truncated")),
    Case("rb_duplicate_item_rows", "recbole", "duplicates: item rows",
         lambda f: set_lines(ITEM(f), lines(ITEM(f)) + lines(ITEM(f))[1:3]), "handle",
         counts={"duplicate_item_rows_dropped": 2}),
    Case("rb_json_instead", "recbole", "wrong format: JSON lines",
         lambda f: write(INTER(f), b'{"user_id": 1, "item_id": 2}\n'), "reject",
         ("Amazon_CDs.inter.gz", "line 1", "column 'user_id'")),
    # ---- Amazon JSON lines
    Case("js_malformed_line", "amazon-json", "structure: malformed JSON",
         lambda f: edit_line(REVIEWS(f), 4, lambda r: r[:30]), "reject", ("CDs_and_Vinyl_5.json", "line 4")),
    Case("js_missing_key", "amazon-json", "structure: missing key", json_edit(5, lambda r: without(r, "asin")),
         "reject", ("CDs_and_Vinyl_5.json", "line 5", "column 'asin'")),
    Case("js_rating_as_text", "amazon-json", "type: rating", json_edit(6, lambda r: {**r, "overall": "5.0"}),
         "reject", ("CDs_and_Vinyl_5.json", "line 6", "column 'overall'")),
    Case("js_negative_time", "amazon-json", "range: timestamp", json_edit(2, lambda r: {**r, "unixReviewTime": -5}),
         "reject", ("CDs_and_Vinyl_5.json", "line 2", "column 'unixReviewTime'")),
    Case("js_empty_reviews", "amazon-json", "emptiness", lambda f: write(REVIEWS(f), b""), "reject",
         ("CDs_and_Vinyl_5.json", "line 1", "no reviews")),
    Case("js_empty_metadata", "amazon-json", "emptiness: metadata", lambda f: write(META(f), b""), "reject",
         ("meta_CDs_and_Vinyl.json", "column 'title'")),
    Case("js_array_instead", "amazon-json", "wrong format: JSON array",
         lambda f: write(REVIEWS(f), json.dumps([json.loads(r) for r in lines(REVIEWS(f))]).encode()), "reject",
         ("CDs_and_Vinyl_5.json", "line 1", "list")),
    Case("js_duplicate_reviews", "amazon-json", "duplicates: interactions",
         lambda f: set_lines(REVIEWS(f), lines(REVIEWS(f)) + lines(REVIEWS(f))[:2]), "handle",
         counts={"duplicate_interactions_dropped": 2}),
    Case("js_dangling_asin", "amazon-json", "dangling reference: item", json_edit(3, lambda r: {**r, "asin": "B0NOSUCH00"}),
         "handle", counts={"items_without_metadata_added": 1}),
    Case("js_bom", "amazon-json", "encoding: byte-order mark", lambda f: prepend(META(f), BOM), "handle",
         counts={"byte_order_marks_stripped": 1}),
    Case("js_gzip_cut", "amazon-json", "truncation: gzip stream", lambda f: cut_gzip(REVIEWS(f)), "reject",
         ("CDs_and_Vinyl_5.json.gz", "gzip stream is truncated")),
]


def test_the_corpus_covers_at_least_20_defect_classes():
    assert len({case.defect for case in CASES}) >= 20, sorted({case.defect for case in CASES})
    assert {case.source for case in CASES} == set(SOURCES)
    assert len({case.id for case in CASES}) == len(CASES)
    assert all(case.names for case in CASES if case.outcome == "reject")
    assert all(case.counts for case in CASES if case.outcome == "handle")


# ---------------------------------------------------------------- running a case


@dataclass
class Project:
    """A throwaway project that published the good slice of one source."""

    source: Source
    resources: dict
    root: Path
    good_stats: dict

    @property
    def folder(self) -> Path:
        return self.root / "data" / self.source.folder

    def restore_good_files(self) -> None:
        for path in list(self.folder.iterdir()) if self.folder.is_dir() else []:
            path.unlink()
        for name, data in self.source.files().items():
            write(self.folder / name, data)

    def published(self) -> dict[str, bytes]:
        """Every published byte that a rejected case must leave alone."""
        state = {}
        roots = [self.root / "assets" / table / self.source.dataset for table in TABLES]
        pointers = [root.with_name(root.name + ".dvc") for root in roots] + [self.root / "data.dvc"]
        for root in [*roots, self.root / "dvc_remote"]:
            for path in sorted(root.rglob("*")) if root.is_dir() else []:
                if path.is_file():
                    state[str(path.relative_to(self.root))] = path.read_bytes()
        for pointer in pointers:
            state[str(pointer.relative_to(self.root))] = pointer.read_bytes() if pointer.is_file() else b"(absent)"
        return state

    def materialize(self) -> tuple[dg.ExecuteInProcessResult, dg.DagsterInstance]:
        """``raw_dataset`` and the three tables (with their checks), as the Dagster UI would."""
        dataset = self.source.dataset
        defs = build_definitions([dataset], resources=self.resources)
        job = defs.resolve_implicit_global_asset_job_def()
        config = IngestConfig(profile="smoke", allow_download=False, kcore=self.source.kcore)
        prefix = keys.dataset_key(dataset, "raw_dataset").path[0]
        instance = dg.DagsterInstance.ephemeral()
        result = job.execute_in_process(
            run_config=dg.RunConfig(ops={f"{prefix}__raw_dataset": config, f"{prefix}__ingest": config}),
            instance=instance,
            asset_selection=[keys.dataset_key(dataset, name) for name in ("raw_dataset", *TABLES)],
            raise_on_error=False,
        )
        return result, instance


def cleaning_stats(result: dg.ExecuteInProcessResult, dataset: str) -> dict:
    key = keys.dataset_key(dataset, "interactions")
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == key]
    return event.materialization.metadata["cleaning"].value  # type: ignore[return-value]


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures, "the run failed without a step failure"
    error = failures[0].step_failure_data.error
    return error.to_string() if error else ""


@pytest.fixture(scope="module")
def projects(tmp_path_factory, make_project):
    """Source name -> its project with the good slice published (made on first use)."""
    made: dict[str, Project] = {}

    def get(name: str) -> Project:
        if name not in made:
            source = SOURCES[name]
            root = tmp_path_factory.mktemp(f"bad-inputs-{name}")
            project = Project(source, make_project(root).resources, root, {})
            project.restore_good_files()
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("RECTHINKER_OFFLINE", "1")
                result, _ = project.materialize()
            assert result.success, failure_message(result)
            published = project.published()
            absent = [name for name, data in published.items() if data == b"(absent)"]
            assert not absent and any(name.startswith("dvc_remote") for name in published), absent
            project.good_stats = cleaning_stats(result, source.dataset)
            made[name] = project
        return made[name]

    return get


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, projects):
    project = projects(case.source)
    project.restore_good_files()
    case.apply(project.folder)
    before = project.published()
    result, instance = project.materialize()

    if case.outcome == "reject":
        assert not result.success, f"{case.id}: the run succeeded on bad input"
        message = failure_message(result)
        for name in case.names:
            assert name.lower() in message.lower(), f"{case.id}: {name!r} not named in:\n{message}"
        after = project.published()
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"{case.id}: published files changed: {changed}"
        return

    assert result.success, failure_message(result)
    stats = cleaning_stats(result, project.source.dataset)
    for stat, increase in case.counts.items():
        assert stats.get(stat, 0) - project.good_stats.get(stat, 0) == increase, (stat, stats.get(stat))
    notes = {note["action"]: note["message"] for note in stats["cleaning_notes"]}
    logged = [(entry.level, entry.user_message) for entry in instance.all_logs(result.run_id)]
    for stat in case.counts:  # the note's line (count and examples) is a warning in the run
        levels = {level for level, line in logged if notes[stat] in line}
        assert logging.WARNING in levels, f"{case.id}: no warning for {stat} in the run's log ({levels})"
