"""Publisher URLs of the public datasets the adapters read, and a downloader for users with internet.

Never used by tests (they read ../shared/data). Files are saved under their original names so
that ``data.path`` can point at the folder directly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

log = logging.getLogger("components.data.download")
SUMS = "SHA256SUMS"  # in the dataset folder: the digest of every file downloaded into it
CHUNK = 1 << 20

GROUPLENS = "https://files.grouplens.org/datasets/movielens"
AMAZON_2018 = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2"
MIND = "https://mind201910small.blob.core.windows.net/release"

DATASETS: Dict[str, Dict] = {
    "ml-latest-small": {"source": "movielens", "zip": f"{GROUPLENS}/ml-latest-small.zip"},
    "ml-100k": {"source": "movielens", "zip": f"{GROUPLENS}/ml-100k.zip"},
    "ml-1m": {"source": "movielens", "zip": f"{GROUPLENS}/ml-1m.zip"},
    "ml-25m": {"source": "movielens", "zip": f"{GROUPLENS}/ml-25m.zip"},
    "mind-small": {"source": "mind", "zip": f"{MIND}/MINDsmall_train.zip"},
}


def amazon_urls(category: str) -> List[str]:
    """e.g. category='Gift_Cards' -> the 5-core review file and the metadata file."""
    return [f"{AMAZON_2018}/categoryFilesSmall/{category}_5.json.gz",
            f"{AMAZON_2018}/metaFiles2/meta_{category}.json.gz"]


class DownloadError(RuntimeError):
    """A download that failed after its retries, or whose bytes are not the expected ones."""


def download(name: str, dest: str | Path, sha256: Optional[str] = None, retries: int = 5,
             progress: bool = True) -> Path:
    """Download ``name`` (a key of DATASETS, or ``amazon:<Category>``) into ``dest/<name>``.

    Each file is streamed to ``<file>.part`` with a progress bar, retried with exponential
    back-off (``retries``: connection errors, 429 and 5xx, and a body cut off midway) and renamed
    into place only once its sha256 is checked: against ``sha256`` when given (a one-file
    dataset's expected digest), else against the digest ``dest/<name>/SHA256SUMS`` recorded at an
    earlier download (the same bytes as last time), else recorded there for the next one."""
    dest = Path(dest) / name.replace(":", "-")
    dest.mkdir(parents=True, exist_ok=True)
    if name.startswith("amazon:"):
        urls = amazon_urls(name.split(":", 1)[1])
    elif name in DATASETS:
        urls = [DATASETS[name]["zip"]]
    else:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} or amazon:<Category>")
    if sha256 and len(urls) != 1:
        raise ValueError(f"{name} has {len(urls)} files: sha256= checks a one-file dataset")
    for url in urls:
        path = fetch(url, dest / url.rsplit("/", 1)[1], sha256, retries, progress)
        if path.suffix == ".zip":
            _unzip(path, dest)
    return dest


def fetch(url: str, path: Path, sha256: Optional[str] = None, retries: int = 5, progress: bool = True) -> Path:
    """``url`` into ``path``, checked as ``download`` says; returns ``path``."""
    import requests
    import urllib3
    from requests.adapters import HTTPAdapter
    from tqdm import tqdm
    from urllib3.util.retry import Retry

    sums = _read_sums(path.parent)
    expected = (sha256 or sums.get(path.name) or "").lower() or None
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=Retry(total=retries, backoff_factor=0.5,
                                                           status_forcelist=(429, 500, 502, 503, 504))))
    session.mount("https://", session.adapters["http://"])
    part = path.with_name(path.name + ".part")
    for attempt in range(retries + 1):
        digest = hashlib.sha256()
        try:
            with session.get(url, stream=True, timeout=60) as resp:
                resp.raise_for_status()
                total = int(resp.headers.get("Content-Length") or 0) or None
                with open(part, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=path.name,
                                                   disable=not progress, file=sys.stderr) as bar:
                    # the bytes as published (a .json.gz stays gzip even when the server labels
                    # it Content-Encoding: gzip), which is also what Content-Length counts
                    for chunk in resp.raw.stream(CHUNK, decode_content=False):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
                if total is not None and part.stat().st_size != total:
                    raise requests.exceptions.ChunkedEncodingError(
                        f"got {part.stat().st_size} of {total} bytes")
            break
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                requests.exceptions.Timeout, urllib3.exceptions.HTTPError) as exc:
            # a body cut off midway: urllib3 retries only until the response starts
            part.unlink(missing_ok=True)
            if attempt == retries:
                raise DownloadError(f"{url}: failed after {retries + 1} attempts ({exc})") from exc
            log.warning("%s: attempt %d failed (%s); retrying", url, attempt + 1, exc)
            time.sleep(min(30.0, 0.5 * 2 ** attempt))
        except requests.exceptions.RequestException as exc:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url}: {exc}") from exc
        except BaseException:  # disk full, Ctrl-C: no half file left behind
            part.unlink(missing_ok=True)
            raise
    got = digest.hexdigest()
    if expected and got != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: sha256 {got} is not the expected {expected}; nothing was kept")
    os.replace(part, path)
    if sums.get(path.name) != got:  # new, or checked against sha256= (which wins over the record)
        sums[path.name] = got
        (path.parent / SUMS).write_text("".join(f"{d}  {f}\n" for f, d in sorted(sums.items())))
    log.info("%s: %d bytes, sha256 %s%s", path.name, path.stat().st_size, got, " (checked)" if expected else "")
    return path


def _read_sums(folder: Path) -> Dict[str, str]:
    f = folder / SUMS
    if not f.is_file():
        return {}
    sums = {}
    for line in f.read_text().splitlines():  # sha256sum's format: "<hex>  <name>" ("*<name>" in binary mode)
        parts = line.split(None, 1)
        if len(parts) == 2:
            sums[parts[1].strip().lstrip("*")] = parts[0].lower()
    return sums


def _unzip(path: Path, dest: Path) -> None:
    """Every file of the archive into ``dest`` under its own name (flattened: the names the
    adapters look for); the archive stays (its digest is recorded)."""
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if member.is_dir():
                continue
            with archive.open(member) as src, open(dest / Path(member.filename).name, "wb") as out:
                shutil.copyfileobj(src, out)
