"""A quick in-process trainer: a real bundle in seconds to minutes, without Ray.

    python -m jobs.quick_train storage.root=<uri> [data.source=... train.retriever.epochs=6]

For demos, serving tests and serving benchmarks, where what matters is a servable model, not the
best one: it preprocesses (jobs.preprocess with ``preprocess.engine=local``), embeds items with the
LLM, fits the retriever and the ranker with the same loops as jobs.train (components.training,
over an AdamW stepper instead of DeepSpeed), and writes the same bundle, publishes and promotes
it. The production path is ``jobs.pipeline`` (Ray Data, Ray Train + DeepSpeed, evaluation gate).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict

from omegaconf import OmegaConf

from components import bundle, layout, registry
from components import checkpoints as ck
from components.config import load_config, to_dict
from components.data.datasets import load_training_data, resolve_dataset
from components.evaluation.ranking import fit_channels, scored_lists
from components.models.ranker import RankerConfig
from components.models.retriever import RetrieverConfig
from components.models.text_encoder import TextEncoder, TextEncoderConfig, embed_catalog
from components.storage import Storage
from components.training.ranker import fit_ranker_local
from components.training.retriever import RetrieverTrainConfig, fit_retriever_local
from jobs import preprocess
from jobs.runtime import run_cli

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
    if not storage.is_file(layout.dataset_latest(cfg.data.name or cfg.data.source)):
        preprocess.main(OmegaConf.merge(cfg, {"preprocess": {"engine": "local"}}))
    ds = resolve_dataset(storage, cfg)
    text_prefix = layout.index(f"{run_id}-base")
    if not storage.is_file(layout.join(text_prefix, layout.TEXT_EMBEDDINGS)):
        items = storage.read_parquet(layout.join(ds.prefix, layout.ITEMS))
        encoder = TextEncoder(TextEncoderConfig(**to_dict(cfg.text)))  # the base LLM: no fine-tuning here
        storage.write_parquet(layout.join(text_prefix, layout.TEXT_EMBEDDINGS), embed_catalog(encoder, items))
    data = load_training_data(storage, ds.prefix, text_prefix)
    # A few epochs: constant lr (a one-cycle decay would spend most of so short a run near zero).
    model = fit_retriever_local(data.histories, data.text, RetrieverConfig(**to_dict(cfg.retriever)),
                                RetrieverTrainConfig(epochs=epochs, eval_every=epochs, seed=seed, schedule="constant"))
    folder = Path(tempfile.mkdtemp(prefix="bundle-"))
    bundle.save_weights(folder, layout.RETRIEVER, model.state_dict(), model.cfg)
    channels, fusion = fit_channels(model, data.text, data.histories, new_frac=cfg.evaluate.new_item_frac)
    channels.save(folder / layout.CHANNELS)
    if ranker:
        kcfg = RankerConfig(dim=model.cfg.dim, candidates=50, epochs=5)
        lists = scored_lists(model, channels, data.text, data.histories, "valid", data.categories, kcfg.candidates)
        mlp = fit_ranker_local(lists, kcfg, seed)
        bundle.save_weights(folder, layout.RANKER, mlp.state_dict(), kcfg)
    bundle.add_data_parts(folder, storage, ds.prefix, text_prefix, data.histories)
    lineage = {"run_id": run_id, "dataset": ds.name, "dataset_version": ds.version, "text_embeddings": text_prefix,
               "text_embeddings_base": text_prefix,  # no LLM fine-tuning here
               "parent_run": None, "config": to_dict(cfg), "fusion": fusion}
    bundle.write_lineage(folder, lineage)
    manifest = ck.write_manifest(folder)
    prefix = ck.publish(storage, folder, layout.MODEL, run_id)
    shutil.rmtree(folder, ignore_errors=True)
    pointer = registry.promote(storage, layout.MODEL, run_id, prefix, {}, manifest, lineage) if promote else None
    return {"storage": storage, "dataset": ds, "run_id": run_id, "prefix": prefix, "manifest": manifest,
            "pointer": pointer, "items": storage.read_parquet(layout.join(ds.prefix, layout.ITEMS)), "cfg": cfg}


def main(cfg: Any) -> Dict[str, Any]:
    run_id = cfg.train.run_id or ck.new_run_id("quick")
    out = build(cfg, run_id, cfg.train.retriever.epochs, "ranker" in cfg.train.stages)
    print(f"trained and promoted {run_id}: {out['storage'].uri(out['prefix'])}")
    return out


if __name__ == "__main__":
    run_cli(main)
