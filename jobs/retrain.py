"""Feedback retraining: new feedback shards -> new dataset version -> warm-started fine-tune ->
evaluation -> promotion (compare-and-swap) -> serving replicas swap on their next poll.

    python -m jobs.retrain storage.root=<uri>                      # one pass (cron, Kubernetes RayJob)
    python -m jobs.retrain storage.root=<uri> retrain.every=10m    # a loop

One pass, a pipeline of the other jobs' ``main``:
1. reads ``registry/recommender/latest.json`` and the promoted bundle's lineage: dataset version,
   feedback watermark (the last feedback shard it was trained on), config;
2. lists ``feedback/dt=*/part-*.parquet`` shards named after the watermark; stops when fewer than
   ``retrain.min_events`` events are new;
3. stages the parent dataset's interactions, the new shards and the catalog (with items upserted
   through the API) under ``retrain/<run_id>/input/`` and runs jobs.preprocess over it (validation,
   quarantine, de-dup, k-core, split) into a new dataset version;
4. jobs.train with ``train.warm_start`` = the parent: the catalog embedded with the parent's LLM,
   the retriever and ranker fine-tuned from the parent's weights (ID rows matched by item id);
5. jobs.evaluate with ``evaluate.parent``: the parent mapped onto the new split is evaluated there,
   the gate compares the two on the selection split (valid, or the valid lists the rankers did not
   train on; test is reported), and promotes only while the registry still names the parent: a
   failed or worse run never promotes, and a run never replaces a pointer that moved meanwhile.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from components import checkpoints as ck
from components import layout, registry
from components.config import parse_duration
from components.evaluation.evaluate import feedback_holdout
from components.online.feedback_log import list_feedback_shards, read_feedback, shard_key
from components.online.retrain_input import stage_retrain_input
from components.storage import Storage
from jobs import evaluate, preprocess, train
from jobs.runtime import ray_session, run_cli

log = logging.getLogger("jobs.retrain")
# Settings a retrain inherits from the model it starts from: the model's shape (so the warm start
# fits) and the data rules (so the new version means the same). Training lengths, learning rates
# and everything else come from this run's config.
INHERITED = {"text": None, "retriever": None, "preprocess": None, "ranker": ("hidden", "candidates")}


def _pass_config(cfg: Any, storage: Storage, pointer: Dict[str, Any], lineage: Dict[str, Any], run_id: str,
                 input_prefix: str, extra_lineage: Dict[str, Any]) -> Any:
    """This run's config: the parent's model shape and data rules, the staged input as a files
    source under the parent's dataset name, warm start and comparison with the parent."""
    parent_cfg = lineage.get("config") or {}
    inherited = {k: (parent_cfg[k] if keys is None else {x: parent_cfg[k][x] for x in keys if x in parent_cfg[k]})
                 for k, keys in INHERITED.items() if k in parent_cfg}
    return OmegaConf.merge(cfg, inherited, {
        "data": {"source": "files", "path": storage.uri(input_prefix), "name": lineage["dataset"]},
        "preprocess": {"engine": "ray"},
        "train": {"stages": list(cfg.retrain.stages), "run_id": run_id, "retriever": {"epochs": cfg.retrain.epochs},
                  "warm_start": pointer["prefix"], "lineage": extra_lineage},
        "evaluate": {"run_id": run_id, "parent": pointer["run_id"], "baselines": False, "new_item_variant": False,
                     "tolerance": cfg.retrain.tolerance}})


