"""Download a public dataset from its publisher (needs internet; never used by tests).

    python -m jobs.download dataset=ml-latest-small dest=data
    python -m jobs.download dataset=amazon:Gift_Cards dest=data

Files keep their original names, so the folder can be passed as ``data.path``.
"""

from __future__ import annotations

from dataclasses import dataclass

from components.data.sources.download import DATASETS, download
from jobs.runtime import run_cli


@dataclass
class DownloadConfig:
    # ml-latest-small | ml-100k | ml-1m | ml-25m | mind-small | amazon:<Category>
    dataset: str = "ml-latest-small"
    dest: str = "data"


def main(cfg) -> None:
    path = download(cfg.dataset, cfg.dest)
    source = "amazon" if cfg.dataset.startswith("amazon:") else DATASETS[cfg.dataset]["source"]
    print(f"downloaded to {path}\nnext: python -m jobs.pipeline data.source={source} data.path={path}")


if __name__ == "__main__":
    run_cli(main, DownloadConfig)
