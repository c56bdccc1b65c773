"""Serve the promoted model without training (the model registry/recommender/latest.json points to).

    python -m jobs.serve storage.root=<uri> [serve.host=127.0.0.1 serve.port=8000 serve.config=...]

Ray Serve with ``serve.config`` (configs/serve-fused.yaml) until SIGTERM or Ctrl-C; what
``jobs.pipeline serve.enabled=true`` starts after training. ``serve.demo_feedback=true`` first shows
the feedback loop once against it (serve/demo.py).
"""

from __future__ import annotations

from typing import Any

from components import layout, registry
from components.storage import Storage
from jobs.runtime import ray_session, run_cli


# What main(cfg) reads (retrain.epochs: the serve.demo_feedback pass): `--help` lists these settings.
CONFIG_SECTIONS = ("storage", "ray", "serve", "preprocess.pseudonymize_users", "retrain.epochs")


def main(cfg: Any) -> None:
    from serve import demo, runner

    storage = Storage.from_config(cfg.storage)
    if registry.read_pointer(storage) is None:
        raise FileNotFoundError(f"nothing to serve: no promoted model under {storage.uri(layout.REGISTRY)}")
    overrides = {"storage_root": storage.root, "storage_endpoint": cfg.storage.endpoint_url}
    if cfg.preprocess.pseudonymize_users:  # the service must store feedback under the dataset's pseudonyms
        overrides["pseudonymize_users"] = True
    if cfg.serve.watch_interval_s:
        overrides["watch_interval_s"] = cfg.serve.watch_interval_s
    if cfg.serve.precision:
        overrides["precision"] = cfg.serve.precision
    with ray_session(cfg.ray):
        url = runner.start(cfg.serve.config, overrides, host=cfg.serve.host, port=cfg.serve.port,
                           log_encoding=cfg.serve.log_encoding)
        if cfg.serve.demo_feedback:
            demo.run(cfg, storage, url)
        runner.serve_until_signal(url)


if __name__ == "__main__":
    run_cli(main)
