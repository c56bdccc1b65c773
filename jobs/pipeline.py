"""The main job: preprocess -> embed -> train -> evaluate -> promote (-> serve), on any source.

    python -m jobs.pipeline data.source=<synthetic|movielens|amazon|mind|files> data.path=<dir> \
        storage.root=<uri> [serve.enabled=true serve.port=8000]

Each stage is its own job's ``main`` (jobs.preprocess, jobs.train - which embeds the catalog with
jobs.embed_items -, jobs.evaluate), chained in one Ray session. With ``serve.enabled=true`` it then
serves the promoted model (jobs.serve) on serve.host:serve.port (default 127.0.0.1:8000) until
SIGTERM or Ctrl-C, and shuts Serve and Ray down cleanly.
"""

from __future__ import annotations

import time
from typing import Any, Dict

from omegaconf import OmegaConf

from components import checkpoints as ck
from components import layout
from components.storage import Storage
from jobs import evaluate, preprocess, telemetry, train
from jobs import serve as serve_job
from jobs.runtime import ray_session, run_cli


# What main(cfg) and the jobs it chains read: `--help` lists these settings.
CONFIG_SECTIONS = ("storage", "data", "preprocess", "ray", "text", "retriever", "ranker", "train", "embed",
                   "evaluate", "serve", "retrain.epochs")


def main(cfg: Any) -> Dict[str, Any]:
    t0 = time.perf_counter()
    storage = Storage.from_config(cfg.storage)
    run_id = cfg.train.run_id or ck.new_run_id()
    timings: Dict[str, float] = {}
    with ray_session(cfg.ray):
        pre = preprocess.main(cfg)
        timings["preprocess_s"] = round(time.perf_counter() - t0, 1)
        cfg = OmegaConf.merge(cfg, {"train": {"dataset_version": pre["version"], "run_id": run_id},
                                    "evaluate": {"run_id": run_id}})
        t = time.perf_counter()
        trained = train.main(cfg)
        if "embed_s" in trained["timings"]:
            timings["embed_s"] = trained["timings"]["embed_s"]
        timings["train_s"] = round(time.perf_counter() - t - timings.get("embed_s", 0.0), 1)
        t = time.perf_counter()
        out = evaluate.main(cfg)  # in the Ray session: its metrics go out with the others
        timings["evaluate_s"] = round(time.perf_counter() - t, 1)
        timings["total_s"] = round(time.perf_counter() - t0, 1)
        telemetry.record_many("llmrec_stage_seconds", timings, "stage", job="pipeline", run=run_id)
    promoted = out["promotion"]["promoted"]
    print(f"report: {storage.uri(out['report_prefix'])}/{layout.REPORT}")
    print(f"model:  {storage.uri(trained['prefix'])}" + (f"  (promoted: {layout.pointer()})" if promoted else ""))
    print(f"timings: {timings}", flush=True)
    if cfg.serve.enabled:
        serve_job.main(cfg)
    else:
        print(f"serve it: llmrec serve storage.root={storage.root}   (then open http://127.0.0.1:8000)", flush=True)
    return {"preprocess": pre, "train": trained, "evaluate": out, "timings": timings}


if __name__ == "__main__":
    run_cli(main)
