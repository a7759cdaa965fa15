"""Compact, stable text for tool outputs, and the output budget."""

from __future__ import annotations

from datetime import UTC, datetime


def clip(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters with a trailing "..."."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: max(limit - 3, 0)].rstrip() + "..."


def date(timestamp: int | float | None) -> str:
    if timestamp is None or timestamp != timestamp:  # None or NaN
        return "date unknown"
    return datetime.fromtimestamp(int(timestamp), tz=UTC).strftime("%Y-%m-%d")


def stars(rating: float | None) -> str:
    if rating is None or rating != rating:
        return "?/5"
    return f"{rating:g}/5"


def more_marker(n: int) -> str:
    return f"... ({n} more)"


def fit_to_budget(header: str, lines: list[str], budget: int, more: int = 0) -> str:
    """``header`` then as many ``lines`` as fit in ``budget`` characters. Lines left out, plus
    ``more`` further results never listed, are announced by a final "... (N more)" line.
    Never longer than ``budget``."""
    head = [header] if header else []
    text = "\n".join([*head, *lines, *([more_marker(more)] if more else [])])
    if len(text) <= budget:
        return text
    kept, used = list(head), len(header)
    for k, line in enumerate(lines):
        tail = 1 + len(more_marker(len(lines) - k - 1 + more))
        if used + 1 + len(line) + tail > budget:
            break
        kept.append(line)
        used += 1 + len(line)
    hidden = len(lines) - (len(kept) - len(head)) + more
    out = "\n".join([*kept, more_marker(hidden)])
    return out if len(out) <= budget else out[: max(budget - 3, 0)] + "..."[: budget]
