"""Feedback retraining: new feedback shards -> new dataset version -> warm-started fine-tune ->
evaluation -> promotion (compare-and-swap) -> serving replicas swap on their next poll.

    python -m jobs.retrain storage.root=<uri>                      # one pass (cron, Kubernetes RayJob)
    python -m jobs.retrain storage.root=<uri> retrain.every=10m    # a loop

One pass:
1. reads ``registry/recommender/latest.json`` (and its token) and the promoted bundle's lineage:
   dataset version, feedback watermark (the last feedback shard it was trained on), config;
2. lists ``feedback/dt=*/part-*.parquet`` shards named after the watermark; stops when fewer than
   ``retrain.min_events`` events are new;
3. stages the parent dataset's interactions, the new shards and the catalog (with items upserted
   through the API) under ``retrain/<run_id>/input/`` and runs the same Ray Data preprocessing
   (validation, quarantine, de-dup, k-core, split) into a new dataset version; the global steps are
   recomputed over the merged input, the new shards are the delta;
4. embeds the catalog with the parent's LLM and fine-tunes the retriever and ranker with Ray Train
   + DeepSpeed, warm-started from the parent (ID rows matched by item id);
5. evaluates the new model and the parent (mapped onto the new vocabulary) on the new split (the
   gate decides on the selection split - valid, or the valid lists the rankers did not train
   on - and test is reported),
   and the new model on the holdout of the newest feedback (test targets from the new shards); the
   gate compares the two on the same split, and promotion is a compare-and-swap against the
   pointer read in step 1: a failed or worse run never promotes, and a run never replaces a
   pointer that moved while it trained.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
from omegaconf import OmegaConf

from components import checkpoints as ck
from components import registry
from components import layout
from components.data.datasets import resolve_dataset
from components.storage import Storage
from jobs import evaluate, preprocess, train
from jobs.embed_items import embed_items
from jobs.runtime import ray_session, run_cli
from components.online.feedback_log import list_feedback_shards, read_feedback, shard_key

log = logging.getLogger("jobs.retrain")
EVENT_COLUMNS = ["user_id", "item_id", "ts", "event", "value"]
ITEM_COLUMNS = ["item_id", "title", "text", "categories"]
# Settings a retrain inherits from the model it starts from: the model's shape (so the warm start
# fits) and the data rules (so the new version means the same). Training lengths, learning rates
# and everything else come from this run's config.
INHERITED = {"text": None, "retriever": None, "preprocess": None, "ranker": ("hidden", "candidates")}


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*", str(text))
    if not m:
        raise ValueError(f"retrain.every must look like 30s, 10m, 1h or 1d; got {text!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2) or "s"]


def stage_inputs(storage: Storage, run_id: str, dataset_prefix: str, shards: List[str]) -> str:
    """Write the merged preprocessing input under retrain/<run_id>/input/; returns its prefix."""
    base = f"retrain/{run_id}/input"
    parts = [storage.read_parquet(f"{dataset_prefix}/{split}", columns=EVENT_COLUMNS) for split in ("train", "valid", "test")]
    events = pa.concat_tables([pa.table({c: (t[c].cast(pa.string()) if c in ("user_id", "item_id", "event") else t[c])
                                         for c in EVENT_COLUMNS}) for t in parts])
    storage.write_parquet(f"{base}/events/base.parquet", events)
    for f in shards:  # the delta: copied as written by serving, validated like any raw shard
        storage.write_bytes(f"{base}/events/feedback-{shard_key(f)}", storage.read_bytes(f))
    items = storage.read_parquet(f"{dataset_prefix}/items", columns=ITEM_COLUMNS)
    items = pa.table({c: items[c] for c in ITEM_COLUMNS})
    upserts = storage.list_files("catalog/upserts", (".parquet",))
    if upserts:
        new = storage.read_parquet("catalog/upserts")
        new = pa.table({"item_id": new["item_id"].cast(pa.string()), "title": new["title"].cast(pa.string()),
                        "text": new["text"].cast(pa.string()),
                        "categories": new["categories"].cast(pa.list_(pa.string()))})
        items = pa.concat_tables([items.cast(new.schema), new])
    storage.write_parquet(f"{base}/items/items.parquet", items)
    return base


def feedback_holdout(storage: Storage, report_prefix: str, dataset_prefix: str, new: pa.Table, k: int = 10) -> Dict:
    """Recall@k of the new model on test targets that came from the new feedback."""
    test = storage.read_parquet(f"{dataset_prefix}/test", columns=["user_id", "item_id"])
    pairs = set(zip(new["user_id"].cast(pa.string()).to_pylist(), new["item_id"].cast(pa.string()).to_pylist()))
    targets = {u: i for u, i in zip(test["user_id"].cast(pa.string()).to_pylist(),
                                    test["item_id"].cast(pa.string()).to_pylist()) if (u, i) in pairs}
    if not targets:
        return {"n": 0, f"recall@{k}": None}
    preds = storage.read_parquet(f"{report_prefix}/predictions.parquet")
    top = dict(zip(preds["user_id"].cast(pa.string()).to_pylist(), preds["items"].to_pylist()))
    hits = [targets[u] in (top.get(u) or [])[:k] for u in targets]
    return {"n": len(hits), f"recall@{k}": round(float(np.mean(hits)), 4)}


def parent_on_new_split(cfg: Any, storage: Storage, pointer: Dict[str, Any], trained: Dict[str, Any]) -> Dict:
    """The promoted (parent) model evaluated on the new dataset version's split, so the gate
    compares like with like: its ID rows mapped onto the new vocabulary by item id (items it never
    saw get a zero ID row, as when it serves them), its text tower over the same embeddings, its
    ranker as is."""
    from dataclasses import asdict

    import torch
    from safetensors.torch import load as load_safetensors

    from components.models.retriever import RetrieverConfig, SequenceRetriever
    from components.training.warm_start import warm_start

    new_dir = Path(trained["local_dir"])
    rcfg = RetrieverConfig(**json.loads((new_dir / "retriever/config.json").read_text())["retriever"])
    model = SequenceRetriever(rcfg)
    parent_state = load_safetensors(storage.read_bytes(f"{pointer['prefix']}/retriever/{layout.WEIGHTS}"))
    parent_ids = storage.read_parquet(f"{pointer['prefix']}/items").sort_by("item_idx")["item_id"].to_pylist()
    new_ids = storage.read_parquet(f"{trained['prefix']}/items").sort_by("item_idx")["item_id"].to_pylist()
    with torch.no_grad():
        warm_start(model, parent_state, parent_ids, new_ids, zero_unmapped=True)
    folder = Path(tempfile.mkdtemp(prefix="parent-eval-"))
    ck.save_local(folder / "retriever", model.state_dict(), {"retriever": asdict(rcfg), "kind": "retriever"})
    if storage.is_file(f"{pointer['prefix']}/ranker/{layout.WEIGHTS}"):
        storage.download_dir(f"{pointer['prefix']}/ranker", folder / "ranker")
    shutil.copy(new_dir / "lineage.json", folder / "lineage.json")  # the new dataset + text embeddings
    res = evaluate.evaluate_bundle(cfg, storage, folder, pointer["run_id"])["results"]
    shutil.rmtree(folder, ignore_errors=True)
    return res["models"][res["main_model"]]


def retrain_once(cfg: Any, storage: Optional[Storage] = None) -> Dict[str, Any]:
    t0 = time.perf_counter()
    storage = storage or Storage.from_config(cfg.storage)
    pointer, token = registry.read_pointer_versioned(storage, train.BUNDLE)
    if pointer is None:
        raise FileNotFoundError(f"no promoted model under {storage.uri('registry')}: run jobs.pipeline first")
    parent_lineage = storage.read_json(f"{pointer['prefix']}/lineage.json")
    watermark = parent_lineage.get("feedback_watermark") or ""
    shards = list_feedback_shards(storage, after=watermark)
    new = read_feedback(storage, shards)
    if new.num_rows < cfg.retrain.min_events:
        msg = f"{new.num_rows} new feedback events since {watermark or 'the first model'} (< {cfg.retrain.min_events})"
        print(f"retrain: nothing to do, {msg}", flush=True)
        return {"status": "skipped", "reason": msg, "parent": pointer["run_id"]}
    run_id = cfg.train.run_id or ck.new_run_id("retrain")
    parent_cfg = parent_lineage.get("config") or {}
    inherited = {k: (parent_cfg[k] if keys is None else {x: parent_cfg[k][x] for x in keys if x in parent_cfg[k]})
                 for k, keys in INHERITED.items() if k in parent_cfg}
    dataset_name = parent_lineage["dataset"]
    input_prefix = stage_inputs(storage, run_id, f"datasets/{dataset_name}/{parent_lineage['dataset_version']}", shards)
    cfg = OmegaConf.merge(cfg, inherited, {
        "data": {"source": "files", "path": storage.uri(input_prefix), "name": dataset_name},
        "train": {"stages": list(cfg.retrain.stages), "run_id": run_id,
                  "retriever": {"epochs": cfg.retrain.epochs}},
        "evaluate": {"baselines": False, "new_item_variant": False, "tolerance": cfg.retrain.tolerance}})
    print(f"retrain {run_id}: parent {pointer['run_id']}, {new.num_rows} new events in {len(shards)} shards "
          f"after {watermark or 'the start'}", flush=True)
    timings: Dict[str, float] = {}
    with ray_session(cfg.ray):
        t = time.perf_counter()
        pre = preprocess.run(cfg, engine="ray")
        timings["preprocess_s"] = round(time.perf_counter() - t, 1)
        ds = resolve_dataset(storage, OmegaConf.merge(cfg, {"train": {"dataset_version": pre["version"]}}))
        text_prefix = None
        if cfg.retriever.use_text:
            t = time.perf_counter()
            llm = f"{pointer['prefix']}/llm"  # the parent's fine-tuned LLM, read by the actors from storage
            text_prefix = embed_items(cfg, storage, ds, f"{run_id}-text",
                                      llm_prefix=llm if storage.is_file(f"{llm}/{layout.WEIGHTS}") else None)["prefix"]
            timings["embed_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        trained = train.train(cfg, storage, ds, run_id, text_prefix, parent=pointer,
                              warm_start_prefix=pointer["prefix"], llm_from=pointer["prefix"],
                              extra_lineage={"feedback_watermark": shard_key(shards[-1]),
                                             "feedback_shards": len(shards), "feedback_events": new.num_rows})
        timings["train_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    parent = parent_on_new_split(cfg, storage, pointer, trained)
    # The parent measured on the new split: the gate compares like with like, on the selection split.
    split = evaluate.selection_split(parent)
    baseline = dict(pointer, metrics={"selection_split": split, "selection_ndcg@10": parent[split]["ndcg@10"],
                                      "valid_ndcg@10": parent["valid"]["ndcg@10"],
                                      "test_ndcg@10": parent["test"]["ndcg@10"],
                                      "test_recall@10": parent["test"]["recall@10"]},
                    lineage={**pointer.get("lineage", {}), "dataset_version": ds.version})
    out = evaluate.run(cfg, storage, trained, expected=(baseline, token))
    timings["evaluate_s"] = round(time.perf_counter() - t, 1)
    holdout = feedback_holdout(storage, out["report_prefix"], ds.prefix, new)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    child = out["results"]["models"][out["results"]["main_model"]]
    main = child["test"]
    before = baseline["metrics"]
    p = out["promotion"]
    print(f"dataset {ds.name}/{ds.version}: {pre['stats'].get('interactions')} interactions "
          f"({new.num_rows} from feedback)")
    decided = p["decided_on"]
    print(f"model {pointer['run_id']} -> {run_id}, both on the new split: {decided} NDCG@10 "
          f"{_f(before.get('selection_ndcg@10') if before.get('selection_split') == decided else None)} -> "
          f"{_f(child.get(decided, {}).get('ndcg@10'))} (the gate decides on this; valid "
          f"{_f(before.get('valid_ndcg@10'))} -> {child['valid']['ndcg@10']:.4f}); "
          f"test NDCG@10 {_f(before.get('test_ndcg@10'))} -> {main['ndcg@10']:.4f}, "
          f"Recall@10 {_f(before.get('test_recall@10'))} -> {main['recall@10']:.4f}; "
          f"newest-feedback holdout Recall@10 {holdout.get('recall@10')} (n={holdout['n']})")
    bars = {b: out["results"]["models"][b]["test"]["ndcg@10"] for b in ("MostPopular", "ItemKNN")
            if b in out["results"]["models"]}
    print("baselines on the new split, test NDCG@10: " + ", ".join(f"{b} {v:.4f}" for b, v in bars.items()))
    print(f"promotion: {'PROMOTED' if p['promoted'] else 'not promoted'} ({p['reason']})")
    print(f"timings: {timings}", flush=True)
    return {"status": "promoted" if p["promoted"] else "rejected", "run_id": run_id, "parent": pointer["run_id"],
            "parent_on_new_split": parent, "valid": child["valid"], "baselines_test_ndcg@10": bars,
            "dataset_version": ds.version, "new_events": new.num_rows, "holdout": holdout, "test": main,
            "promotion": p, "timings": timings}


def _f(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


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
