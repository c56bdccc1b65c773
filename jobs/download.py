"""Download a public dataset from its publisher (needs internet; never used by tests).

    python -m jobs.download dataset=ml-latest-small dest=data
    python -m jobs.download dataset=amazon:Gift_Cards dest=data

Files keep their original names, so the folder can be passed as ``data.path``. Each is streamed
with a progress bar, retried with back-off, and kept only when its sha256 matches ``sha256=`` or
the digest recorded in the folder's SHA256SUMS by an earlier download (else recorded there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from components.data.sources.download import DATASETS, download
from jobs.runtime import run_cli


@dataclass
class DownloadConfig:
    # ml-latest-small | ml-100k | ml-1m | ml-25m | mind-small | amazon:<Category>
    dataset: str = "ml-latest-small"
    dest: str = "data"
    # Expected sha256 of a one-file dataset (the MovieLens and MIND zips); without it the digest of
    # every file is recorded in <dest>/<dataset>/SHA256SUMS and a later download must match it.
    sha256: Optional[str] = None
    # Attempts after the first (connection errors, 429/5xx, a body cut off), with back-off.
    retries: int = 5
    # A progress bar per file on stderr.
    progress: bool = True


def main(cfg) -> None:
    path = download(cfg.dataset, cfg.dest, sha256=cfg.sha256, retries=cfg.retries, progress=cfg.progress)
    source = "amazon" if cfg.dataset.startswith("amazon:") else DATASETS[cfg.dataset]["source"]
    print(f"downloaded to {path}\nnext: python -m jobs.pipeline data.source={source} data.path={path}")


if __name__ == "__main__":
    run_cli(main, DownloadConfig)