def retrain_once(cfg: Any, storage: Optional[Storage] = None) -> Dict[str, Any]:
    t0 = time.perf_counter()
    storage = storage or Storage.from_config(cfg.storage)
    pointer = registry.read_pointer(storage)
    if pointer is None:
        raise FileNotFoundError(f"no promoted model under {storage.uri(layout.REGISTRY)}: run jobs.pipeline first")
    lineage = storage.read_json(layout.join(pointer["prefix"], layout.LINEAGE))
    watermark = lineage.get("feedback_watermark") or ""
    shards = list_feedback_shards(storage, after=watermark)
    new = read_feedback(storage, shards)
    if new.num_rows < cfg.retrain.min_events:
        msg = f"{new.num_rows} new feedback events since {watermark or 'the first model'} (< {cfg.retrain.min_events})"
        print(f"retrain: nothing to do, {msg}", flush=True)
        return {"status": "skipped", "reason": msg, "parent": pointer["run_id"]}
    run_id = cfg.train.run_id or ck.new_run_id("retrain")
    input_prefix = stage_retrain_input(storage, run_id, layout.dataset(lineage["dataset"], lineage["dataset_version"]),
                                       shards)
    cfg = _pass_config(cfg, storage, pointer, lineage, run_id, input_prefix,
                       {"feedback_watermark": shard_key(shards[-1]), "feedback_shards": len(shards),
                        "feedback_events": new.num_rows})
    print(f"retrain {run_id}: parent {pointer['run_id']}, {new.num_rows} new events in {len(shards)} shards "
          f"after {watermark or 'the start'}", flush=True)
    timings: Dict[str, float] = {}
    with ray_session(cfg.ray):
        t = time.perf_counter()
        pre = preprocess.main(cfg)
        timings["preprocess_s"] = round(time.perf_counter() - t, 1)
        cfg = OmegaConf.merge(cfg, {"train": {"dataset_version": pre["version"]}})
        t = time.perf_counter()
        trained = train.main(cfg)
        timings["embed_s"] = trained["timings"].get("embed_s", 0.0)
        timings["train_s"] = round(time.perf_counter() - t - timings["embed_s"], 1)
        t = time.perf_counter()
        out = evaluate.main(cfg)
        timings["evaluate_s"] = round(time.perf_counter() - t, 1)
    holdout = feedback_holdout(storage, out["report_prefix"], pre["prefix"], new)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    return _summary(pointer, run_id, pre, new, out, holdout, timings)


def _summary(pointer, run_id, pre, new, out, holdout, timings) -> Dict[str, Any]:
    res, p = out["results"], out["promotion"]
    child = res["models"][res["main_model"]]
    before = registry.pointer_metrics(out["parent"]) if out.get("parent") else {}
    decided = p.get("decided_on", registry.selection_split(child))
    print(f"dataset {res['dataset']}/{pre['version']}: {pre['stats'].get('interactions')} interactions "
          f"({new.num_rows} from feedback)")
    print(f"model {pointer['run_id']} -> {run_id}, both on the new split: {decided} NDCG@10 "
          f"{_f(before.get('selection_ndcg@10') if before.get('selection_split') == decided else None)} -> "
          f"{_f(child.get(decided, {}).get('ndcg@10'))} (the gate decides on this; valid "
          f"{_f(before.get('valid_ndcg@10'))} -> {child['valid']['ndcg@10']:.4f}); "
          f"test NDCG@10 {_f(before.get('test_ndcg@10'))} -> {child['test']['ndcg@10']:.4f}, "
          f"Recall@10 {_f(before.get('test_recall@10'))} -> {child['test']['recall@10']:.4f}; "
          f"newest-feedback holdout Recall@10 {holdout.get('recall@10')} (n={holdout['n']})")
    bars = {b: res["models"][b]["test"]["ndcg@10"] for b in ("MostPopular", "ItemKNN") if b in res["models"]}
    print("baselines on the new split, test NDCG@10: " + ", ".join(f"{b} {v:.4f}" for b, v in bars.items()))
    print(f"timings: {timings}", flush=True)
    return {"status": "promoted" if p["promoted"] else "canary" if p.get("canary") else "rejected", "run_id": run_id, "parent": pointer["run_id"],
            "parent_on_new_split": out.get("parent"), "valid": child["valid"], "baselines_test_ndcg@10": bars,
            "dataset_version": pre["version"], "new_events": new.num_rows, "holdout": holdout, "test": child["test"],
            "promotion": p, "timings": timings}


def _f(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# What main(cfg) and the jobs it chains read: `--help` lists these settings. Not data (a pass
# stages its own input) nor text, retriever, preprocess: those come from the promoted model (INHERITED).
CONFIG_SECTIONS = ("storage", "ray", "train", "ranker", "embed", "evaluate", "retrain")


def main(cfg: Any) -> Dict[str, Any]:
    if not cfg.retrain.every:
        return retrain_once(cfg)
    period = parse_duration(cfg.retrain.every)
    while True:  # a loop for a long-running RayJob; each pass is independent
        started = time.monotonic()
        try:
            retrain_once(cfg)
        except Exception as exc:  # a failed pass promotes nothing; the next one tries again
            log.error("retrain pass failed: %s", exc, exc_info=True)
        time.sleep(max(0.0, period - (time.monotonic() - started)))


if __name__ == "__main__":
    run_cli(main)
