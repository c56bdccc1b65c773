"""Evaluate a bundle on its dataset version (no Ray): full ranking over the catalog for valid and
test, the model without its ranker and without its channels, MostPopular and ItemKNN, optionally
ID-only / text-only retrievers trained in-process, slices, the new-item variant, and the figures
on the valid lists the ranker did not train on.

``evaluate_bundle`` returns ``{"results": ..., "top", "users", "targets", "data"}``; ``results``
is what reports/<run_id>/metrics.json holds and what the promotion gate reads.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import pyarrow as pa
import torch

from components import bundle, layout
from components.config import retriever_workers
from components.data.datasets import load_text_embeddings, load_training_data
from components.data.sequences import sample_targets
from components.evaluation.metrics import sliced_metrics
from components.evaluation.ranking import (baseline_rankings, final_ranking, fit_channels, new_item_histories,
                                           slice_masks, summarize, timed)
from components.models.ranker import holdout_rows
from components.models.retriever import RetrieverConfig, SequenceRetriever
from components.storage import Storage
from components.training.retriever import RetrieverTrainConfig, fit_retriever_local
from components.training.warm_start import warm_start

Tick = Callable[..., None]


def _no_tick(*args, **kwargs) -> None:
    pass


def evaluate_bundle(cfg: Any, storage: Storage, folder: Path, run_id: str, tick: Tick = _no_tick) -> Dict[str, Any]:
    """Every figure of the bundle in ``folder`` (see the module doc). ``cfg``: the app config
    (evaluate settings; retriever and train settings for the in-process baselines). ``tick``: a
    progress bar's update (one per model and split)."""
    lineage = bundle.read_lineage(folder)
    data = load_training_data(storage, layout.dataset(lineage["dataset"], lineage["dataset_version"]),
                              lineage.get("text_embeddings"))
    every = len(np.union1d(data.histories.valid["user_idx"], data.histories.test["user_idx"]))
    sampled, valid_rows = sample_targets(data.histories, cfg.evaluate.max_users)
    data = replace(data, histories=sampled)
    retriever = bundle.load_retriever(folder)
    channels = bundle.load_channels(folder, data.text)
    ranker = bundle.load_ranker(folder)
    names = model_names(retriever.cfg, channels is not None, ranker is not None)
    results: Dict[str, Any] = {"run_id": run_id, "dataset": lineage["dataset"],
                               "dataset_version": lineage["dataset_version"], "models": {}, "timings": {},
                               "fusion": lineage.get("fusion"),
                               "users": {"evaluated": int(len(np.union1d(sampled.valid["user_idx"], sampled.test["user_idx"]))),
                                         "with_targets": int(every)}}
    trained = [n for n in ("id-only", "text-only") if n != names["kind"] and (n == "id-only" or data.text is not None)]
    trained = trained if cfg.evaluate.baselines else []
    tick(0, total=2 * (2 + (ranker is not None) + (channels is not None)) + 3 * len(trained))
    rankings: Dict[tuple, tuple] = {}
    for split in ("valid", "test"):
        if ranker is not None:
            rankings[(names["main"], split)] = final_ranking(retriever, ranker, data.text, data.histories, split,
                                                             data.categories, channels=channels)
            tick(1, last=f"{names['main']} {split}")
        if channels is not None:
            rankings[(names["fused"], split)] = final_ranking(retriever, None, data.text, data.histories, split,
                                                              data.categories, channels=channels)
            tick(1, last=f"{names['fused']} {split}")
        rankings[(names["kind"], split)] = final_ranking(retriever, None, data.text, data.histories, split,
                                                         data.categories)
        tick(1, last=f"{names['kind']} {split}")
    _summaries(cfg, data, rankings, results, tick)
    _trained_baselines(cfg, trained, data, rankings, results, tick)
    if ranker is not None:  # the ranker trained on most valid lists: its figure on the held-out rest
        # (positions of the held-out rows among the evaluated ones: a user sample keeps some rows)
        held = np.flatnonzero(np.isin(valid_rows, holdout_rows(valid_rows, ranker.cfg.holdout)))
        for name in {names["main"], names["fused"], names["kind"], "MostPopular", "ItemKNN"}:
            r, top = rankings[(name, "valid")][:2]
            results["models"][name]["valid_ranker_holdout"] = summarize(r[held], top[held], data.histories.num_items,
                                                                        cfg.evaluate.ks)
    _slices_and_variant(cfg, storage, data, lineage, rankings, results, names["main"])
    _, top_main, targets, users = rankings[(names["main"], "test")]
    results["main_model"] = names["main"]
    results["predictions"] = {"users": int(len(users)), "topk": int(top_main.shape[1])}
    test_ranks = {name: rankings[(name, split)][0] for name, split in rankings if split == "test"}
    return {"results": results, "top": top_main, "users": users, "targets": targets, "data": data,
            "test_ranks": test_ranks}


