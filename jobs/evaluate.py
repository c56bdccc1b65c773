"""Full-ranking evaluation, baselines, report, and the promotion gate.

    python -m jobs.evaluate storage.root=<uri> evaluate.run_id=<run_id>

Writes ``reports/<run_id>/``: report.md, metrics.json, PNG plots and predictions.parquet
(``user_id``, ``items`` = top-100 original item ids in rank order, for every test user). Promotes
``registry/recommender/latest.json`` when its NDCG@10 on the selection split (valid, or the valid
lists the ranker did not train on) clears ``evaluate.ndcg_floor``, MostPopular and ItemKNN on
the same lists, and is not worse than the promoted model's (same split) by more than
``evaluate.tolerance``. Test figures are reported, never used to decide.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pyarrow as pa
import torch

from components import checkpoints as ck
from components import registry
from components import layout
from components.data.datasets import load_text_embeddings, load_training_data
from components.evaluation.ranking import (baseline_rankings, final_ranking, fit_retriever_local, new_item_histories,
                                   slice_masks, summarize, timed)
from components.evaluation.metrics import popularity_deciles, sliced_metrics
from components.models.baselines import item_counts
from components.models.channels import describe as describe_fusion
from components.models.ranker import RankerConfig, RankerMLP, holdout_rows
from components.models.retriever import RetrieverConfig
from components.training.retriever import RetrieverTrainConfig
from components.storage import Storage
from jobs import telemetry
from jobs.progress import stage as progress_stage
from jobs.runtime import run_cli
from jobs.train import BUNDLE, load_channels, load_retriever

log = logging.getLogger("jobs.evaluate")


def load_ranker(folder: Path) -> Optional[RankerMLP]:
    if not (folder / layout.WEIGHTS).is_file():
        return None
    state, config, _ = ck.load_local(folder)
    model = RankerMLP(RankerConfig(**config["ranker"]))
    model.load_state_dict(state)
    return model.eval()


def evaluate_bundle(cfg: Any, storage: Storage, bundle: Path, run_id: str) -> Dict[str, Any]:
    lineage = json.loads((bundle / "lineage.json").read_text())
    ds_prefix = f"datasets/{lineage['dataset']}/{lineage['dataset_version']}"
    data = load_training_data(storage, ds_prefix, lineage.get("text_embeddings"))
    h, cats, ev = data.histories, data.categories, cfg.evaluate
    retriever, _ = load_retriever(bundle / "retriever", data)
    channels = load_channels(bundle / "channels", data)
    ranker = load_ranker(bundle / "ranker")
    results: Dict[str, Any] = {"run_id": run_id, "dataset": lineage["dataset"],
                               "dataset_version": lineage["dataset_version"], "models": {}, "timings": {},
                               "fusion": lineage.get("fusion")}
    kind = ("hybrid" if retriever.cfg.use_id and retriever.cfg.use_text
            else "id-only" if retriever.cfg.use_id else "text-only")
    fused = kind + "+channels" if channels is not None else kind
    main_name = fused + ("+ranker" if ranker is not None else "")
    rankings = {}
    per_split = 2 + (ranker is not None) + (channels is not None)  # + the non-neural baselines
    trained = [n for n in ("id-only", "text-only") if n != kind and (n == "id-only" or data.text is not None)]
    trained = trained if ev.baselines else []
    with progress_stage("evaluate", total=2 * per_split + 3 * len(trained), unit="model") as bar:
        for split in ("valid", "test"):
            if ranker is not None:
                rankings[(main_name, split)] = final_ranking(retriever, ranker, data.text, h, split, cats,
                                                             channels=channels)
                bar.update(1, last=f"{main_name} {split}")
            if channels is not None:
                rankings[(fused, split)] = final_ranking(retriever, None, data.text, h, split, cats,
                                                         channels=channels)
                bar.update(1, last=f"{fused} {split}")
            rankings[(kind, split)] = final_ranking(retriever, None, data.text, h, split, cats)
            bar.update(1, last=f"{kind} {split}")
        for name, split in list(rankings):
            r, top, _, _ = rankings[(name, split)]
            results["models"].setdefault(name, {})[split] = summarize(r, top, h.num_items, ev.ks)
        for split in ("valid", "test"):
            for name, (r, top) in baseline_rankings(h, split).items():
                rankings[(name, split)] = (r, top)
                results["models"].setdefault(name, {})[split] = summarize(r, top, h.num_items, ev.ks)
            bar.update(1, last=f"baselines {split}")
        _trained_baselines(cfg, trained, h, data, cats, rankings, results, bar)
    if ranker is not None:  # the ranker trained on most valid lists: its figure on the held-out rest
        r, top, _, _ = rankings[(main_name, "valid")]
        held = holdout_rows(np.arange(len(r)), ranker.cfg.holdout)
        for name in {main_name, fused, kind, "MostPopular", "ItemKNN"}:
            r, top = rankings[(name, "valid")][:2]
            results["models"][name]["valid_ranker_holdout"] = summarize(r[held], top[held], h.num_items, ev.ks)
    _slices_and_variant(cfg, h, data, cats, lineage, storage, rankings, results, main_name)
    r_main, top_main, targets, users = rankings[(main_name, "test")]
    results["main_model"] = main_name
    results["predictions"] = {"users": int(len(users)), "topk": int(top_main.shape[1])}
    return {"results": results, "top": top_main, "users": users, "targets": targets, "data": data}


def _trained_baselines(cfg, names, h, data, cats, rankings, results, bar) -> None:
    """ID-only and text-only retrievers trained in-process (``evaluate.baselines=true``)."""
    rcfg, tcfg = RetrieverConfig(**_plain(cfg.retriever)), _local_train_config(cfg)
    variants = {"id-only": replace(rcfg, use_text=False), "text-only": replace(rcfg, use_id=False)}
    for name in names:
        model, secs = timed(fit_retriever_local, h, data.text, variants[name], tcfg)
        bar.update(1, last=f"fit {name}")
        results["timings"][f"fit_{name}_s"] = secs
        for split in ("valid", "test"):
            r, top, t, u = final_ranking(model, None, data.text, h, split, cats)
            rankings[(name, split)] = (r, top, t, u)
            results["models"].setdefault(name, {})[split] = summarize(r, top, h.num_items, cfg.evaluate.ks)
            bar.update(1, last=f"{name} {split}")


def _slices_and_variant(cfg, h, data, cats, lineage, storage, rankings, results, main_name) -> None:
    """Slices of the test split for every model that has per-user ranks; the new-item variant."""
    ev = cfg.evaluate
    r_main, top_main, targets, users = rankings[(main_name, "test")]
    masks = slice_masks(h, users, targets, ev.rare_item_max, ev.short_history_max)
    results["slices"] = {name: sliced_metrics(rankings[(name, "test")][0], masks, ev.ks)
                         for name, split in rankings if split == "test"}
    if ev.new_item_variant and data.text is not None:
        # The variant's new items must be unseen by every stage: the bundle's LLM was fine-tuned on
        # (item, next item) pairs of all training histories, new items included, so the variant
        # uses the embeddings of the encoder before that fine-tuning; its retriever is trained
        # without the new items' interactions, and it has no co-visitation channel or ranker.
        base = lineage.get("text_embeddings_base")
        if base and base != lineage.get("text_embeddings"):
            text = load_text_embeddings(storage, base, h.num_items)
        elif base:
            text = data.text  # no fine-tuning happened: the bundle's embeddings are the base ones
        else:
            text = None
            results["new_item_variant"] = {"skipped": "the bundle records no pre-fine-tuning text embeddings "
                                                      "(text_embeddings_base), so the variant would leak"}
        if text is not None:
            results["new_item_variant"] = new_item_variant(cfg, h, text, cats)
            results["new_item_variant"]["text_embeddings"] = base


def new_item_variant(cfg: Any, h, text: torch.Tensor, cats) -> Dict[str, Any]:
    hn, new = new_item_histories(h, cfg.evaluate.new_item_frac)
    rcfg, tcfg = RetrieverConfig(**_plain(cfg.retriever)), _local_train_config(cfg)
    out: Dict[str, Any] = {"new_items": int(new.sum())}
    for name, vcfg in (("hybrid", rcfg), ("id-only", replace(rcfg, use_text=False))):
        model = fit_retriever_local(hn, text, vcfg, tcfg, known_items=~new)
        r, top, targets, _ = final_ranking(model, None, text, hn, "test", cats)
        is_new = new[targets]
        out[name] = {"all": summarize(r, top, h.num_items, cfg.evaluate.ks),
                     "new_item_targets": summarize(r[is_new], top[is_new], h.num_items, cfg.evaluate.ks)}
    return out


def _local_train_config(cfg: Any) -> RetrieverTrainConfig:
    """In-process baselines see the same effective batch (batch x workers), hence the same
    number of optimizer steps, as the distributed run they are compared with."""
    tcfg = RetrieverTrainConfig(**_plain(cfg.train.retriever))
    return replace(tcfg, batch_size=tcfg.batch_size * cfg.train.num_workers)


def _plain(node) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else dict(node)


def write_report(storage: Storage, run_id: str, ev: Dict[str, Any]) -> str:
    res, data = ev["results"], ev["data"]
    prefix = f"reports/{run_id}"
    ids = np.asarray(data.items["item_id"].to_pylist(), dtype=object)
    user_ids = storage.read_parquet(f"datasets/{res['dataset']}/{res['dataset_version']}/vocab/users.parquet")
    uid = np.asarray(user_ids.sort_by("user_idx")["user_id"].to_pylist(), dtype=object)
    preds = pa.table({"user_id": pa.array(uid[ev["users"]].tolist(), pa.string()),
                      "items": pa.array([ids[row].tolist() for row in ev["top"]], pa.list_(pa.string()))})
    storage.write_parquet(f"{prefix}/predictions.parquet", preds)
    storage.write_json(f"{prefix}/metrics.json", res)
    with tempfile.TemporaryDirectory() as tmp:
        for name in plot_report(Path(tmp), ev):
            storage.write_bytes(f"{prefix}/{name}", (Path(tmp) / name).read_bytes())
    storage.write_bytes(f"{prefix}/report.md", report_markdown(res).encode())
    return prefix


def plot_report(folder: Path, ev: Dict[str, Any]) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, data = ev["results"], ev["data"]
    names = list(res["slices"])
    slices = [s for s in next(iter(res["slices"].values())) if not s.startswith("pop_decile")]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        vals = [res["slices"][name][s].get("recall@10", 0.0) for s in slices]
        ax.bar(np.arange(len(slices)) + k * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(slices)) + 0.4 - width / 2, slices)
    ax.set_ylabel("Recall@10 (test)")
    ax.set_title("Recall@10 by slice")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "metric_by_slice.png", dpi=110)
    plt.close(fig)

    counts = item_counts(data.histories.items, data.histories.num_items)
    rec_dec = popularity_deciles(counts, ev["top"][:, :10].ravel())
    tgt_dec = popularity_deciles(counts, ev["targets"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(np.arange(10) - 0.2, np.bincount(rec_dec, minlength=10) / max(len(rec_dec), 1), 0.4,
           label=f"recommended top-10 ({res['main_model']})")
    ax.bar(np.arange(10) + 0.2, np.bincount(tgt_dec, minlength=10) / max(len(tgt_dec), 1), 0.4, label="test targets")
    ax.set_xlabel("item popularity decile (0 = least popular)")
    ax.set_ylabel("share")
    ax.set_title("Popularity bias")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "popularity_bias.png", dpi=110)
    plt.close(fig)
    return ["metric_by_slice.png", "popularity_bias.png"]


def report_markdown(res: Dict[str, Any]) -> str:
    lines = [f"# Evaluation of {res['run_id']}", "",
             f"Dataset {res['dataset']} version {res['dataset_version']}; full ranking over the catalog, "
             "the user's history excluded; main model: " + res["main_model"] + ".", "",
             "| model | split | Recall@10 | NDCG@10 | MRR@10 | Recall@20 | NDCG@20 | coverage@10 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, splits in res["models"].items():
        for split, m in splits.items():
            lines.append(f"| {name} | {split} | {m.get('recall@10', 0):.4f} | {m.get('ndcg@10', 0):.4f} | "
                         f"{m.get('mrr@10', 0):.4f} | {m.get('recall@20', 0):.4f} | {m.get('ndcg@20', 0):.4f} | "
                         f"{m.get('coverage@10', 0):.3f} |")
    fusion = res.get("fusion")
    if fusion:
        lines += ["", f"Channel fusion (weights fitted on valid): {describe_fusion(fusion)}; valid NDCG@10 "
                      f"{fusion['valid_ndcg@10']:.4f} fused vs {fusion['valid_ndcg@10_retriever']:.4f} retriever alone."]
    if any("valid_ranker_holdout" in m for m in res["models"].values()):
        lines += ["", "`valid_ranker_holdout`: the valid lists the ranker did not train on (it trains on the "
                      "others): the main model's valid figure without the ranker's in-sample advantage."]
    lines += ["", "## Test slices (Recall@10 / NDCG@10, n)", "", "| slice | " + " | ".join(res["slices"]) + " |",
              "| --- |" + " ---: |" * len(res["slices"])]
    first = next(iter(res["slices"].values()))
    for s in first:
        row = [f"{res['slices'][n][s].get('recall@10', 0):.3f} / {res['slices'][n][s].get('ndcg@10', 0):.3f} "
               f"({res['slices'][n][s]['n']})" for n in res["slices"]]
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    if "new_item_variant" in res and "skipped" in res["new_item_variant"]:
        lines += ["", f"New-item variant skipped: {res['new_item_variant']['skipped']}."]
    elif "new_item_variant" in res:
        nv = res["new_item_variant"]
        lines += ["", f"## New-item variant (text embeddings of the encoder before fine-tuning: {nv['text_embeddings']})",
                  "", f"{nv['new_items']} items lose all training interactions.", "",
                  "| model | Recall@10 all | Recall@10 new-item targets (n) |", "| --- | ---: | ---: |"]
        for name in ("hybrid", "id-only"):
            lines.append(f"| {name} | {nv[name]['all']['recall@10']:.4f} | "
                         f"{nv[name]['new_item_targets'].get('recall@10', 0):.4f} ({nv[name]['new_item_targets']['n']}) |")
    lines += ["", "Plots: metric_by_slice.png, popularity_bias.png. Predictions: predictions.parquet.", ""]
    return "\n".join(lines)


HOLDOUT = "valid_ranker_holdout"


def selection_split(model: Dict[str, Any]) -> str:
    """Where a model is judged: the valid lists its ranker did not train on when it has a ranker
    (the ranker trains on the others, so the full valid figure is in-sample for it), else valid."""
    return HOLDOUT if HOLDOUT in model else "valid"


def gate_and_promote(cfg: Any, storage: Storage, res: Dict[str, Any], train_out: Dict[str, Any],
                     expected: Any = None) -> Dict[str, Any]:
    """Promote only a run that clears the floor, beats the non-neural baselines on the same
    split, and does not regress beyond the tolerance against a comparable promoted model.

    Every comparison is made on the selection split (``selection_split``: valid, or its lists
    the ranker did not train on); test is reported, never decided on, so the promoted model's
    test figure stays an unbiased estimate. The promoted model's stored selection figure is
    compared only when it was measured on the same dataset version and the same kind of split
    (otherwise it is not comparable, and is ignored with a note).
    ``expected``: (pointer, token) the run started from (retraining: its metrics are the parent's
    on the new split); the promotion is then a compare-and-swap against that pointer, so a run
    never replaces a pointer that moved while it trained. Default: the pointer read here."""
    main = res["models"][res["main_model"]]
    split = selection_split(main)
    test = main["test"]["ndcg@10"]
    score = main.get(split, {}).get("ndcg@10")
    current, token = expected if expected is not None else registry.read_pointer_versioned(storage, BUNDLE)
    same_split = (current or {}).get("lineage", {}).get("dataset_version") == res.get("dataset_version")
    cur_metrics = (current or {}).get("metrics", {})
    cur = cur_metrics.get("selection_ndcg@10") if same_split and cur_metrics.get("selection_split") == split else None
    bars = {b: res["models"][b][split]["ndcg@10"] for b in ("MostPopular", "ItemKNN")
            if split in res["models"].get(b, {})}
    decision = {"decided_on": split, "selection_ndcg@10": score, "valid_ndcg@10": main.get("valid", {}).get("ndcg@10"),
                "test_ndcg@10": test, "floor": cfg.evaluate.ndcg_floor, "current_selection_ndcg@10": cur,
                "current_test_ndcg@10": cur_metrics.get("test_ndcg@10") if same_split else None,
                "tolerance": cfg.evaluate.tolerance, "baselines_selection_ndcg@10": bars}
    if current is not None and not same_split:
        decision["note"] = "the promoted model was measured on another dataset version: not compared"
    elif current is not None and cur is None:
        decision["note"] = f"the promoted model has no {split} NDCG@10 on this split: not compared"
    if score is None:
        decision.update(promoted=False, reason=f"no {split} NDCG@10 to decide on")
    elif score < cfg.evaluate.ndcg_floor:
        decision.update(promoted=False, reason=f"{split} NDCG@10 {score:.4f} below the floor {cfg.evaluate.ndcg_floor}")
    elif any(score < v for v in bars.values()):
        decision.update(promoted=False, reason=f"{split} NDCG@10 {score:.4f} below " +
                        ", ".join(f"{b} {v:.4f}" for b, v in bars.items() if score < v))
    elif cur is not None and score < cur - cfg.evaluate.tolerance:
        decision.update(promoted=False, reason=f"{split} NDCG@10 {score:.4f} worse than the promoted {cur:.4f} "
                                               f"by more than {cfg.evaluate.tolerance}")
    else:
        metrics = {"test_ndcg@10": test, "test_recall@10": main["test"]["recall@10"],
                   "valid_ndcg@10": decision["valid_ndcg@10"], "selection_split": split, "selection_ndcg@10": score}
        try:  # compare-and-swap against the pointer the gate compared with
            registry.promote(storage, BUNDLE, train_out["run_id"], train_out["prefix"], metrics, train_out["manifest"],
                       {k: v for k, v in train_out["lineage"].items() if k != "config"}, expected=token)
            decision.update(promoted=True, reason=f"cleared the gate (decided on {split})")
        except registry.PromotionConflict as exc:
            decision.update(promoted=False, reason=f"another run promoted meanwhile ({exc}); gate not re-run")
    return decision


def run(cfg: Any, storage: Storage, train_out: Dict[str, Any], expected: Any = None) -> Dict[str, Any]:
    ev = evaluate_bundle(cfg, storage, Path(train_out["local_dir"]), train_out["run_id"])
    prefix = write_report(storage, train_out["run_id"], ev)
    decision = gate_and_promote(cfg, storage, ev["results"], train_out, expected)
    ev["results"]["promotion"] = decision
    storage.write_json(f"{prefix}/metrics.json", ev["results"])
    for model, splits in ev["results"]["models"].items():  # Prometheus gauges, while Ray is up
        for split, m in splits.items():
            telemetry.record_many("llmrec_eval_metric", m, "metric", run=train_out["run_id"], model=model, split=split)
    return {"results": ev["results"], "report_prefix": prefix, "promotion": decision}


def main(cfg: Any) -> Dict[str, Any]:
    storage = Storage.from_config(cfg.storage)
    run_id = cfg.evaluate.run_id
    if not run_id:
        pointer = registry.read_pointer(storage, BUNDLE)
        if pointer is None:
            raise FileNotFoundError("evaluate.run_id not given and no promoted model in the registry")
        run_id = pointer["run_id"]
    prefix = f"checkpoints/{BUNDLE}/{run_id}"
    local = ck.fetch(storage, prefix, tempfile.mkdtemp(prefix="eval-"))
    train_out = {"run_id": run_id, "prefix": prefix, "local_dir": str(local),
                 "manifest": json.loads((local / "manifest.json").read_text()),
                 "lineage": json.loads((local / "lineage.json").read_text())}
    out = run(cfg, storage, train_out)
    print(report_markdown(out["results"]))
    print(f"promotion: {out['promotion']}")
    return out


if __name__ == "__main__":
    run_cli(main)
