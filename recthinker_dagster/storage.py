"""Write, audit, publish: atomic publication of artifact folders behind a quality gate.

An artifact is built in a hidden sibling folder (``.<name>.staging-<pid>-<token>``). When the
build is complete its gate (an *audit*: a Great Expectations suite, the leakage report) runs
on that staged output; only if the audit passes is the folder swapped into place. A failing
or interrupted build never leaves a half-written artifact, and a build whose output fails
its audit never replaces the last good version: the staged output is moved aside as
``.<name>.rejected-<UTC time>-<token>`` (with ``audit_failures.txt`` naming what failed;
the newest :data:`MAX_REJECTED` per folder are kept) and :class:`AuditFailed` is raised.

    with staged_directory(folder, audit=lambda staged: check(staged), lock_dir=locks) as staging:
        write_files(staging)

Several folders that form one unit (the three tables of a dataset, the five tool indexes)
are staged together with :func:`staged_directories`: all are audited before any is swapped.

The swap runs under a per-artifact inter-process lock (:func:`artifact_locks`, a file lock
in ``lock_dir``) that the publisher holds again while it versions the folder, so two runs
publishing the same artifact cannot interleave their swaps and ``dvc add``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

MAX_REJECTED = 3  # rejected staged outputs kept per artifact folder, newest first
FAILURES_FILE = "audit_failures.txt"  # written into a rejected folder: what failed

# An audit gets the staged folder and returns one line per failed expectation (empty: passed).
Audit = Callable[[Path], Sequence[str]]
# The audit of folders staged together: staged folder per key in, failures per key out.
JointAudit = Callable[[Mapping[str, Path]], Mapping[str, Sequence[str]]]


@dataclass(frozen=True)
class Rejection:
    """One staged output that was not published."""

    folder: Path  # the published folder, left as it was
    kept_at: Path  # the rejected staged output, kept for inspection
    failures: tuple[str, ...]  # what failed (empty: it passed, but a folder staged with it failed)


class AuditFailed(RuntimeError):
    """The staged output failed its audit; nothing was swapped in."""

    def __init__(self, rejections: Mapping[str, Rejection], subject: str = "the staged output"):
        self.rejections = dict(rejections)
        lines = [f"{subject} failed its audit; the published versions are unchanged:"]
        for rejection in self.rejections.values():
            lines.append(f"  {rejection.folder} (staged output kept at {rejection.kept_at.name}):")
            lines.extend(f"    - {failure}" for failure in rejection.failures or ("passed; rejected with the others",))
        super().__init__("\n".join(lines))

    @property
    def failures(self) -> list[str]:
        """Every failure line, over all rejected folders."""
        return [failure for rejection in self.rejections.values() for failure in rejection.failures]


@contextmanager
def staged_directory(final_dir: Path, audit: Audit | None = None, lock_dir: Path | None = None) -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds and ``audit`` passes, it replaces
    ``final_dir`` atomically.

    On an exception in the block the staging folder is removed; on a failed audit it is kept
    as a ``.rejected-`` sibling and :class:`AuditFailed` is raised. Either way ``final_dir`` is
    untouched. With ``lock_dir`` the swap holds the folder's :func:`artifact_locks` lock.
    """
    joint = None if audit is None else (lambda staged: {"folder": audit(staged["folder"])})
    with staged_directories({"folder": final_dir}, joint, lock_dir) as staging:
        yield staging["folder"]


@contextmanager
def staged_directories(
    final_dirs: Mapping[str, Path], audit: JointAudit | None = None, lock_dir: Path | None = None
) -> Iterator[dict[str, Path]]:
    """:func:`staged_directory` for folders published together: a staging folder per key; all
    are audited before any is swapped in, and one failure rejects them all."""
    finals = {key: Path(folder) for key, folder in final_dirs.items()}
    token = uuid.uuid4().hex[:8]
    staging: dict[str, Path] = {}
    try:
        for key, final in finals.items():
            final.parent.mkdir(parents=True, exist_ok=True)
            staging[key] = final.parent / f".{final.name}.staging-{os.getpid()}-{token}"
            staging[key].mkdir()
        yield staging
    except BaseException:
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        verdict = audit(staging) if audit else {}
    except Exception as error:  # an output the audit cannot even read fails it
        verdict = {key: [f"the audit could not run: {error!r}"] for key in finals}
        raise AuditFailed(rejected_set(finals, staging, verdict, token)) from error
    except BaseException:
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if any(verdict.values()):
        raise AuditFailed(rejected_set(finals, staging, verdict, token))
    with artifact_locks(finals.values(), lock_dir) if lock_dir else nullcontext():
        swap_in(finals, staging, token)


