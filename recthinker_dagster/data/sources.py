"""The named datasets and the one entry point that loads, cleans and describes them.

=============  =============================================================================
name           files (under ``data_dir``)
=============  =============================================================================
ml-1m          ``ml-1m/{ratings,movies,users}.dat`` (each plain or .gz); downloaded from
               GroupLens if absent. No k-core by default.
amazon-cds     RecBole atomic files in ``amazon-cds/recbole/`` or ``amazon-cds/`` (already a
               20-core: no k-core by default); else the Amazon 2018 JSON files
               ``amazon-cds/CDs_and_Vinyl_5.json(.gz)`` and ``meta_CDs_and_Vinyl.json(.gz)``
               (20-core by default, the paper's setting), downloaded from UCSD if absent.
synthetic      no files: :func:`generate_synthetic` with ``synthetic_kwargs``.
=============  =============================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recthinker_dagster.data import download, movielens, recbole, textio
from recthinker_dagster.data.amazon_json import load_amazon_json
from recthinker_dagster.data.cleaning import clean_dataset
from recthinker_dagster.data.coverage import METADATA_MIN_SHARE, METADATA_WARN_SHARE, check_metadata_share
from recthinker_dagster.data.errors import DatasetNotFoundError
from recthinker_dagster.data.notes import WARNINGS_KEY
from recthinker_dagster.data.schema import Dataset
from recthinker_dagster.data.synthetic import generate_synthetic

AMAZON_REVIEWS = "CDs_and_Vinyl_5.json"
AMAZON_META = "meta_CDs_and_Vinyl.json"
ITEM_FILE_ROLES = {"movielens-1m": "movies.dat", "recbole": "item", "amazon-json": "metadata"}


@dataclass(frozen=True)
class Resolved:
    """Where a dataset's files were found and how to read them."""

    source_format: str  # "movielens-1m", "recbole", "amazon-json" or "synthetic"
    files: dict[str, Path]  # role -> path
    default_kcore: int  # 0: none


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    resolve: Callable[[Path], Resolved | None]  # None: files absent
    download: Callable[[Path], Any] | None
    missing_hint: Callable[[Path], str]


def _resolve_ml1m(data_dir: Path) -> Resolved | None:
    folder = data_dir / "ml-1m"
    found = {stem: textio.find_file(folder, stem) for stem in movielens.FILES}
    files = {stem: path for stem, path in found.items() if path is not None}
    if len(files) < len(found):
        return None
    return Resolved("movielens-1m", files, 0)


def _resolve_amazon(data_dir: Path) -> Resolved | None:
    root = data_dir / "amazon-cds"
    for folder in (root / "recbole", root):
        if folder.is_dir() and recbole.inter_stems(folder):
            return Resolved("recbole", recbole.recbole_files(folder), 0)
    reviews, meta = textio.find_file(root, AMAZON_REVIEWS), textio.find_file(root, AMAZON_META)
    if reviews and meta:
        return Resolved("amazon-json", {"reviews": reviews, "metadata": meta}, 20)
    return None


def _amazon_hint(data_dir: Path) -> str:
    root = (data_dir / "amazon-cds").resolve()
    urls = " and ".join(download.AMAZON_CDS_URLS.values())
    return (
        f"Put {AMAZON_REVIEWS}.gz and {AMAZON_META}.gz (Amazon review data 2018, "
        f"{urls}) into {root}/, or RecBole atomic files (<name>.inter, <name>.item) "
        f"into {root}/recbole/"
    )