def model_names(rcfg: RetrieverConfig, channels: bool, ranker: bool) -> Dict[str, str]:
    """kind (the retriever alone), fused (+channels), main (+ranker): the names results use."""
    kind = "hybrid" if rcfg.use_id and rcfg.use_text else "id-only" if rcfg.use_id else "text-only"
    fused = kind + "+channels" if channels else kind
    return {"kind": kind, "fused": fused, "main": fused + ("+ranker" if ranker else "")}


def _summaries(cfg: Any, data, rankings: Dict[tuple, tuple], results: Dict[str, Any], tick: Tick) -> None:
    h = data.histories
    for name, split in list(rankings):
        r, top, _, _ = rankings[(name, split)]
        results["models"].setdefault(name, {})[split] = summarize(r, top, h.num_items, cfg.evaluate.ks)
    for split in ("valid", "test"):
        for name, (r, top) in baseline_rankings(h, split).items():
            rankings[(name, split)] = (r, top)
            results["models"].setdefault(name, {})[split] = summarize(r, top, h.num_items, cfg.evaluate.ks)
        tick(1, last=f"baselines {split}")


def _trained_baselines(cfg: Any, names: List[str], data, rankings, results, tick: Tick) -> None:
    """ID-only and text-only retrievers trained in-process (``evaluate.baselines=true``)."""
    rcfg, tcfg = RetrieverConfig(**_plain(cfg.retriever)), local_train_config(cfg)
    variants = {"id-only": replace(rcfg, use_text=False), "text-only": replace(rcfg, use_id=False)}
    h = data.histories
    for name in names:
        model, secs = timed(fit_retriever_local, h, data.text, variants[name], tcfg)
        tick(1, last=f"fit {name}")
        results["timings"][f"fit_{name}_s"] = secs
        for split in ("valid", "test"):
            r, top, t, u = final_ranking(model, None, data.text, h, split, data.categories)
            rankings[(name, split)] = (r, top, t, u)
            results["models"].setdefault(name, {})[split] = summarize(r, top, h.num_items, cfg.evaluate.ks)
            tick(1, last=f"{name} {split}")


def _slices_and_variant(cfg: Any, storage: Storage, data, lineage, rankings, results, main_name: str) -> None:
    """Slices of the test split for every model that has per-user ranks; the new-item variant."""
    ev, h = cfg.evaluate, data.histories
    _, _, targets, users = rankings[(main_name, "test")]
    masks = slice_masks(h, users, targets, ev.rare_item_max, ev.short_history_max)
    results["slices"] = {name: sliced_metrics(rankings[(name, "test")][0], masks, ev.ks)
                         for name, split in rankings if split == "test"}
    if not (ev.new_item_variant and data.text is not None):
        return
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
        results["new_item_variant"] = {"skipped": "the bundle records no pre-fine-tuning text embeddings "
                                                  "(text_embeddings_base), so the variant would leak"}
        return
    results["new_item_variant"] = new_item_variant(cfg, h, text, data.categories)
    results["new_item_variant"]["text_embeddings"] = base


def new_item_variant(cfg: Any, h, text: torch.Tensor, cats) -> Dict[str, Any]:
    hn, new = new_item_histories(h, cfg.evaluate.new_item_frac)
    rcfg, tcfg = RetrieverConfig(**_plain(cfg.retriever)), local_train_config(cfg)
    out: Dict[str, Any] = {"new_items": int(new.sum())}
    for name, vcfg in (("hybrid", rcfg), ("id-only", replace(rcfg, use_text=False))):
        model = fit_retriever_local(hn, text, vcfg, tcfg, known_items=~new)
        orders = {name: final_ranking(model, None, text, hn, "test", cats)}
        if name == "hybrid":  # the fused channels, new items scored by their own weights fitted on valid
            channels, fit = fit_channels(model, text, hn, new_frac=cfg.evaluate.new_item_frac)
            orders["hybrid+channels"] = final_ranking(model, None, text, hn, "test", cats, channels=channels)
            out["hybrid+channels_fusion"] = fit
        for key, (r, top, targets, _) in orders.items():
            is_new = new[targets]
            out[key] = {"all": summarize(r, top, h.num_items, cfg.evaluate.ks),
                        "new_item_targets": summarize(r[is_new], top[is_new], h.num_items, cfg.evaluate.ks)}
    return out


