"""A quick in-process trainer: a real bundle in seconds to minutes, without Ray.

    python -m jobs.quick_train storage.root=<uri> [data.source=... train.retriever.epochs=6]

For demos, serving tests and serving benchmarks, where what matters is a servable model, not the
best one: it preprocesses (jobs.preprocess with ``preprocess.engine=local``), embeds items with the
LLM, fits the retriever and the ranker with the same loops as jobs.train (components.training,
over an AdamW stepper instead of DeepSpeed), and writes the same bundle and publishes it. It is
promoted like any model: evaluated on its dataset version and through the pipeline's promotion
decision (``registry.gate_and_promote``), so a quick bundle never replaces a better promoted
model; ``evaluate.force_promote=true`` (``force_promote`` in code: tests, demos) skips the gate.
The production path is ``jobs.pipeline`` (Ray Data, Ray Train + DeepSpeed, evaluation report).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from components import bundle, layout, registry
from components import checkpoints as ck
from components.config import load_config, to_dict
from components.data.datasets import load_training_data, resolve_dataset
from components.evaluation.evaluate import evaluate_bundle
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
                 overrides=(), promote: bool = True, seed: int = 0, small: bool = True,
                 force_promote: bool = False) -> Dict[str, Any]:
    """Preprocess ``cfg.data`` under ``root`` (once), train a hybrid retriever (+ ranker) in-process,
    publish ``checkpoints/recommender/<run_id>/`` and (by default) promote it if it clears the
    gate (``force_promote``: whatever its figures)."""
    cfg = load_config([f"storage.root={root}", *(SMALL if small else []), *overrides])
    return build(cfg, run_id, epochs, ranker, promote, seed, force_promote)


def build(cfg: Any, run_id: str, epochs: int, ranker: bool = True, promote: bool = True,
          seed: int = 0, force_promote: bool = False) -> Dict[str, Any]:
    """Train and publish a bundle (see the module doc); with ``promote``, promote it if
    ``promote_if_cleared`` says so. Returns the storage, dataset, run id, prefix, manifest, the
    promotion decision and the pointer written (None if not promoted), the items and ``cfg``."""
    storage = Storage.from_config(cfg.storage)
    if not storage.is_file(layout.dataset_latest(cfg.data.name or cfg.data.source)):
        preprocess.main(OmegaConf.merge(cfg, {"preprocess": {"engine": "local"}}))
    ds = resolve_dataset(storage, cfg)
    text_prefix = layout.index(f"{run_id}-base")
    if not storage.is_file(layout.join(text_prefix, layout.TEXT_EMBEDDINGS)):
        items = storage.read_parquet(layout.join(ds.prefix, layout.ITEMS))
        encoder = TextEncoder(TextEncoderConfig(**to_dict(cfg.text)))  # the base LLM: no fine-tuning here
        storage.write_parquet(layout.join(text_prefix, layout.TEXT_EMBEDDINGS), embed_catalog(encoder, items),
                              row_group_size=layout.TEXT_ROW_GROUP)
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
    trained = {"run_id": run_id, "prefix": prefix, "manifest": manifest, "lineage": lineage}
    try:
        decision = promote_if_cleared(cfg, storage, folder, trained, force_promote) if promote else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    pointer = registry.read_pointer(storage) if decision and decision["promoted"] else None
    return {"storage": storage, "dataset": ds, "run_id": run_id, "prefix": prefix, "manifest": manifest,
            "promotion": decision, "pointer": pointer,
            "items": storage.read_parquet(layout.join(ds.prefix, layout.ITEMS)), "cfg": cfg}


def promote_if_cleared(cfg: Any, storage: Storage, folder: Optional[Path], trained: Dict[str, Any],
                       force: bool = False) -> Dict[str, Any]:
    """Promote the published bundle in ``folder`` the way the pipeline does: evaluated on its
    dataset version (jobs.evaluate's figures, without the report) and promoted only if
    ``registry.gate_and_promote`` decides so against the promoted model. ``force``: promote
    without evaluating, an explicit override (a servable model whatever its figures).
    Returns the decision (``promoted``, ``reason`` and the figures read)."""
    if force:
        registry.promote(storage, layout.MODEL, trained["run_id"], trained["prefix"], {}, trained["manifest"],
                         trained["lineage"])
        return {"promoted": True, "reason": "forced: the promotion gate was skipped"}
    res = evaluate_bundle(cfg, storage, folder, trained["run_id"])["results"]
    return registry.gate_and_promote(storage, res, trained, cfg.evaluate.ndcg_floor, cfg.evaluate.tolerance)


def main(cfg: Any) -> Dict[str, Any]:
    run_id = cfg.train.run_id or ck.new_run_id("quick")
    out = build(cfg, run_id, cfg.train.retriever.epochs, "ranker" in cfg.train.stages,
                force_promote=cfg.evaluate.force_promote)
    decision = out["promotion"]
    print(f"trained {run_id}: {out['storage'].uri(out['prefix'])}; promotion: "
          f"{'PROMOTED' if decision['promoted'] else 'not promoted'} ({decision['reason']})")
    return out


if __name__ == "__main__":
    run_cli(main)
