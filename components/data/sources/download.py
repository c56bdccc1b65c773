"""Publisher URLs of the public datasets the adapters read, and a downloader for users with internet.

Never used by tests (they read ../shared/data). Files are saved under their original names so
that ``data.path`` can point at the folder directly.
"""

from __future__ import annotations

import io
import shutil
import urllib.request
import zipfile
from pathlib import Path
from typing import Dict, List

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


def download(name: str, dest: str | Path) -> Path:
    """Download ``name`` (a key of DATASETS, or ``amazon:<Category>``) into ``dest/<name>``."""
    dest = Path(dest) / name.replace(":", "-")
    dest.mkdir(parents=True, exist_ok=True)
    if name.startswith("amazon:"):
        for url in amazon_urls(name.split(":", 1)[1]):
            _fetch_to(url, dest / url.rsplit("/", 1)[1])
        return dest
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} or amazon:<Category>")
    with urllib.request.urlopen(DATASETS[name]["zip"], timeout=60) as resp:
        archive = zipfile.ZipFile(io.BytesIO(resp.read()))
    for member in archive.infolist():
        if member.is_dir():
            continue
        target = dest / Path(member.filename).name  # flatten: files keep their original names
        with archive.open(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
    return dest


def _fetch_to(url: str, path: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as resp, open(path, "wb") as out:
        shutil.copyfileobj(resp, out)
