"""User profiles: demographics, taste, rating habits, activity and taste drift.

One pure function, :func:`compute_profile`, turns a user's chronological items (with
ratings and timestamps where known) into a profile; :class:`UserProfiles` runs it for every
user of the index interactions and also keeps those chronological histories for the
history tool. Because the index interactions of a task's user are exactly the task's
``history_item_ids``, the stored profile equals ``compute_profile`` on the task's history.

Profile fields: ``n_items``, ``history_crc`` (CRC-32 of the item ids, to check a profile
belongs to a given history), ``demographics``, ``top_categories`` (``[name, share]``, share
= fraction of the items with known categories that carry it), ``rating_mean``,
``share_high`` (share rated 4-5), ``n_rated``, ``first_ts``/``last_ts``, ``span_days``,
``per_month``, ``activity`` (light < 50 items <= moderate < 200 <= heavy), ``early_top`` /
``recent_top`` (top 3 categories of the first 80% / last 20% of the items) and ``drift``
(categories of the recent top 3 whose share rose by >= 15 points, of the early top 3 whose
share fell by as much; else "stable").

Files: ``profiles.json`` (``{"meta": ..., "profiles": {user_id: profile}}``; the meta
holds every user's demographics) and
``histories.npz`` (user-major CSR of the chronological histories: ``user_ids``,
``offsets``, ``item_ids`` (vocabulary), ``item_codes``, ``ratings`` (NaN unknown),
``timestamps``).
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from recthinker_dagster.tools.store import load_npz, prepare, read_json, save_npz, str_array, write_json

TOP_CATEGORIES = 5
TOP_TASTE = 3
RECENT_SHARE = 0.2
MIN_ITEMS_FOR_DRIFT = 5
DRIFT_SHARE = 0.15  # a category's share must move this much to count as drift
DAYS_PER_MONTH = 30.44
AGE_BRACKETS = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55",
                56: "56+"}
GENDERS = {"M": "male", "F": "female"}


def history_crc(item_ids: Sequence[str]) -> int:
    return zlib.crc32("\x1f".join(item_ids).encode())


def _top(categories: Sequence[Sequence[str]], n: int) -> list[tuple[str, int]]:
    counts = Counter(c for cats in categories for c in cats)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _activity(n: int) -> str:
    return "light" if n < 50 else "moderate" if n < 200 else "heavy"


def _shares(categories: Sequence[Sequence[str]]) -> dict[str, float]:
    counts = Counter(c for cats in categories for c in cats)
    return {c: k / len(categories) for c, k in counts.items()} if categories else {}


def _drift(early: list[list[str]], recent: list[list[str]], early_top: list[str], recent_top: list[str]) -> str:
    """Categories whose share rose (fell) by at least ``DRIFT_SHARE`` between early and recent."""
    if len(early) + len(recent) < MIN_ITEMS_FOR_DRIFT or not early or not recent:
        return "too few items with categories to compare early and recent taste"
    before, after = _shares(early), _shares(recent)
    up = [c for c in recent_top if after[c] - before.get(c, 0.0) >= DRIFT_SHARE]
    down = [c for c in early_top if before[c] - after.get(c, 0.0) >= DRIFT_SHARE]
    if up:
        return f"shifting toward {', '.join(up)}" + (f" (less {', '.join(down)})" if down else "")
    if down:
        return f"moving away from {', '.join(down)}"
    return f"stable: recent items match earlier taste ({recent_top[0]} leads)"


def compute_profile(
    item_ids: Sequence[str],
    ratings: Sequence[float] | None,
    timestamps: Sequence[int] | None,
    categories_of: Callable[[str], Sequence[str]],
    demographics: dict | None = None,
) -> dict:
    """The profile of a user whose items, oldest first, are ``item_ids`` (see module doc)."""
    n = len(item_ids)
    cats = [list(categories_of(i)) for i in item_ids]
    known = [c for c in cats if c]
    top = _top(known, TOP_CATEGORIES)
    rated = [float(r) for r in (ratings if ratings is not None else []) if r is not None and r == r]
    times = [int(t) for t in timestamps] if timestamps is not None and n else []
    n_recent = max(1, round(RECENT_SHARE * n)) if n else 0
    early = [c for c in cats[: n - n_recent] if c]
    recent = [c for c in cats[n - n_recent :] if c]
    early_top = [c for c, _ in _top(early, TOP_TASTE)]
    recent_top = [c for c, _ in _top(recent, TOP_TASTE)]
    span = (max(times) - min(times)) / 86_400 if times else None
    profile = {
        "n_items": n,
        "history_crc": history_crc(item_ids),
        "demographics": {k: v for k, v in (demographics or {}).items() if v is not None},
        "n_with_categories": len(known),
        "top_categories": [[c, round(k / len(known), 3)] for c, k in top],
        "n_rated": len(rated),
        "rating_mean": round(sum(rated) / len(rated), 2) if rated else None,
        "share_high": round(sum(r >= 4 for r in rated) / len(rated), 3) if rated else None,
        "first_ts": min(times) if times else None,
        "last_ts": max(times) if times else None,
        "span_days": round(span, 1) if span is not None else None,
        "per_month": round(n / max(span / DAYS_PER_MONTH, 1.0), 1) if span is not None else None,
        "activity": _activity(n),
        "n_recent": n_recent,
        "early_top": early_top,
        "recent_top": recent_top,
        "drift": _drift(early, recent, early_top, recent_top),
    }
    return profile


def render_profile(p: dict) -> list[str]:
    """The profile as short lines (header first)."""
    lines = [f"Profile of the current user ({p['n_items']} items in history):"]
    demo = p.get("demographics") or {}
    if demo:
        gender = demo.get("gender")
        parts = [GENDERS.get(gender, gender) if isinstance(gender, str) else gender]
        if demo.get("age") is not None:
            parts.append(f"age {AGE_BRACKETS.get(demo['age'], demo['age'])}")
        parts.append(demo.get("occupation"))
        lines.append("- Demographics: " + ", ".join(str(x) for x in parts if x))
    else:
        lines.append("- Demographics: unknown")
    if p["span_days"] is not None and p["span_days"] < 1:
        lines.append(f"- Activity: {p['n_items']} items within one day; {p['activity']}")
    elif p["span_days"] is not None:  # dates cost ~10 tokens each; the history tool shows them
        lines.append(f"- Activity: {p['n_items']} items over {p['span_days']:g} days, {p['per_month']:g} per month; "
                     f"{p['activity']}")
    else:
        lines.append(f"- Activity: {p['n_items']} items (dates unknown); {p['activity']}")
    if p["rating_mean"] is not None:
        unrated = f" ({p['n_rated']} rated)" if p["n_rated"] < p["n_items"] else ""
        lines.append(f"- Ratings: mean {p['rating_mean']:.2f}/5, {math.floor(100 * p['share_high'] + 0.5)}% "
                     f"rated 4-5{unrated}")
    else:
        lines.append("- Ratings: unknown")
    if p["top_categories"]:
        shown = ", ".join(f"{c} {math.floor(100 * s + 0.5)}%" for c, s in p["top_categories"])
        missing = p["n_items"] - p["n_with_categories"]
        lines.append(f"- Top categories: {shown}" + (f" ({missing} items without categories)" if missing else ""))
        early_n = p["n_items"] - p["n_recent"]
        lines.append(f"- Early taste (first {early_n} items): {', '.join(p['early_top']) or 'unknown'}")
        lines.append(f"- Recent taste (last {p['n_recent']} items): {', '.join(p['recent_top']) or 'unknown'}")
    else:
        lines.append("- Top categories: unknown (no category data for these items)")
    lines.append(f"- Drift: {p['drift']}")
    return lines


def _demographics(users: pl.DataFrame | None) -> dict[str, dict]:
    if users is None or users.is_empty():
        return {}
    cols = [c for c in ("gender", "age", "occupation") if c in users.columns]
    out = {}
    for row in users.select("user_id", *cols).iter_rows(named=True):
        demo = {c: row[c] for c in cols if row[c] is not None}
        out[row["user_id"]] = demo
    return out


class UserProfiles:
    """Per-user profiles and chronological histories (ratings and timestamps) of the index."""

    def __init__(self, profiles: dict[str, dict], arrays: dict[str, np.ndarray], meta: dict | None = None):
        self.profiles = profiles
        self.arrays = arrays
        self.meta = meta or {}
        self._users = {u: k for k, u in enumerate(arrays["user_ids"].tolist())}
        self._offsets = arrays["offsets"]
        self._vocab = arrays["item_ids"]
        self._codes, self._ratings, self._times = arrays["item_codes"], arrays["ratings"], arrays["timestamps"]

    @classmethod
    def build(cls, interactions: pl.DataFrame, items: pl.DataFrame, users: pl.DataFrame | None = None
              ) -> UserProfiles:
        order = ["user_id", "timestamp"] + (["order"] if "order" in interactions.columns else [])
        frame = interactions.sort(order, maintain_order=True)
        vocab = np.sort(frame["item_id"].unique().to_numpy()).astype(str)
        user_col = frame["user_id"].to_numpy().astype(str)
        starts = np.r_[0, np.flatnonzero(user_col[1:] != user_col[:-1]) + 1] if len(user_col) else np.zeros(0, int)
        offsets = np.r_[starts, len(user_col)].astype(np.int64)
        item_col = frame["item_id"].to_numpy().astype(str)
        arrays = {
            "user_ids": str_array(user_col[starts]),
            "offsets": offsets,
            "item_ids": str_array(vocab),
            "item_codes": np.searchsorted(vocab, item_col).astype(np.int32),
            "ratings": frame["rating"].fill_null(np.nan).to_numpy().astype(np.float32)
            if "rating" in frame.columns else np.full(len(frame), np.nan, np.float32),
            "timestamps": frame["timestamp"].to_numpy().astype(np.int64),
        }
        categories = dict(zip(items["item_id"].to_list(), (c or [] for c in items["categories"].to_list())))
        demographics = _demographics(users)
        empty: list[str] = []
        built = cls({}, arrays)
        profiles = {}
        for user in arrays["user_ids"].tolist():
            history = built.history(user)
            assert history is not None  # every user of ``arrays`` has one
            ids, ratings, times = history
            profiles[user] = compute_profile(ids, ratings.tolist(), times.tolist(),
                                             lambda i: categories.get(i, empty), demographics.get(user))
        meta = {"n_users": len(profiles), "n_interactions": len(frame), "demographics": demographics}
        return cls(profiles, arrays, meta)

    def save(self, folder: Path) -> None:
        folder = prepare(folder)
        write_json(folder / "profiles.json", {"meta": self.meta, "profiles": self.profiles})
        save_npz(folder / "histories.npz", **self.arrays)

    @classmethod
    def load(cls, folder: Path) -> UserProfiles:
        folder = Path(folder)
        stored = read_json(folder / "profiles.json")
        return cls(stored["profiles"], load_npz(folder / "histories.npz"), stored["meta"])

    def users(self) -> list[str]:
        return list(self._users)

    def profile(self, user_id: str) -> dict | None:
        return self.profiles.get(user_id)

    def demographics(self, user_id: str) -> dict:
        """Demographics of any user of the users table (also users without index data)."""
        return self.meta.get("demographics", {}).get(user_id, {})

    def history(self, user_id: str) -> tuple[list[str], np.ndarray, np.ndarray] | None:
        """``(item_ids, ratings, timestamps)`` oldest first, or None for an unknown user."""
        k = self._users.get(user_id)
        if k is None:
            return None
        s, e = self._offsets[k], self._offsets[k + 1]
        return self._vocab[self._codes[s:e]].tolist(), self._ratings[s:e], self._times[s:e]