def local_train_config(cfg: Any) -> RetrieverTrainConfig:
    """In-process baselines see the same effective batch (batch x workers), hence the same
    number of optimizer steps, as the distributed run they are compared with."""
    tcfg = RetrieverTrainConfig(**_plain(cfg.train.retriever))
    return replace(tcfg, batch_size=tcfg.batch_size * retriever_workers(cfg))


def _plain(node) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else dict(node)


def predictions_table(storage: Storage, ev: Dict[str, Any]) -> pa.Table:
    """``user_id``, ``items`` (top-100 original item ids in rank order) for every test user."""
    res, data = ev["results"], ev["data"]
    ids = np.asarray(data.items["item_id"].to_pylist(), dtype=object)
    users = storage.read_parquet(layout.join(layout.dataset(res["dataset"], res["dataset_version"]),
                                             layout.VOCAB_USERS))
    uid = np.asarray(users.sort_by("user_idx")["user_id"].to_pylist(), dtype=object)
    return pa.table({"user_id": pa.array(uid[ev["users"]].tolist(), pa.string()),
                     "items": pa.array([ids[row].tolist() for row in ev["top"]], pa.list_(pa.string()))})


def test_ranks_table(storage: Storage, ev: Dict[str, Any]) -> pa.Table:
    """``user_id``, then per model the 0-based rank of the user's test target (the number of
    items when it is a repeat of a history item), rows as in the predictions: what paired
    comparisons between models (e.g. the ranker's gain on test) are computed from."""
    uid = predictions_table(storage, ev)["user_id"]
    return pa.table({"user_id": uid, **{name: pa.array(np.asarray(r, dtype=np.int32))
                                         for name, r in ev["test_ranks"].items()}})


def evaluate_parent_on(cfg: Any, storage: Storage, parent: Path, child: Path, run_id: str) -> Dict[str, Any]:
    """The parent bundle (``parent``: its retriever, ranker and catalog) evaluated on the child's
    dataset version and text embeddings, so a gate compares like with like: its ID rows mapped
    onto the child's vocabulary by item id (items it never saw get a zero ID row, as when it
    serves them), its ranker as is. Returns the parent's main model's ``{split: metrics}``."""
    _, child_cfg = bundle.load_weights(child, layout.RETRIEVER)
    model = SequenceRetriever(RetrieverConfig(**child_cfg))  # the child's shape: its vocabulary
    state, _ = bundle.load_weights(parent, layout.RETRIEVER, verify=False)
    with torch.no_grad():
        warm_start(model, state, bundle.load_catalog(parent)["item_id"].to_pylist(),
                   bundle.load_catalog(child)["item_id"].to_pylist(), zero_unmapped=True)
    folder = Path(tempfile.mkdtemp(prefix="parent-eval-"))
    try:
        bundle.save_weights(folder, layout.RETRIEVER, model.state_dict(), model.cfg)
        if bundle.has(parent, layout.RANKER):
            shutil.copytree(Path(parent) / layout.RANKER, folder / layout.RANKER)
        shutil.copy(Path(child) / layout.LINEAGE, folder / layout.LINEAGE)  # the new dataset + text embeddings
        res = evaluate_bundle(cfg, storage, folder, run_id)["results"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return res["models"][res["main_model"]]


def feedback_holdout(storage: Storage, report_prefix: str, dataset_prefix: str, new: pa.Table, k: int = 10) -> Dict:
    """Recall@k of a model's predictions (its report) on the test targets that came from the new
    feedback ``new`` (a retraining pass's freshest signal)."""
    test = storage.read_parquet(layout.join(dataset_prefix, "test"), columns=["user_id", "item_id"])
    pairs = set(zip(new["user_id"].cast(pa.string()).to_pylist(), new["item_id"].cast(pa.string()).to_pylist()))
    targets = {u: i for u, i in zip(test["user_id"].cast(pa.string()).to_pylist(),
                                    test["item_id"].cast(pa.string()).to_pylist()) if (u, i) in pairs}
    if not targets:
        return {"n": 0, f"recall@{k}": None}
    preds = storage.read_parquet(layout.join(report_prefix, layout.PREDICTIONS))
    top = dict(zip(preds["user_id"].cast(pa.string()).to_pylist(), preds["items"].to_pylist()))
    hits = [targets[u] in (top.get(u) or [])[:k] for u in targets]
    return {"n": len(hits), f"recall@{k}": round(float(np.mean(hits)), 4)}
