"""Dataset loaders, cleaning, the synthetic generator and downloads.

Real data comes from ``$RECTHINKER_SHARED_DATA`` (default ``<repo>/../shared/data``);
small hand-made files from ``tests/fixtures/loaders``. Nothing here touches the network:
downloads are tested against a loopback HTTP server.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import shutil
import threading
import zipfile
from pathlib import Path

import polars as pl
import pytest

from recthinker_dagster.data import download
from recthinker_dagster.data.amazon_json import load_amazon_json, read_metadata, read_reviews
from recthinker_dagster.data.cleaning import clean_dataset, clean_text, kcore_filter, tied_targets
from recthinker_dagster.data.coverage import check_metadata_share
from recthinker_dagster.data.errors import DataFormatError, DatasetNotFoundError, MetadataQualityError
from recthinker_dagster.data.movielens import load_movielens_1m, read_movies, read_ratings, read_users
from recthinker_dagster.data.notes import notes_of, warning_lines
from recthinker_dagster.data.recbole import load_recbole, read_item
from recthinker_dagster.data.schema import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    USERS_SCHEMA,
    Dataset,
)
from recthinker_dagster.data.sources import dataset_files, load_dataset
from recthinker_dagster.data.synthetic import generate_synthetic
from tests.support.paths import FIXTURES_DIR

FIXTURES = FIXTURES_DIR / "loaders"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach the network: downloads are off unless a test turns them on."""
    monkeypatch.setenv("RECTHINKER_OFFLINE", "1")
    monkeypatch.setenv("no_proxy", "*")


