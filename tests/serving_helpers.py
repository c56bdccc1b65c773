"""A small real bundle for serving tests, trained in-process in seconds (no Ray Train).

The serving code must not care how a bundle was trained: this writes the same layout as
``jobs.train.train`` (retriever/, ranker/, text/, items/, lineage.json, manifest.json), publishes it
and promotes it, on a synthetic shop whose item text carries the category signal.
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
from components.config import load_config
from components.datasets import load_training_data, resolve_dataset
from components.evaluation import fit_retriever_local
from components.ranker import RankerConfig, RankerMLP, listwise_loss
from components.retriever import RetrieverConfig
from components.retriever_training import RetrieverTrainConfig
from components.storage import Storage
from jobs import preprocess
from jobs.embed_items import ItemEmbedder
from jobs.train import BUNDLE, ranker_lists

SMALL = ["data.synthetic.num_events=6000", "data.synthetic.num_items=400", "data.synthetic.num_users=300",
         "data.synthetic.num_shards=2"]


def build_bundle(root: str | Path, run_id: str = "serve-test-1", epochs: int = 6, ranker: bool = True,
                 overrides=(), promote: bool = True, seed: int = 0) -> Dict[str, Any]:
    """Preprocess the synthetic shop under ``root``, train a small hybrid retriever (+ ranker),
    publish ``checkpoints/recommender/<run_id>/`` and (by default) promote it."""
    cfg = load_config([f"storage.root={root}", *SMALL, *overrides])
    storage = Storage.from_config(cfg.storage)
    if not storage.list_files("datasets"):
        preprocess.run(cfg, engine="local")
    ds = resolve_dataset(storage, cfg)
    text_prefix = f"indexes/{run_id}-base"
    if not storage.is_file(f"{text_prefix}/text_embeddings.parquet"):
        items = storage.read_parquet(f"{ds.prefix}/items").select(["item_idx", "item_id", "title", "text", "categories"])
        storage.write_parquet(f"{text_prefix}/text_embeddings.parquet", ItemEmbedder({})(items))
    data = load_training_data(storage, ds.prefix, text_prefix)
    rcfg = RetrieverConfig(dim=32, max_len=50, layers=1)
    model = fit_retriever_local(data.histories, data.text, rcfg,
                                RetrieverTrainConfig(epochs=epochs, eval_every=epochs, seed=seed))
    rcfg = model.cfg
    bundle = Path(tempfile.mkdtemp(prefix="bundle-"))
    ck.save_local(bundle / "retriever", model.state_dict(), {"retriever": asdict(rcfg), "kind": "retriever"})
    if ranker:
        kcfg = RankerConfig(dim=rcfg.dim, candidates=50)
        lists = ranker_lists(model, data.text_emb(), data, "valid", kcfg.candidates)
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
    lineage = {"run_id": run_id, "dataset": ds.name, "dataset_version": ds.version, "text_embeddings": text_prefix,
               "parent_run": None, "config": {"text": {}}}
    (bundle / "lineage.json").write_text(json.dumps(lineage))
    manifest = ck.write_manifest(bundle)
    prefix = ck.publish(storage, bundle, BUNDLE, run_id)
    shutil.rmtree(bundle, ignore_errors=True)
    pointer = ck.promote(storage, BUNDLE, run_id, prefix, {"ndcg@10": 0.0}, manifest, lineage) if promote else None
    return {"storage": storage, "dataset": ds, "run_id": run_id, "prefix": prefix, "manifest": manifest,
            "pointer": pointer, "items": storage.read_parquet(f"{ds.prefix}/items"), "cfg": cfg}

