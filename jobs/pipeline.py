"""The main job: preprocess -> embed -> train -> evaluate -> promote (-> serve), on any source.

    python -m jobs.pipeline data.source=<synthetic|movielens|amazon|mind|files> data.path=<dir> \
        storage.root=<uri> [serve.enabled=true serve.port=8000]

With ``serve.enabled=true`` it then serves the promoted model on serve.host:serve.port (default
127.0.0.1:8000) with Ray Serve until SIGTERM or Ctrl-C, and shuts Serve and Ray down cleanly.

Every stage is the same code its own job runs (jobs.preprocess, jobs.embed_items, jobs.train,
jobs.evaluate); this file only chains them in one Ray session and prints what happened.
"""

from __future__ import annotations

import time
from typing import Any, Dict

from components import checkpoints as ck
from components.datasets import resolve_dataset
from components.storage import Storage
from jobs import evaluate, preprocess, train
from jobs.embed_items import embed_items
from jobs.runtime import ray_session, run_cli


def main(cfg: Any) -> Dict[str, Any]:
    t0 = time.perf_counter()
    storage = Storage.from_config(cfg.storage)
    run_id = cfg.train.run_id or ck.new_run_id()
    timings: Dict[str, float] = {}
    with ray_session(cfg.ray):
        pre = preprocess.run(cfg, engine="ray")
        print(preprocess.format_stats(pre["stats"]), flush=True)
        timings["preprocess_s"] = round(time.perf_counter() - t0, 1)
        ds = resolve_dataset(storage, _with_version(cfg, pre["version"]))
        text_prefix = None
        if cfg.retriever.use_text:
            t = time.perf_counter()
            emb = embed_items(cfg, storage, ds, f"{run_id}-base")
            text_prefix = emb["prefix"]
            timings["embed_s"] = round(time.perf_counter() - t, 1)
            print(f"embedded {emb['rows']} items with the LLM (dim {emb['dim']}) in {emb['seconds']}s", flush=True)
        t = time.perf_counter()
        trained = train.train(cfg, storage, ds, run_id, text_prefix, parent=ck.read_pointer(storage, train.BUNDLE))
        timings["train_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    out = evaluate.run(cfg, storage, trained)
    timings["evaluate_s"] = round(time.perf_counter() - t, 1)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    print(evaluate.report_markdown(out["results"]))
    p = out["promotion"]
    print(f"promotion: {'PROMOTED' if p['promoted'] else 'not promoted'} ({p['reason']})")
    print(f"report: {storage.uri(out['report_prefix'])}/report.md")
    print(f"timings: {timings}", flush=True)
    result = {"preprocess": pre, "train": trained, "evaluate": out, "timings": timings}
    if cfg.serve.enabled:
        serve_promoted(cfg, storage)
    return result


def serve_promoted(cfg: Any, storage: Storage) -> None:
    """Serve registry/recommender/latest.json until interrupted (jobs.pipeline serve.enabled=true)."""
    from serve import runner

    if ck.read_pointer(storage, train.BUNDLE) is None:
        raise FileNotFoundError(f"nothing to serve: no promoted model under {storage.uri('registry')}")
    overrides = {"storage_root": storage.root, "storage_endpoint": cfg.storage.endpoint_url}
    if cfg.serve.watch_interval_s:
        overrides["watch_interval_s"] = cfg.serve.watch_interval_s
    with ray_session(cfg.ray):
        url = runner.start(cfg.serve.config, overrides, host=cfg.serve.host, port=cfg.serve.port)
        runner.serve_until_signal(url)


def _with_version(cfg: Any, version: str) -> Any:
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(cfg, {"train": {"dataset_version": version}})
    return cfg


if __name__ == "__main__":
    run_cli(main)
