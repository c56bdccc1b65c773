"""Full-ranking evaluation, baselines, report, and the promotion gate.

    python -m jobs.evaluate storage.root=<uri> [evaluate.run_id=<run_id>] [evaluate.parent=<run_id>]

Writes ``reports/<run_id>/``: report.md, metrics.json, PNG plots, predictions.parquet
(``user_id``, ``items`` = top-100 original item ids in rank order, for every test user) and
test_ranks.parquet (each model's rank of every test target, for paired comparisons). Promotes
``registry/recommender/latest.json`` when the run clears the gate (components.registry
``decide_promotion``: NDCG@10 on the selection split - valid, or the valid lists the ranker did not
train on - against the floor, MostPopular, ItemKNN and the promoted model). Test figures are
reported, never used to decide. With ``evaluate.parent`` (jobs.retrain) the parent is evaluated on
this run's split and is what the run is compared with.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict

from components import checkpoints as ck
from components import layout, registry
from components.evaluation.evaluate import evaluate_bundle, evaluate_parent_on, predictions_table, test_ranks_table
from components.evaluation.report import plot_report, report_markdown
from components.storage import Storage
from jobs import telemetry
from jobs.progress import stage as progress_stage
from jobs.runtime import run_cli

# What the parent's evaluation needs of its bundle.
PARENT_PARTS = (layout.RETRIEVER, layout.RANKER, layout.ITEMS)


def _write_report(storage: Storage, run_id: str, ev: Dict[str, Any]) -> str:
    prefix = layout.report(run_id)
    storage.write_parquet(layout.join(prefix, layout.PREDICTIONS), predictions_table(storage, ev))
    storage.write_parquet(layout.join(prefix, layout.TEST_RANKS), test_ranks_table(storage, ev))
    storage.write_json(layout.join(prefix, layout.METRICS), ev["results"])
    with tempfile.TemporaryDirectory() as tmp:
        plots = plot_report(Path(tmp), ev)
        for name in plots:
            storage.write_bytes(layout.join(prefix, name), (Path(tmp) / name).read_bytes())
    storage.write_bytes(layout.join(prefix, layout.REPORT), report_markdown(ev["results"], plots).encode())
    return prefix


def _parent_baseline(cfg: Any, storage: Storage, child: Path, version: str) -> tuple:
    """(pointer as the gate should see it, token): the parent's figures measured on this run's
    split; a pointer that no longer names the parent is a conflict (another run promoted)."""
    pointer, token = registry.read_pointer_versioned(storage)
    if pointer is None or pointer["run_id"] != cfg.evaluate.parent:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        for part in PARENT_PARTS:
            if storage.exists(layout.join(pointer["prefix"], part)):
                storage.download_dir(layout.join(pointer["prefix"], part), Path(tmp) / part)
        parent = evaluate_parent_on(cfg, storage, Path(tmp), child, pointer["run_id"])
    baseline = dict(pointer, metrics=registry.pointer_metrics(parent),
                    lineage={**pointer.get("lineage", {}), "dataset_version": version})
    return (baseline, token), parent


# What main(cfg) reads (the retriever and train.* ones for evaluate.baselines and the new-item
# variant, which train in-process): `--help` lists these settings.
CONFIG_SECTIONS = ("storage", "evaluate", "retriever", "train.num_workers", "train.retriever_workers", "train.retriever",
                   "retrain.rollout", "retrain.canary_share", "retrain.canary_rule")


def main(cfg: Any) -> Dict[str, Any]:
    storage = Storage.from_config(cfg.storage)
    run_id = cfg.evaluate.run_id
    if not run_id:
        pointer = registry.read_pointer(storage)
        if pointer is None:
            raise FileNotFoundError("evaluate.run_id not given and no promoted model in the registry")
        run_id = pointer["run_id"]
    prefix = layout.bundle(run_id)
    local = ck.fetch(storage, prefix, tempfile.mkdtemp(prefix="eval-"))
    with progress_stage("evaluate", unit="model") as bar:
        ev = evaluate_bundle(cfg, storage, local, run_id, tick=bar.update)
    res = ev["results"]
    report = _write_report(storage, run_id, ev)
    trained = {"run_id": run_id, "prefix": prefix, "manifest": storage.read_json(layout.join(prefix, layout.MANIFEST)),
               "lineage": storage.read_json(layout.join(prefix, layout.LINEAGE))}
    expected, parent = (_parent_baseline(cfg, storage, local, res["dataset_version"]) if cfg.evaluate.parent
                        else (None, None))
    if cfg.evaluate.parent and expected is None:
        decision = {"promoted": False, "reason": f"the registry no longer points at the parent {cfg.evaluate.parent}: "
                                                 "another run promoted meanwhile; gate not run"}
    else:
        canary = cfg.retrain.canary_share if cfg.evaluate.parent and cfg.retrain.rollout == "canary" else None
        decision = registry.gate_and_promote(storage, res, trained, cfg.evaluate.ndcg_floor, cfg.evaluate.tolerance,
                                             expected, canary_share=canary, canary_rule=cfg.retrain.canary_rule)
    res["promotion"] = decision
    storage.write_json(layout.join(report, layout.METRICS), res)
    for model, splits in res["models"].items():  # Prometheus gauges, while Ray is up
        for split, m in splits.items():
            telemetry.record_many("llmrec_eval_metric", m, "metric", run=run_id, model=model, split=split)
    print(report_markdown(res))
    verdict = "PROMOTED" if decision["promoted"] else "CANARY" if decision.get("canary") else "not promoted"
    print(f"promotion: {verdict} ({decision['reason']})", flush=True)
    return {"results": res, "report_prefix": report, "promotion": decision, "parent": parent}


if __name__ == "__main__":
    run_cli(main)
