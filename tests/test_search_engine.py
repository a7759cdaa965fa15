"""The catalog's search engine: the hand-written BM25 (``tools/text.py``) behind ``ItemCatalog.search``.

A known item is found first by its title or creator; an empty query, or one without a term in
the catalog, matches nothing; ties go by popularity; scores follow the Okapi BM25 formula and
survive save/load. ``scripts/benchmark_search.py`` measures it against the ``bm25s`` library.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from recthinker_dagster.data.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA
from recthinker_dagster.tools.catalog import ItemCatalog
from recthinker_dagster.tools.text import BM25

ITEMS = [  # item_id, title, year, categories, creator, description
    ("1", "Toy Story", 1995, ["Animation", "Children's", "Comedy"], None, None),
    ("2", "Toy Story 2", 1999, ["Animation", "Children's", "Comedy"], None, None),
    ("3", "The Matrix", 1999, ["Action", "Sci-Fi"], "The Wachowskis", None),
    ("4", "Heat", 1995, ["Action", "Crime", "Thriller"], "Michael Mann", None),
    ("5", "Kind of Blue", 1959, ["Jazz"], "Miles Davis", "Modal jazz, recorded in two sessions"),
    ("6", None, None, [], None, None),  # no metadata
    ("7", "Blue", None, ["Jazz"], None, None),  # 7 and 8: the same text, 8 is more popular
    ("8", "Blue", None, ["Jazz"], None, None),
]
POPULARITY = {"1": 5, "2": 2, "3": 4, "4": 3, "5": 1, "6": 1, "7": 1, "8": 6}


@pytest.fixture(scope="module")
def catalog() -> ItemCatalog:
    items = pl.DataFrame(
        [(*row, row[1] is not None) for row in ITEMS], schema=list(ITEMS_SCHEMA), orient="row"
    ).cast(ITEMS_SCHEMA)  # type: ignore[arg-type]
    rows = [(f"u{n}", item, 4.0, 1000 + n, n) for item, count in POPULARITY.items() for n in range(count)]
    interactions = pl.DataFrame(rows, schema=list(INTERACTIONS_SCHEMA), orient="row").cast(INTERACTIONS_SCHEMA)  # type: ignore[arg-type]
    return ItemCatalog.build(items, interactions)


def ids(catalog: ItemCatalog, codes: list[int]) -> list[str]:
    return [catalog.item_ids[k] for k in codes]


@pytest.mark.parametrize(("query", "item"), [
    ("Toy Story", "1"), ("toy story 2", "2"), ("The Matrix", "3"), ("heat", "4"), ("Kind of Blue", "5"),
    ("miles davis jazz", "5"), ("michael mann crime", "4"), ("wachowskis", "3"),
])
def test_a_known_item_query_finds_the_item_first(catalog, query, item):
    assert ids(catalog, catalog.search(query, 5))[0] == item
    scores = catalog.bm25.scores(query)  # the plain BM25 ranking agrees (history filter's scores)
    assert catalog.item_ids[int(np.argmax(scores))] == item


@pytest.mark.parametrize("query", ["", "   ", "!!! ?", "zzzqqq", "qqq-zzz"])
def test_an_empty_or_unknown_query_matches_nothing(catalog, query):
    scores = catalog.bm25.scores(query)
    assert scores.shape == (len(ITEMS),) and scores.dtype == np.float32 and not scores.any()
    assert catalog.search(query, 5) == []


def test_ties_go_by_popularity_and_terms_count_once_in_any_order(catalog):
    found = ids(catalog, catalog.search("blue", 10))
    assert found.index("8") < found.index("7")  # same text: the more popular first
    assert set(found) == {"5", "7", "8"} and "6" not in found
    assert catalog.bm25.scores("blue jazz").tobytes() == catalog.bm25.scores("Jazz, blue BLUE").tobytes()


def test_scores_follow_the_okapi_formula():
    k1, b = 1.2, 0.75
    documents = ["red apple", "red red pear pear pear", "plum"]
    bm25 = BM25.build(documents, k1=k1, b=b)
    lengths, avg = [2, 5, 1], 8 / 3
    idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # "red" is in 2 of 3 documents
    expected = [idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * n / avg)) for tf, n in zip([1, 2, 0], lengths)]
    np.testing.assert_allclose(bm25.scores("red"), expected, rtol=1e-6)


def test_save_and_load_keep_the_results(catalog, tmp_path):
    catalog.save(tmp_path)
    loaded = ItemCatalog.load(tmp_path)
    for query in ("toy story", "blue", "action 1999", "zzzqqq"):
        assert loaded.search(query, 10) == catalog.search(query, 10)
        assert loaded.bm25.scores(query).tobytes() == catalog.bm25.scores(query).tobytes()
