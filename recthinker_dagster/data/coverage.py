"""Metadata coverage: the share of items with metadata (a non-empty title), with a warning
level and a floor.

The defaults come from the real data (``/`` = items with a title after cleaning):

=============  ==================  ======
dataset        items with a title  share
=============  ==================  ======
ml-1m          3,615 / 3,615       100%
synthetic      449 / 500           89.8%
amazon-cds     1,314 / 2,672       49.2%  (RecBole atomic files; 132 more rows have only an HTML title)
=============  ==================  ======

The warning level sits just below the lowest real share, so the real datasets load
silently; the floor is about half of it, so a header-only or emptied item file (0%) fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recthinker_dagster.data.errors import MetadataQualityError

METADATA_WARN_SHARE = 0.45  # below: a warning in the run
METADATA_MIN_SHARE = 0.25  # below: the ingest fails


def check_metadata_share(
    stats: Mapping[str, Any],
    item_file: Path | str,
    *,
    warn_share: float = METADATA_WARN_SHARE,
    min_share: float = METADATA_MIN_SHARE,
) -> str | None:
    """Raise :class:`MetadataQualityError` below ``min_share``; return a warning line below
    ``warn_share``; else None. ``stats`` are ``clean_dataset``'s; ``item_file`` is the file
    the titles come from (named in the error). No items at all (a k-core that removed
    everything) is left to the table suites, which require rows."""
    share = float(stats["items_with_metadata_share"])
    with_meta, items = int(stats["items_with_metadata"]), int(stats["items"])
    if items == 0:
        return None
    found = f"{with_meta} of {items} items ({share:.1%}) have metadata (a non-empty title)"
    if share < min_share:
        raise MetadataQualityError(
            item_file,
            f"only {found}; is the item file empty, header-only or missing its titles?",
            column="title",
            expected=f"at least {min_share:.0%} of items with a title (ingest.metadata_min_share; "
            "lower it to accept this data)",
        )
    if share < warn_share:
        return f"{item_file}: only {found}, below the warning level {warn_share:.0%} (ingest.metadata_warn_share)"
    return None
