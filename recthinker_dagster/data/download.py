"""Download the original datasets from their official locations and verify them.

Only ``urllib`` is used. Every file is written to a temporary name in the target folder
and renamed when complete and verified, so no half file is ever left behind.
``RECTHINKER_OFFLINE=1`` disables downloads. Failures raise :class:`DatasetNotFoundError`
saying what to put where. URLs and checksums are parameters (tests use a local server).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from recthinker_dagster.data.errors import DataFormatError, DatasetNotFoundError
from recthinker_dagster.data.textio import GZIP_ERRORS, find_file

log = logging.getLogger(__name__)

ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
ML1M_MD5 = "c4d9eecfca2ab87c1945afe126590906"
ML1M_MEMBERS = ("ratings.dat", "movies.dat", "users.dat")
AMAZON_BASE = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2"
AMAZON_CDS_URLS = {
    "CDs_and_Vinyl_5.json.gz": f"{AMAZON_BASE}/categoryFilesSmall/CDs_and_Vinyl_5.json.gz",
    "meta_CDs_and_Vinyl.json.gz": f"{AMAZON_BASE}/metaFiles2/meta_CDs_and_Vinyl.json.gz",
}
SUMS_FILE = "SHA256SUMS"
CHUNK = 1 << 20
# What a failed transfer can raise: URLError, timeouts and IO are OSError; a cut response
# is an HTTPException; an unusable URL is a ValueError.
FETCH_ERRORS = (OSError, http.client.HTTPException, ValueError)


def offline() -> bool:
    """True when ``RECTHINKER_OFFLINE`` is set to a true value."""
    return os.environ.get("RECTHINKER_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, dest: Path, *, timeout: float = 60.0) -> Path:
    """Stream ``url`` into ``dest`` via a temporary file in the same folder; log progress."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            done, step = 0, max(total // 10, 1) if total else 64 * CHUNK  # ~10 reports
            log.info("downloading %s (%s bytes)", url, total or "unknown")
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                if done // step > (done - len(chunk)) // step:  # crossed a reporting step
                    share = f"{100 * done // total}%, " if total else ""
                    log.info("%s: %s%d bytes", dest.name, share, done)
            if total and done != total:
                raise OSError(f"connection closed after {done} of {total} bytes")
        os.replace(tmp, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def _failed(what: str, folder: Path, files: str, url: str, exc: BaseException) -> Exception:
    return DatasetNotFoundError(
        f"could not download {what} ({exc}). Put {files} into {Path(folder).resolve()}/ "
        f"yourself (official download: {url}), or set allow_download and unset RECTHINKER_OFFLINE"
    )


def download_movielens_1m(
    folder: Path, *, url: str | None = None, md5: str | None = None, timeout: float = 60.0
) -> list[Path]:
    """Fetch ``ml-1m.zip``, check its md5, extract the three ``.dat`` files into ``folder``."""
    url, md5, folder = url or ML1M_URL, md5 or ML1M_MD5, Path(folder)
    files = "ratings.dat, movies.dat and users.dat"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
            archive = fetch(url, Path(tmp) / "ml-1m.zip", timeout=timeout)
            found = file_digest(archive, "md5")
            if found != md5:
                raise OSError(f"md5 mismatch: got {found}, expected {md5}")
            with zipfile.ZipFile(archive) as bundle:
                members = {Path(n).name: n for n in bundle.namelist()}
                for name in ML1M_MEMBERS:
                    if name not in members:
                        raise OSError(f"{name} is not in the archive")
                    part = Path(tmp) / name
                    with bundle.open(members[name]) as src, open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
            outputs = [folder / name for name in ML1M_MEMBERS]
            for path in outputs:
                os.replace(Path(tmp) / path.name, path)
            log.info("extracted %s into %s", files, folder)
            return outputs
    except (*FETCH_ERRORS, zipfile.BadZipFile) as exc:
        raise _failed("MovieLens-1M", folder, files, url, exc) from exc


def check_gzip(path: Path) -> None:
    """Decompress ``path`` to the end; a truncated or corrupt stream raises OSError."""
    try:
        with gzip.open(path, "rb") as handle:
            while handle.read(CHUNK):
                pass
    except GZIP_ERRORS as exc:
        raise OSError(f"{path.name}: gzip stream is truncated or corrupt ({exc})") from exc


def download_amazon(
    folder: Path, urls: dict[str, str] | None = None, *, timeout: float = 120.0
) -> list[Path]:
    """Fetch each ``{file name: url}`` gzip into ``folder``, check each gzip stream is
    complete, and record the sha256 values in ``folder/SHA256SUMS`` (no published sums).
    A file already there (plain or gzip'd) is kept."""
    urls, folder = urls or AMAZON_CDS_URLS, Path(folder)
    outputs = []
    for name, url in urls.items():
        present = find_file(folder, name.removesuffix(".gz"))
        if present is not None:
            outputs.append(present)
            continue
        try:
            with tempfile.TemporaryDirectory(dir=_mkdir(folder), prefix=".download-") as tmp:
                part = fetch(url, Path(tmp) / name, timeout=timeout)
                check_gzip(part)
                digest = file_digest(part)
                os.replace(part, folder / name)
        except FETCH_ERRORS as exc:
            raise _failed("the Amazon review data", folder, " and ".join(urls), url, exc) from exc
        record_sha256(folder / name, digest)
        outputs.append(folder / name)
    return outputs


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def read_sums(folder: Path) -> dict[str, str]:
    """``file name -> sha256`` from ``folder/SHA256SUMS`` (``sha256sum`` format); {} if absent."""
    sums_path = Path(folder) / SUMS_FILE
    if not sums_path.is_file():
        return {}
    sums = {}
    for line in sums_path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*").strip()] = digest.lower()
    return sums


def record_sha256(path: Path, digest: str | None = None) -> None:
    """Add or replace ``path``'s line in the SHA256SUMS next to it (atomically)."""
    path = Path(path)
    sums = read_sums(path.parent)
    sums[path.name] = digest or file_digest(path)
    text = "".join(f"{value}  {name}\n" for name, value in sorted(sums.items()))
    tmp = path.parent / f".{SUMS_FILE}.part"
    tmp.write_text(text)
    os.replace(tmp, path.parent / SUMS_FILE)


def verify_sha256(paths: list[Path]) -> int:
    """Check each path against the SHA256SUMS in its folder, when listed there.

    Returns how many files were verified; a mismatch raises DataFormatError.
    """
    verified = 0
    for path in map(Path, paths):
        expected = read_sums(path.parent).get(path.name)
        if expected is None:
            continue
        found = file_digest(path)
        if found != expected:
            raise DataFormatError(
                path,
                f"sha256 {found} does not match {SUMS_FILE}: the file is corrupt or was changed; "
                "delete it to download it again",
                expected=expected,
            )
        verified += 1
    return verified