DATASETS: dict[str, DatasetSpec] = {
    "ml-1m": DatasetSpec(
        "ml-1m",
        "MovieLens-1M (GroupLens), ratings 1-5 with timestamps, genres, demographics",
        _resolve_ml1m,
        lambda data_dir: download.download_movielens_1m(data_dir / "ml-1m"),
        lambda data_dir: movielens.missing_hint(data_dir / "ml-1m"),
    ),
    "amazon-cds": DatasetSpec(
        "amazon-cds",
        "Amazon CDs & Vinyl (McAuley lab), ratings 1-5, title/artist/categories",
        _resolve_amazon,
        lambda data_dir: download.download_amazon(data_dir / "amazon-cds"),
        _amazon_hint,
    ),
    "synthetic": DatasetSpec(
        "synthetic",
        "seeded synthetic data with genre structure (no files)",
        lambda data_dir: Resolved("synthetic", {}, 0),
        None,
        lambda data_dir: "",
    ),
}


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def _locate(name: str, data_dir: Path, allow_download: bool) -> Resolved:
    spec, data_dir = _spec(name), Path(data_dir)
    resolved = spec.resolve(data_dir)
    if resolved is not None:
        return resolved
    if not allow_download or download.offline():
        why = "downloads are disabled (RECTHINKER_OFFLINE)" if download.offline() else (
            "allow_download is False")
        raise DatasetNotFoundError(
            f"dataset {name!r} not found under {data_dir.resolve()} and {why}. "
            f"{spec.missing_hint(data_dir)}"
        )
    assert spec.download is not None  # only file-less datasets have none, and they always resolve
    spec.download(data_dir)
    resolved = spec.resolve(data_dir)
    if resolved is None:
        raise DatasetNotFoundError(f"download did not produce dataset {name!r}. "
                                   f"{spec.missing_hint(data_dir)}")
    return resolved


def dataset_files(name: str, data_dir: Path, *, allow_download: bool = False) -> list[Path]:
    """The files ``load_dataset(name, data_dir)`` would read, sorted (for hashing).

    Downloads them first when absent and ``allow_download``. Empty for ``synthetic``;
    raises DatasetNotFoundError when the files are absent and cannot be downloaded.
    """
    return sorted(_locate(name, data_dir, allow_download=allow_download).files.values())


def _read(name: str, resolved: Resolved, synthetic_kwargs: dict | None) -> Dataset:
    files = resolved.files
    if resolved.source_format == "synthetic":
        return generate_synthetic(**{"name": name, **(synthetic_kwargs or {})})
    if resolved.source_format == "movielens-1m":
        return movielens.load_movielens_1m(files["ratings.dat"].parent, name=name)
    if resolved.source_format == "recbole":
        return recbole.load_recbole(files["inter"].parent,
                                    stem=files["inter"].name.split(".inter")[0], name=name)
    return load_amazon_json(files["reviews"], files["metadata"], name=name)


def item_file(resolved: Resolved) -> Path | str:
    """The file the item titles come from (or what stands in for it), for messages."""
    role = ITEM_FILE_ROLES.get(resolved.source_format)
    if role is None:
        return f"{resolved.source_format} generator"
    if role in resolved.files:
        return resolved.files[role]
    inter = resolved.files["inter"]
    return inter.parent / f"{inter.name.split('.inter')[0]}.item (absent)"


def load_dataset(
    name: str,
    data_dir: Path,
    *,
    allow_download: bool = True,
    kcore: int | None = None,
    synthetic_kwargs: dict | None = None,
    metadata_warn_share: float = METADATA_WARN_SHARE,
    metadata_min_share: float = METADATA_MIN_SHARE,
) -> tuple[Dataset, dict[str, Any]]:
    """Load dataset ``name`` from ``data_dir`` (downloading if allowed), clean it, return
    ``(dataset, stats)``. ``kcore=None`` uses the source's default; ``0`` disables it.

    Fails with MetadataQualityError when the share of items with a title is below
    ``metadata_min_share``; below ``metadata_warn_share`` it adds a line to
    ``stats["warnings"]`` (``notes.warning_lines`` gives them with the cleaning notes)."""
    resolved = _locate(name, data_dir, allow_download)
    files = sorted(resolved.files.values())
    verified = download.verify_sha256(files)
    raw = _read(name, resolved, synthetic_kwargs)
    k = resolved.default_kcore if kcore is None else kcore
    dataset, cleaning = clean_dataset(raw, kcore=k or None)
    stats: dict[str, Any] = {
        "dataset": name,
        "source_format": resolved.source_format,
        "files": [str(path) for path in files],
        "files_sha256_verified": verified,
        "rows_read": raw.interactions.height,
        "item_rows_read": raw.items.height,
        "user_rows_read": raw.users.height,
        "kcore": k or 0,
        **cleaning,
    }
    warning = check_metadata_share(
        stats, item_file(resolved), warn_share=metadata_warn_share, min_share=metadata_min_share
    )
    stats[WARNINGS_KEY] = [warning] if warning else []
    return dataset, stats
