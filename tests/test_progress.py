"""Progress lines: throttled, always at the end, with an ETA from the pace so far."""

from __future__ import annotations

from recthinker_dagster.progress import ProgressLog


def test_lines_are_throttled_and_carry_an_eta():
    lines: list[str] = []
    progress = ProgressLog(lines.append, "trajectories", total=10, every=3600.0)
    progress(2)  # the first call always logs (there is no earlier line)
    progress(4)  # within the throttle
    progress(10)  # the end always logs
    assert len(lines) == 2 and lines[0].startswith("trajectories: 2/10 (20%)") and lines[1].startswith("trajectories: 10/10")
    assert "ETA" not in lines[0]  # no pace yet: resumed work is not counted as done in this run

    paced = ProgressLog(lines.append, "eval", total=8, every=0.0)
    paced(0)
    paced.started -= 60.0  # one minute for the first 2 tasks
    paced(2)
    assert lines[-1].startswith("eval: 2/8 (25%), 60 s, ETA 3.0 min")
