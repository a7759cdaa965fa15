"""Atomic publication of artifact folders."""

import pytest

from recthinker_dagster.storage import remove_stale_staging, staged_directory


def test_staged_directory_keeps_old_on_failure_and_swaps_on_success(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("good")
    with pytest.raises(RuntimeError, match="interrupted"):
        with staged_directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("interrupted")
    assert (target / "weights").read_text() == "good"
    with staged_directory(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_stale_staging_folders_are_removed(tmp_path):
    (tmp_path / ".model.staging-1234").mkdir()
    (tmp_path / ".model.retired-1234").mkdir()
    (tmp_path / "model").mkdir()
    removed = remove_stale_staging(tmp_path)
    assert len(removed) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
