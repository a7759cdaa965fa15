"""Progress lines with an ETA for long loops (trajectories, LLM evaluation), and the ETA format
the trainer callbacks share.

    progress = ProgressLog(log, "teacher trajectories", total=600)
    progress(done)   # "teacher trajectories: 120/600 (20%), 95 s, ETA 6.3 min", at most every 5 s

A line is logged at most every ``every`` seconds and always at the end; the ETA assumes the
pace so far holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def eta_text(seconds_left: float) -> str:
    """``"ETA 6.5 min"``: one format for every progress line (loops and trainer steps)."""
    return f"ETA {seconds_left / 60:.1f} min"


class ProgressLog:
    def __init__(self, log: Callable[[str], None], what: str, total: int, every: float = 5.0):
        self.log, self.what, self.total, self.every = log, what, total, every
        self.started = time.perf_counter()
        self._last = float("-inf")
        self._first: int | None = None  # done at the first call (work resumed from disk is not pace)

    def __call__(self, done: int, total: int | None = None) -> None:
        total = self.total if total is None else total
        now = time.perf_counter()
        if self._first is None:
            self._first = done
        if now - self._last < self.every and done < total:
            return
        self._last = now
        elapsed = now - self.started
        line = f"{self.what}: {done}/{total} ({100 * done / max(total, 1):.0f}%), {elapsed:.0f} s"
        if 0 < done - self._first and done < total:
            left = elapsed / (done - self._first) * (total - done)
            line += f", {eta_text(left)}"
        self.log(line)
