"""A quick in-process trainer: a real bundle in seconds to minutes, without Ray Train.

    python -m jobs.quick_train storage.root=<uri> [data.source=... train.retriever.epochs=6]

For demos, serving tests and serving benchmarks, where what matters is a servable model, not the
best one: it preprocesses (single process), embeds items with the LLM, fits the retriever and the
ranker with plain AdamW, and writes the same bundle layout as ``jobs.train`` (retriever/, ranker/,
text/, items/, lineage.json, manifest.json), publishes and promotes it. The production path is
``jobs.pipeline`` (Ray Data, Ray Train + DeepSpeed, evaluation gate).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from components import checkpoints as ck
from components import registry
from components.bundle import save_interactions
from components.config import load_config, to_dict
from components.data.datasets import load_training_data, resolve_dataset
from components.evaluation.ranking import fit_channels, fit_retriever_local
from components.models.ranker import RankerConfig, RankerMLP, listwise_loss
from components.models.retriever import RetrieverConfig
from components.training.retriever import RetrieverTrainConfig
from components.storage import Storage
from jobs import preprocess
from jobs.embed_items import ItemEmbedder
from jobs.runtime import run_cli
from jobs.train import BUNDLE, ranker_lists

# A small synthetic shop (item text carries the category signal) and a small model: seconds.
SMALL = ["data.synthetic.num_events=6000", "data.synthetic.num_items=400", "data.synthetic.num_users=300",
         "data.synthetic.num_shards=2", "retriever.dim=32", "retriever.max_len=50", "retriever.layers=1"]


def build_bundle(root: str | Path, run_id: str = "serve-test-1", epochs: int = 6, ranker: bool = True,
                 overrides=(), promote: bool = True, seed: int = 0, small: bool = True) -> Dict[str, Any]:
    """Preprocess ``cfg.data`` under ``root`` (once), train a hybrid retriever (+ ranker) in-process,
    publish ``checkpoints/recommender/<run_id>/`` and (by default) promote it."""
    cfg = load_config([f"storage.root={root}", *(SMALL if small else []), *overrides])
    return build(cfg, run_id, epochs, ranker, promote, seed)


def build(cfg: Any, run_id: str, epochs: int, ranker: bool = True, promote: bool = True,
          seed: int = 0) -> Dict[str, Any]:
    storage = Storage.from_config(cfg.storage)
    name = cfg.data.name or cfg.data.source
    if not storage.is_file(f"datasets/{name}/latest.json"):
        preprocess.run(cfg, engine="local")
    ds = resolve_dataset(storage, cfg)
    text_prefix = f"indexes/{run_id}-base"
    if not storage.is_file(f"{text_prefix}/text_embeddings.parquet"):
        items = storage.read_parquet(f"{ds.prefix}/items").select(["item_idx", "item_id", "title", "text", "categories"])
        storage.write_parquet(f"{text_prefix}/text_embeddings.parquet", ItemEmbedder(to_dict(cfg.text))(items))
    data = load_training_data(storage, ds.prefix, text_prefix)
    rcfg = RetrieverConfig(**to_dict(cfg.retriever))
    model = fit_retriever_local(data.histories, data.text, rcfg,
                                # A few epochs: constant lr (a one-cycle decay would spend most
                                # of so short a run near zero).
                                RetrieverTrainConfig(epochs=epochs, eval_every=epochs, seed=seed,
                                                     schedule="constant"))
    rcfg = model.cfg
    bundle = Path(tempfile.mkdtemp(prefix="bundle-"))
    ck.save_local(bundle / "retriever", model.state_dict(), {"retriever": asdict(rcfg), "kind": "retriever"})
    channels, fusion = fit_channels(model, data.text, data.histories)
    channels.save(bundle / "channels")
    if ranker:
        kcfg = RankerConfig(dim=rcfg.dim, candidates=50)
        lists = ranker_lists(model, channels, data, "valid", kcfg.candidates)
        rows = np.flatnonzero(lists["positive"] >= 0)
        torch.manual_seed(seed)
        mlp = RankerMLP(kcfg)
        opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3)
        for _ in range(5):
            for s in range(0, len(rows), 64):
                idx = rows[s:s + 64]
                loss = listwise_loss(mlp(lists["u"][idx], lists["i"][idx], lists["ctx"][idx]),
                                     torch.as_tensor(lists["positive"][idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
        ck.save_local(bundle / "ranker", mlp.state_dict(), {"ranker": asdict(kcfg), "kind": "ranker"})
    storage.download_dir(text_prefix, bundle / "text")
    storage.download_dir(f"{ds.prefix}/items", bundle / "items")
    save_interactions(bundle, data.histories.items, data.histories.ts)
    lineage = {"run_id": run_id, "dataset": ds.name, "dataset_version": ds.version, "text_embeddings": text_prefix,
               "text_embeddings_base": text_prefix,  # no LLM fine-tuning here
               "parent_run": None, "config": to_dict(cfg), "fusion": fusion}
    (bundle / "lineage.json").write_text(json.dumps(lineage))
    manifest = ck.write_manifest(bundle)
    prefix = ck.publish(storage, bundle, BUNDLE, run_id)
    shutil.rmtree(bundle, ignore_errors=True)
    pointer = registry.promote(storage, BUNDLE, run_id, prefix, {}, manifest, lineage) if promote else None
    return {"storage": storage, "dataset": ds, "run_id": run_id, "prefix": prefix, "manifest": manifest,
            "pointer": pointer, "items": storage.read_parquet(f"{ds.prefix}/items"), "cfg": cfg}


def main(cfg: Any) -> Dict[str, Any]:
    run_id = cfg.train.run_id or ck.new_run_id("quick")
    out = build(cfg, run_id, cfg.train.retriever.epochs, "ranker" in cfg.train.stages)
    print(f"trained and promoted {run_id}: {out['storage'].uri(out['prefix'])}")
    return out


if __name__ == "__main__":
    run_cli(main)