def copy_fixture(folder: str, dest: Path, *, gz: bool = False) -> Path:
    """Copy a fixture folder to ``dest``, gzip'ing every file when ``gz``."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in (FIXTURES / folder).iterdir():
        if gz:
            (dest / f"{src.name}.gz").write_bytes(gzip.compress(src.read_bytes()))
        else:
            shutil.copy(src, dest / src.name)
    return dest


def write(path: Path, data: str | bytes, *, gz: bool = False) -> Path:
    raw = data.encode() if isinstance(data, str) else data
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def assert_schema(dataset: Dataset) -> None:
    assert dict(dataset.interactions.schema) == INTERACTIONS_SCHEMA
    assert dict(dataset.items.schema) == ITEMS_SCHEMA
    assert dict(dataset.users.schema) == USERS_SCHEMA


def assert_consistent(dataset: Dataset) -> None:
    """Cleaned-dataset invariants: items/users are exactly the interacting ones, once each."""
    assert_schema(dataset)
    inter = dataset.interactions
    assert set(dataset.items["item_id"]) == set(inter["item_id"])
    assert set(dataset.users["user_id"]) == set(inter["user_id"])
    assert dataset.items["item_id"].is_unique().all()
    assert dataset.users["user_id"].is_unique().all()
    assert inter.select(pl.struct("user_id", "item_id", "timestamp").is_unique().all()).item()


# ---------------------------------------------------------------- real shared data


@pytest.fixture(scope="module")
def real_ml1m(shared_data):
    return load_dataset("ml-1m", shared_data, allow_download=False)


@pytest.fixture(scope="module")
def real_cds(shared_data):
    return load_dataset("amazon-cds", shared_data, allow_download=False)


def test_real_ml1m_counts(real_ml1m):
    dataset, stats = real_ml1m
    assert_consistent(dataset)
    inter = dataset.interactions
    assert inter.height == stats["rows_read"] == 487_650
    assert inter["user_id"].n_unique() == dataset.users.height == 2_999
    assert inter["item_id"].n_unique() == dataset.items.height == 3_615
    counts = dict(inter.group_by("rating").len().iter_rows())
    assert counts == {1.0: 27_472, 2.0: 53_838, 3.0: 127_216, 4.0: 170_579, 5.0: 108_545}
    assert inter["order"].to_list() == list(range(487_650))
    assert inter.row(0) == ("1", "1193", 5.0, 978300760, 0)
    assert stats["source_format"] == "movielens-1m" and stats["kcore"] == 0
    assert stats["unused_user_rows_dropped"] == 6_040 - 2_999
    assert len(stats["files"]) == 3 and all(f.endswith(".dat.gz") for f in stats["files"])


def test_real_ml1m_items_and_users(real_ml1m):
    dataset, _ = real_ml1m
    items = {row["item_id"]: row for row in dataset.items.iter_rows(named=True)}
    assert items["1"]["title"] == "Toy Story" and items["1"]["year"] == 1995
    assert items["1"]["categories"] == ["Animation", "Children's", "Comedy"]
    assert items["1"]["creator"] is None and items["1"]["has_metadata"]
    assert dataset.items["year"].null_count() == 0
    assert not dataset.items["title"].str.contains(r"\(\d{4}\)$").any()
    users = {row["user_id"]: row for row in dataset.users.iter_rows(named=True)}
    assert users["1"] == {"user_id": "1", "gender": "F", "age": 1, "occupation": "K-12 student",
                          "zip_code": "48067", "has_demographics": True}
    assert users["2"]["occupation"] == "self-employed" and users["2"]["age"] == 56
    assert dataset.users["occupation"].null_count() == 0


def test_real_amazon_recbole(real_cds):
    dataset, stats = real_cds
    assert_consistent(dataset)
    assert stats["source_format"] == "recbole" and stats["kcore"] == 0
    assert dataset.interactions.height == 107_517
    assert dataset.users.height == 2_230 and dataset.items.height == 2_672
    # 1,446 item rows, 132 of them with only an HTML title: an item has metadata only with a title
    assert stats["item_rows_read"] == 1_446 and stats["items_without_metadata_added"] == 1_226
    assert int(dataset.items["has_metadata"].sum()) == stats["items_with_metadata"] == 1_314
    assert stats["items_without_metadata"] == 1_226 + 132 and stats["items_with_metadata_share"] == 0.4918
    assert stats["titles_nulled"] == stats["item_rows_without_title"] == 132
    assert stats["html_titles_cleaned"] >= 132
    counts = dict(dataset.interactions.group_by("rating").len().iter_rows())
    assert counts == {5.0: 57_414, 4.0: 27_221, 3.0: 11_498, 2.0: 5_180, 1.0: 6_204}
    titles = dataset.items["title"].drop_nulls()
    assert not titles.str.contains(r"<|&amp;|&gt;|/>").any()
    assert "Venus & Mars" in titles.to_list()
    row = dataset.items.filter(pl.col("item_id") == "10").row(0, named=True)
    assert row["title"] == "Pink Floyd - Pulse VHS" and row["creator"] == "David Gilmour"
    assert row["categories"] == ["Rock", "Progressive", "Progressive Rock"]
    bare = dataset.items.filter(~pl.col("has_metadata"))
    assert bare["title"].null_count() == bare.height
    placeholders = bare.filter(pl.col("creator").is_null())
    assert placeholders.height >= 1_226 and placeholders["categories"].list.len().sum() == 0
    untitled = dataset.items.filter(pl.col("item_id") == "14").row(0, named=True)  # an HTML-only title
    assert untitled["title"] is None and not untitled["has_metadata"] and untitled["creator"] == "Lil' Kim"
    assert not dataset.users["has_demographics"].any()


def test_dataset_files_real(shared_data):
    assert [p.name for p in dataset_files("ml-1m", shared_data)] == [
        "movies.dat.gz", "ratings.dat.gz", "users.dat.gz"]
    assert [p.name for p in dataset_files("amazon-cds", shared_data)] == [
        "Amazon_CDs.inter.gz", "Amazon_CDs.item.gz"]
    assert dataset_files("synthetic", shared_data) == []


# ---------------------------------------------------------------- fixtures, every format


@pytest.mark.parametrize("gz", [False, True])
def test_movielens_fixture(tmp_path, gz):
    folder = copy_fixture("ml-1m", tmp_path / "ml-1m", gz=gz)
    raw = load_movielens_1m(folder)
    assert_schema(raw)
    assert raw.interactions.height == 8 and raw.users.height == 4
    titles = dict(raw.items.select("item_id", "title").iter_rows())
    assert titles["2000"] == "Seven (Se7en)" and titles["3500"] == "Misérables, Les"
    assert read_users(next(folder.glob("users.dat*")))["zip_code"][3] == "02460"
    dataset, stats = load_dataset("ml-1m", tmp_path)
    assert_consistent(dataset)
    assert stats["unused_item_rows_dropped"] == 2 and stats["unused_user_rows_dropped"] == 1


def test_plain_file_preferred_over_gz(tmp_path):
    folder = copy_fixture("ml-1m", tmp_path / "ml-1m")
    (folder / "ratings.dat.gz").write_bytes(b"not even gzip")
    assert [p.name for p in dataset_files("ml-1m", tmp_path)][1] == "ratings.dat"
    assert load_dataset("ml-1m", tmp_path)[0].interactions.height == 8


@pytest.mark.parametrize("gz", [False, True])
def test_amazon_json_fixture(tmp_path, gz):
    folder = copy_fixture("amazon-json", tmp_path / "amazon-cds", gz=gz)
    suffix = ".gz" if gz else ""
    raw = load_amazon_json(folder / f"CDs_and_Vinyl_5.json{suffix}",
                           folder / f"meta_CDs_and_Vinyl.json{suffix}")
    assert_schema(raw)
    assert raw.interactions.height == 7 and raw.items.height == 5
    assert raw.interactions["order"].to_list() == list(range(7))
    first = raw.items.row(0, named=True)
    assert first["creator"] == "Lil' Kim" and first["year"] == 1996
    assert first["categories"] == ["CDs & Vinyl", "Rap & Hip-Hop", "East Coast"]
    assert first["description"] == "Debut album by Lil' Kim."

    dataset, stats = load_dataset("amazon-cds", tmp_path, kcore=0)
    assert_consistent(dataset)
    assert stats["source_format"] == "amazon-json"
    assert stats["duplicate_interactions_dropped"] == 1
    assert stats["duplicate_item_rows_dropped"] == 1
    assert stats["unused_item_rows_dropped"] == 1  # B0UNUSED01
    assert stats["items_without_metadata"] == 2  # B0000NOMETA, and B000000112 (an HTML-only title)
    assert stats["titles_nulled"] == 1
    items = {r["item_id"]: r for r in dataset.items.iter_rows(named=True)}
    assert items["B000000112"]["title"] is None and not items["B000000112"]["has_metadata"]
    assert items["B000000112"]["creator"] == "Lil' Kim"  # the row's other fields stay
    assert items["B00000016K"]["title"] == "Wheels Of Fire"  # first metadata row wins
    assert items["0001393774"]["title"] == "Tales & Mysteries"
    assert items["0001393774"]["description"] == "Songs & hymns"
    assert items["0001393774"]["creator"] is None  # empty brand
    assert items["B0000NOMETA"] == {
        "item_id": "B0000NOMETA", "title": None, "year": None, "categories": [],
        "creator": None, "description": None, "has_metadata": False}
    # the JSON path defaults to the paper's 20-core, far more than this fixture has
    assert load_dataset("amazon-cds", tmp_path)[1]["kcore"] == 20


def test_amazon_2014_metadata_literals(tmp_path):
    items = read_metadata(FIXTURES / "amazon-json" / "meta_CDs_and_Vinyl.2014.json")
    first = items.row(0, named=True)
    assert first["title"] == "Hard Core" and first["creator"] == "Lil' Kim"
    assert first["categories"] == ["CDs & Vinyl", "Rap & Hip-Hop", "East Coast"]
    assert first["description"] == "Debut album."
    assert items["item_id"].to_list() == ["B000000112", "B00000016K"]


@pytest.mark.parametrize("gz", [False, True])
def test_recbole_fixture(tmp_path, gz):
    folder = copy_fixture("recbole", tmp_path / "amazon-cds" / "recbole", gz=gz)
    raw = load_recbole(folder)
    assert raw.name == "mini"
    assert raw.interactions["timestamp"].to_list() == [
        881250949, 881250950, 891717350, 891717360, 878887116]
    item = raw.items.row(0, named=True)
    assert item["title"] == "Toy Story" and item["year"] == 1995
    assert item["categories"] == ["Animation", "Children's", "Comedy"]  # whitespace split
    assert raw.items["year"][2] is None
    assert raw.users.row(0) == ("1", "M", 24, "technician", "85711", True)
    dataset, stats = load_dataset("amazon-cds", tmp_path)
    assert_consistent(dataset)
    assert stats["source_format"] == "recbole" and stats["kcore"] == 0
    assert stats["items_without_metadata_added"] == 1  # item 12
    assert stats["unused_item_rows_dropped"] == 1  # item 13
    assert stats["users_without_demographics_added"] == 1  # user 3
    assert dataset.users.filter(pl.col("user_id") == "3")["has_demographics"].to_list() == [False]


# ---------------------------------------------------------------- bad input


ML_BAD = [
    ("1::1193::5::978300760\n1::661::3\n", 2, "Timestamp", "4 fields"),
    ("1::1193::5::978300760\n1::661::3::978300760::x\n", 2, "extra field 5", "4 fields"),
    ("1::1193::9::978300760\n", 1, "Rating", "from 1 to 5"),
    ("1::1193::5::978300760\n\nabc::661::3::978302109\n", 3, "UserID", "an integer"),
    ("1::x12::5::978300760\n", 1, "MovieID", "an integer"),
    ("1::1193::5::978300760\n1::661::3::soon\n", 2, "Timestamp", "an integer"),
]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(("text", "line", "column", "expected"), ML_BAD)
def test_movielens_bad_lines(tmp_path, gz, text, line, column, expected):
    path = write(tmp_path / ("ratings.dat.gz" if gz else "ratings.dat"), text, gz=gz)
    with pytest.raises(DataFormatError) as info:
        read_ratings(path)
    message = str(info.value)
    assert str(path) in message and f"line {line}," in message
    assert f"column '{column}'" in message and expected in message
    assert (info.value.line, info.value.column) == (line, column)


RECBOLE_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
RECBOLE_BAD = [
    (RECBOLE_HEADER + "1\t10\t5.0\t1\n2\t10\t9.0\t2\n", 3, "rating", "from 1 to 5"),
    (RECBOLE_HEADER + "1\t10\t5.0\tyesterday\n", 2, "timestamp", "a number"),
    (RECBOLE_HEADER + "1\t10\t5.0\n", 2, "timestamp", "4 fields"),
    ("user_id:token\titem_id:token\trating:float\n1\t10\t5.0\n", 1, "timestamp", "header"),
]


@pytest.mark.parametrize(("text", "line", "column", "expected"), RECBOLE_BAD)
def test_recbole_bad_lines(tmp_path, text, line, column, expected):
    write(tmp_path / "bad.inter", text)
    with pytest.raises(DataFormatError) as info:
        load_recbole(tmp_path)
    message = str(info.value)
    assert "bad.inter" in message and f"line {line}," in message
    assert f"column '{column}'" in message and expected in message


GOOD_REVIEW = '{"reviewerID": "A1", "asin": "B1", "overall": 5.0, "unixReviewTime": 1300000000}\n'
JSON_BAD = [
    (GOOD_REVIEW + '{"reviewerID": "A1", "asin": "B2", "overall": 5.0,\n', 2, None,
     "malformed JSON"),
    (GOOD_REVIEW * 2 + '{"reviewerID": "A1", "overall": 5.0, "unixReviewTime": 1}\n', 3, "asin",
     "missing required key"),
    (GOOD_REVIEW + '{"reviewerID": "A1", "asin": "B2", "overall": 9, "unixReviewTime": 1}\n', 2,
     "overall", "from 1 to 5"),
    (GOOD_REVIEW + '{"reviewerID": "A1", "asin": "B2", "overall": 4, "unixReviewTime": "x"}\n', 2,
     "unixReviewTime", "unix seconds"),
]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(("text", "line", "column", "expected"), JSON_BAD)
def test_amazon_json_bad_lines(tmp_path, gz, text, line, column, expected):
    path = write(tmp_path / ("reviews.json.gz" if gz else "reviews.json"), text, gz=gz)
    with pytest.raises(DataFormatError) as info:
        read_reviews(path)
    message = str(info.value)
    assert str(path) in message and f"line {line}," in message and expected in message
    assert info.value.column is not None and "column '" in message
    if column:
        assert info.value.column == column


def test_metadata_missing_asin(tmp_path):
    path = write(tmp_path / "meta.json", '{"asin": "B1"}\n{"title": "no asin"}\n')
    with pytest.raises(DataFormatError, match=r"line 2, column 'asin'.*missing required key"):
        read_metadata(path)


def _damaged(raw: bytes, how: str) -> bytes:
    data = gzip.compress(raw)
    if how == "truncated":
        return data[: len(data) // 2]
    corrupt = bytearray(data)
    corrupt[-8] ^= 0xFF  # CRC32 in the trailer
    return bytes(corrupt)


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_damaged_gzip(tmp_path, how):
    ratings = (FIXTURES / "ml-1m" / "ratings.dat").read_bytes() * 200
    path = write(tmp_path / "ratings.dat.gz", _damaged(ratings, how))
    with pytest.raises(DataFormatError, match="gzip stream is truncated or corrupt") as info:
        read_ratings(path)
    assert str(path) in str(info.value)
    reviews = (FIXTURES / "amazon-json" / "CDs_and_Vinyl_5.json").read_bytes() * 50
    path = write(tmp_path / "reviews.json.gz", _damaged(reviews, how))
    with pytest.raises(DataFormatError, match="gzip stream is truncated or corrupt"):
        read_reviews(path)


def test_missing_files_say_what_to_put_where(tmp_path, monkeypatch):
    (tmp_path / "ml-1m").mkdir()
    write(tmp_path / "ml-1m" / "ratings.dat", "1::1::5::1\n")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("ml-1m", tmp_path)
    message = str(info.value)
    for part in ("ratings.dat", "movies.dat", "users.dat", str((tmp_path / "ml-1m").resolve()),
                 download.ML1M_URL, "RECTHINKER_OFFLINE"):
        assert part in message
    with pytest.raises(DatasetNotFoundError, match="movies.dat"):
        load_movielens_1m(tmp_path / "ml-1m")
    monkeypatch.delenv("RECTHINKER_OFFLINE")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("amazon-cds", tmp_path, allow_download=False)
    message = str(info.value)
    for part in ("CDs_and_Vinyl_5.json.gz", "meta_CDs_and_Vinyl.json.gz", "recbole",
                 download.AMAZON_CDS_URLS["CDs_and_Vinyl_5.json.gz"], "allow_download"):
        assert part in message
    with pytest.raises(DatasetNotFoundError):
        dataset_files("ml-1m", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("ml-20m", tmp_path)


# ---------------------------------------------------------------- cleaning


def test_clean_text():
    titles = pl.Series([
        "<span id=parentalAdvisory class=a-size-medium a-color-secondary a-text-normal",
        "Venus &amp; Mars", "The Singles 86&gt;98", "<b>Bold</b>  title",
        "Fearless,Country &amp; Western - Country />", "   ", None, "AC/DC <Live>",
    ])
    assert clean_text(titles).to_list() == [
        None, "Venus & Mars", "The Singles 86>98", "Bold title",
        "Fearless,Country & Western - Country", None, None, "AC/DC",
    ]


def _frame(rows, schema):
    return pl.DataFrame(rows, schema=list(schema.items()), orient="row")


def test_clean_dataset_duplicates_placeholders_and_kcore():
    inter = _frame([("u1", "a", 5.0, 10, 0), ("u1", "a", 4.0, 10, 1), ("u1", "b", 3.0, 11, 2),
                    ("u2", "a", 2.0, 12, 3), ("u2", "b", 1.0, 13, 4), ("u3", "c", 5.0, 14, 5)],
                   INTERACTIONS_SCHEMA)
    items = _frame([("a", "A &amp; B", 1999, ["x"], None, None, True),
                    ("z", "unused", None, [], None, None, True)], ITEMS_SCHEMA)
    users = _frame([("u1", "F", 25, "writer", "1", True)], USERS_SCHEMA)
    dataset, stats = clean_dataset(Dataset("t", inter, items, users))
    assert_consistent(dataset)
    assert stats["duplicate_interactions_dropped"] == 1
    assert dataset.interactions["rating"][0] == 5.0  # first by order kept
    assert stats["items_without_metadata_added"] == 2 and stats["unused_item_rows_dropped"] == 1
    assert stats["users_without_demographics_added"] == 2
    assert dataset.items["title"].to_list() == ["A & B", None, None]
    cored, stats = clean_dataset(Dataset("t", inter, items, users), kcore=2)
    assert set(cored.interactions["user_id"]) == {"u1", "u2"}
    assert set(cored.items["item_id"]) == {"a", "b"}
    assert stats["kcore_interactions_dropped"] == 1


def test_every_cleaning_action_is_a_note_with_its_count_and_three_examples():
    inter = _frame([("u1", "a", 5.0, 10, 0), ("u1", "a", 4.0, 10, 1), ("u1", "a", 3.0, 10, 2),
                    ("u1", "a", 3.0, 10, 3), ("u1", "a", 3.0, 10, 4), ("u2", "b", 1.0, 13, 5)],
                   INTERACTIONS_SCHEMA)
    items = _frame([("a", "<b></b>", None, ["x"], "Artist", None, True), ("a", "again", None, [], None, None, True)],
                   ITEMS_SCHEMA)
    users = _frame([("u1", "F", 25, "writer", "1", True)], USERS_SCHEMA)
    _, stats = clean_dataset(Dataset("t", inter, items, users))
    notes = {note.action: note for note in notes_of(stats)}
    assert set(notes) == {"duplicate_interactions_dropped", "duplicate_item_rows_dropped",
                          "items_without_metadata_added", "html_titles_cleaned", "item_rows_without_title",
                          "users_without_demographics_added"}
    dropped = notes["duplicate_interactions_dropped"]
    assert dropped.count == stats["duplicate_interactions_dropped"] == 4 and len(dropped.examples) == 3
    assert dropped.examples[0] == "user_id=u1, item_id=a, timestamp=10, order=1"
    assert notes["items_without_metadata_added"].examples == ("b",)
    assert stats["items_with_metadata_share"] == 0.0  # 'a' has only an HTML title
    json.dumps(stats)
    lines = warning_lines({"dataset": "t", **stats})
    assert "t: duplicate interactions dropped" in lines[0] and "4 (e.g. user_id=u1" in lines[0]


def test_ties_at_the_end_of_a_history_are_counted():
    inter = _frame([("u1", "a", 5.0, 10, 0), ("u1", "b", 5.0, 20, 1), ("u1", "c", 5.0, 20, 2),  # test and valid tie
                    ("u2", "a", 5.0, 10, 3), ("u2", "b", 5.0, 10, 4), ("u2", "c", 5.0, 30, 5),  # valid ties
                    ("u3", "a", 5.0, 10, 6)], INTERACTIONS_SCHEMA)
    assert tied_targets(inter) == {"tied_test_targets": 1, "tied_valid_targets": 2}


def test_metadata_share_warns_then_fails(tmp_path):
    stats = {"items_with_metadata": 40, "items": 100, "items_with_metadata_share": 0.4}
    assert check_metadata_share(stats, "items.txt", warn_share=0.3, min_share=0.2) is None
    assert "40 of 100 items (40.0%)" in check_metadata_share(stats, "items.txt", warn_share=0.45, min_share=0.2)
    with pytest.raises(MetadataQualityError) as info:
        check_metadata_share(stats, "items.txt", warn_share=0.5, min_share=0.45)
    assert "items.txt, column 'title'" in str(info.value) and "ingest.metadata_min_share" in str(info.value)
    folder = copy_fixture("recbole", tmp_path / "amazon-cds" / "recbole")
    (folder / "mini.item").write_text((folder / "mini.item").read_text().splitlines()[0] + "\n")
    with pytest.raises(MetadataQualityError, match="mini.item, column 'title': only 0 of"):
        load_dataset("amazon-cds", tmp_path)
    assert load_dataset("amazon-cds", tmp_path, metadata_min_share=0.0)[1]["items_with_metadata_share"] == 0.0


def test_text_decoding_strips_a_bom_and_reads_utf8_movielens(tmp_path):
    notes: list = []
    path = write(tmp_path / "movies.dat", b"\xef\xbb\xbf" + "1::Misérables, Les (1995)::Drama\n".encode())
    assert read_movies(path, notes)["title"].to_list() == ["Misérables, Les"]
    assert [n.action for n in notes] == ["byte_order_marks_stripped", "files_read_as_utf8"]
    latin = write(tmp_path / "latin.dat", "1::Misérables, Les (1995)::Drama\n".encode("latin-1"))
    assert read_movies(latin)["title"].to_list() == ["Misérables, Les"]
    bad = write(tmp_path / "bad.item", "item_id\ttitle\n1\tok\n2\tBeyoncé\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"bad.item, line 3: byte 0xe9 at character 9 is not valid utf-8"):
        read_item(bad)


def test_kcore_is_iterative():
    rows = [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "a"), ("u3", "c")]
    inter = pl.DataFrame(rows, schema=["user_id", "item_id"], orient="row")
    # dropping item c leaves u3 with one interaction, which then goes too
    assert sorted(kcore_filter(inter, 2).rows()) == rows[:4]


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_fast():
    import time

    start = time.perf_counter()
    first = generate_synthetic(300, 500, seed=7)
    assert time.perf_counter() - start < 1.0
    again = generate_synthetic(300, 500, seed=7)
    other = generate_synthetic(300, 500, seed=8)
    for table in ("interactions", "items", "users"):
        assert getattr(first, table).equals(getattr(again, table))
    assert not first.interactions.equals(other.interactions)


def test_synthetic_structure():
    dataset = generate_synthetic()
    assert_consistent(dataset)
    inter = dataset.interactions
    lengths = inter.group_by("user_id").len()["len"]
    assert lengths.min() >= 20
    assert (lengths <= 50).sum() >= 30 and (lengths >= 200).sum() >= 10
    steps = inter.sort("user_id", "order").select(
        (pl.col("timestamp").diff().over("user_id") > 0) | pl.col("timestamp").diff().over(
            "user_id").is_null())
    assert steps.to_series().all()
    assert set(inter["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    missing = (~dataset.items["has_metadata"]).sum()
    assert 0 < missing < dataset.items.height // 4
    assert dataset.items.filter(~pl.col("has_metadata"))["title"].null_count() == missing
    # collaborative signal: a user's history concentrates on a few genres
    genre = dataset.items.select("item_id", pl.col("categories").list.first().alias("genre"))
    joined = inter.join(genre, on="item_id").drop_nulls("genre")
    top_share = (joined.group_by("user_id", "genre").len()
                 .group_by("user_id").agg((pl.col("len").max() / pl.col("len").sum()).alias("s")))
    assert top_share["s"].mean() > 2.5 / 8
    # and ratings follow the same taste: top-genre items are rated higher
    favourite = joined.group_by("user_id", "genre").len().sort("len", descending=True).group_by(
        "user_id").first().select("user_id", pl.col("genre").alias("fav"))
    rated = joined.join(favourite, on="user_id")
    fav = rated.filter(pl.col("genre") == pl.col("fav"))["rating"].mean()
    rest = rated.filter(pl.col("genre") != pl.col("fav"))["rating"].mean()
    assert fav > rest + 0.3


def test_synthetic_through_load_dataset(tmp_path):
    dataset, stats = load_dataset("synthetic", tmp_path,
                                  synthetic_kwargs={"n_users": 50, "n_items": 120, "seed": 1})
    assert dataset.name == "synthetic" and stats["source_format"] == "synthetic"
    assert dataset.users.height == 50 and stats["files"] == []


# ---------------------------------------------------------------- downloads (loopback only)


@pytest.fixture
def server(tmp_path):
    """Serve ``tmp_path/served`` on 127.0.0.1; yields (base_url, folder, request log)."""
    folder = tmp_path / "served"
    folder.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    handler = functools.partial(Handler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder, requests
    httpd.shutdown()
    httpd.server_close()


def _ml1m_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for src in sorted((FIXTURES / "ml-1m").iterdir()):
            bundle.writestr(f"ml-1m/{src.name}", src.read_bytes())
        bundle.writestr("ml-1m/README", "fixture")
    return buffer.getvalue()


def test_download_movielens(server, tmp_path, monkeypatch, caplog):
    base, served, requests = server
    archive = _ml1m_zip()
    (served / "ml-1m.zip").write_bytes(archive)
    md5 = hashlib.md5(archive).hexdigest()
    data_dir = tmp_path / "data"

    with pytest.raises(DatasetNotFoundError, match="md5 mismatch"):
        download.download_movielens_1m(data_dir / "ml-1m", url=f"{base}/ml-1m.zip", md5="0" * 32)
    assert list((data_dir / "ml-1m").iterdir()) == []  # nothing half-written left behind
    with pytest.raises(DatasetNotFoundError, match="404"):
        download.download_movielens_1m(data_dir / "ml-1m", url=f"{base}/nope.zip", md5=md5)

    # offline: load_dataset must not even try
    count = len(requests)
    with pytest.raises(DatasetNotFoundError, match="RECTHINKER_OFFLINE"):
        load_dataset("ml-1m", data_dir)
    assert len(requests) == count

    monkeypatch.delenv("RECTHINKER_OFFLINE")
    monkeypatch.setattr(download, "ML1M_URL", f"{base}/ml-1m.zip")
    monkeypatch.setattr(download, "ML1M_MD5", md5)
    with caplog.at_level("INFO", logger=download.__name__):
        dataset, stats = load_dataset("ml-1m", data_dir)
    assert any("downloading" in r.message for r in caplog.records)
    assert any("100%" in r.message for r in caplog.records)
    assert sorted(p.name for p in (data_dir / "ml-1m").iterdir()) == [
        "movies.dat", "ratings.dat", "users.dat"]
    assert dataset.interactions.height == 8 and stats["source_format"] == "movielens-1m"


def test_download_amazon_records_sha256(server, tmp_path, monkeypatch):
    base, served, _ = server
    fixture = FIXTURES / "amazon-json"
    names = {"CDs_and_Vinyl_5.json.gz": "CDs_and_Vinyl_5.json",
             "meta_CDs_and_Vinyl.json.gz": "meta_CDs_and_Vinyl.json"}
    for gz_name, plain in names.items():
        write(served / gz_name, (fixture / plain).read_bytes(), gz=True)
    urls = {name: f"{base}/{name}" for name in names}
    folder = tmp_path / "data" / "amazon-cds"

    write(served / "cut.json.gz", _damaged((fixture / "CDs_and_Vinyl_5.json").read_bytes() * 50,
                                           "truncated"))
    with pytest.raises(DatasetNotFoundError, match="truncated"):
        download.download_amazon(folder, {"CDs_and_Vinyl_5.json.gz": f"{base}/cut.json.gz"})
    assert list(folder.iterdir()) == []

    monkeypatch.delenv("RECTHINKER_OFFLINE")
    monkeypatch.setattr(download, "AMAZON_CDS_URLS", urls)
    dataset, stats = load_dataset("amazon-cds", tmp_path / "data", kcore=0)
    assert stats["source_format"] == "amazon-json" and dataset.interactions.height == 6
    sums = download.read_sums(folder)
    assert sums == {name: hashlib.sha256((served / name).read_bytes()).hexdigest()
                    for name in names}
    # the next load verifies against SHA256SUMS, and catches a changed file
    assert load_dataset("amazon-cds", tmp_path / "data", kcore=0)[1]["files_sha256_verified"] == 2
    write(folder / "CDs_and_Vinyl_5.json.gz", (fixture / "CDs_and_Vinyl_5.json").read_bytes()[:-5]
          + b"}\n", gz=True)
    with pytest.raises(DataFormatError, match="sha256"):
        load_dataset("amazon-cds", tmp_path / "data", kcore=0)


def test_stats_are_plain_values(real_cds):
    _, stats = real_cds
    json.dumps(stats)
    for key in ("rows_read", "duplicate_interactions_dropped", "items_without_metadata",
                "html_titles_cleaned", "source_format", "files"):
        assert key in stats


def test_clean_categories():
    from recthinker_dagster.data.cleaning import clean_categories

    cats = pl.Series([["CDs &amp; Vinyl", "</span>", " Pop "], [], None], dtype=pl.List(pl.Utf8))
    assert clean_categories(cats).to_list() == [["CDs & Vinyl", "Pop"], [], None]


@pytest.mark.parametrize("gz", [False, True])
def test_json_fast_and_line_paths_agree(tmp_path, gz):
    from recthinker_dagster.data import amazon_json

    folder = copy_fixture("amazon-json", tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    reviews = folder / f"CDs_and_Vinyl_5.json{suffix}"
    meta = folder / f"meta_CDs_and_Vinyl.json{suffix}"
    assert amazon_json.fast_read(reviews, amazon_json.REVIEW_SCHEMA) is not None
    assert amazon_json.fast_read(meta, amazon_json.META_SCHEMA) is not None
    assert amazon_json.fast_read(folder / f"meta_CDs_and_Vinyl.2014.json{suffix}",
                                 amazon_json.META_SCHEMA) is None  # Python literals
    assert read_reviews(reviews).equals(amazon_json.read_reviews_by_line(reviews))
    assert read_metadata(meta).equals(amazon_json.read_metadata_by_line(meta))


def test_download_amazon_keeps_present_files(server, tmp_path):
    base, served, requests = server
    folder = copy_fixture("amazon-json", tmp_path / "amazon-cds")
    (folder / "meta_CDs_and_Vinyl.json").unlink()
    write(served / "meta.json.gz", (FIXTURES / "amazon-json" / "meta_CDs_and_Vinyl.json")
          .read_bytes(), gz=True)
    urls = {"CDs_and_Vinyl_5.json.gz": f"{base}/missing-on-purpose.json.gz",
            "meta_CDs_and_Vinyl.json.gz": f"{base}/meta.json.gz"}
    paths = download.download_amazon(folder, urls)
    assert [p.name for p in paths] == ["CDs_and_Vinyl_5.json", "meta_CDs_and_Vinyl.json.gz"]
    assert requests == ["/meta.json.gz"]
    assert list(download.read_sums(folder)) == ["meta_CDs_and_Vinyl.json.gz"]
