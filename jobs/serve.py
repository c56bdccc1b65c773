"""Serve the promoted model without training (the model registry/recommender/latest.json points to).

    python -m jobs.serve storage.root=<uri> [serve.host=127.0.0.1 serve.port=8000 serve.config=...]

The same service ``jobs.pipeline serve.enabled=true`` starts after training: Ray Serve with
``serve.config`` (configs/serve-fused.yaml), until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

from typing import Any

from components.storage import Storage
from jobs.pipeline import serve_promoted
from jobs.runtime import run_cli


def main(cfg: Any) -> None:
    serve_promoted(cfg, Storage.from_config(cfg.storage))


if __name__ == "__main__":
    run_cli(main)