def rejected_set(
    finals: Mapping[str, Path], staging: Mapping[str, Path], verdict: Mapping[str, Sequence[str]], token: str
) -> dict[str, Rejection]:
    """Keep every staged folder of a failed set aside (the passing ones too: they belong together)."""
    return {key: reject(finals[key], staging[key], tuple(verdict.get(key, ())), token) for key in finals}


def swap_in(finals: Mapping[str, Path], staging: Mapping[str, Path], token: str) -> None:
    """Replace each final folder by its staged one; on an error put every previous one back."""
    retired = {key: final.parent / f".{final.name}.retired-{token}" for key, final in finals.items()}
    swapped: list[str] = []
    try:
        for key, final in finals.items():
            if final.exists():
                os.replace(final, retired[key])
            swapped.append(key)
            os.replace(staging[key], final)
    except BaseException:
        for key in reversed(swapped):
            if retired[key].exists():
                shutil.rmtree(finals[key], ignore_errors=True)
                os.replace(retired[key], finals[key])
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    for folder in retired.values():
        shutil.rmtree(folder, ignore_errors=True)


def reject(final_dir: Path, staged: Path, failures: Sequence[str], token: str) -> Rejection:
    """Move a staged output aside as ``.<name>.rejected-<time>-<token>``; prune old ones."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}Z"  # sorts by time
    kept_at = final_dir.parent / f".{final_dir.name}.rejected-{stamp}-{token}"
    os.replace(staged, kept_at)
    (kept_at / FAILURES_FILE).write_text(
        f"not published: the audit of {final_dir.name} failed; the published version is unchanged\n"
        + "".join(f"- {failure}\n" for failure in failures or ("passed; rejected with the folders staged with it",))
    )
    for old in rejected_folders(final_dir)[MAX_REJECTED:]:
        shutil.rmtree(old, ignore_errors=True)
    return Rejection(final_dir, kept_at, tuple(failures))


def rejected_folders(final_dir: Path) -> list[Path]:
    """The kept rejected staged outputs of ``final_dir``, newest first."""
    final_dir = Path(final_dir)
    if not final_dir.parent.is_dir():
        return []
    prefix = f".{final_dir.name}.rejected-"
    return sorted((p for p in final_dir.parent.iterdir() if p.name.startswith(prefix)), reverse=True)


def remove_stale_staging(parent: Path) -> list[Path]:
    """Delete staging/retired folders left behind by killed processes under ``parent``.

    A staging folder of a live process (its pid is in the name) is another run's build in
    progress and stays; rejected outputs stay too (they are pruned when a new one is kept).
    """
    removed: list[Path] = []
    if not Path(parent).is_dir():
        return removed
    for path in Path(parent).iterdir():
        if not path.name.startswith("."):
            continue
        if ".retired-" in path.name or (".staging-" in path.name and not owner_alive(path.name)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def owner_alive(staging_name: str) -> bool:
    """Whether the process named in ``.<name>.staging-<pid>-<token>`` is running (this one is not stale)."""
    parts = staging_name.rsplit(".staging-", 1)[1].split("-")
    if len(parts) != 2 or not parts[0].isdigit():
        return False  # an old-style name (no pid)
    pid = parts[0]
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def lock_file(folder: Path, lock_dir: Path) -> Path:
    """The lock file of an artifact folder: one per folder, named after its path."""
    folder = Path(folder).resolve()
    digest = hashlib.md5(str(folder).encode()).hexdigest()[:10]
    return Path(lock_dir) / f"{folder.parent.name}__{folder.name}-{digest}.lock"


@contextmanager
def artifact_locks(
    folders: Iterable[Path], lock_dir: Path, log: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the inter-process locks of ``folders`` (taken in a fixed order: no deadlock).

    Re-entrant within a thread (the publisher holds a lock across the stage's own swap);
    another thread or process waits, and ``log`` says that it does.
    """
    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        for path in sorted({lock_file(folder, lock_dir) for folder in folders}):
            lock = FileLock(str(path), is_singleton=True)
            try:
                stack.enter_context(lock.acquire(timeout=0))
            except Timeout:
                if log:
                    log(f"waiting for another run that is publishing the same artifact (lock {path.name})")
                stack.enter_context(lock.acquire())
        yield


def folder_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
