"""Train the recommender on Ray Train (TorchTrainer) with DeepSpeed ZeRO.

    python -m jobs.train storage.root=<uri> [train.stages=[llm,retriever,ranker]] [train.zero_stage=2]

Stages, each one TorchTrainer run with ``train.num_workers`` workers (the retriever:
``train.retriever_workers`` when set), each with ``train.cpus_per_worker`` CPUs as torch threads (gloo on CPU):
  llm        contrastive fine-tuning of the text encoder on (item, next item) text pairs, then the
             catalog is re-embedded with it (jobs.embed_items);
  retriever  the sequence retriever, full-softmax (or sampled) next-item loss, best epoch on valid;
  ranker     the MLP ranker on the fused channels' candidates for the valid targets.
The loops are components.training's, run over a DeepSpeed stepper by the worker functions in
jobs/train_workers.py, which only get their context, resume, report and checkpoint. Every epoch that improves writes a checkpoint
through ``ray.train.report`` (all ranks' shards merged), so a killed worker resumes from it
(FailureConfig). The result is a bundle ``checkpoints/recommender/<run_id>/`` (components.bundle).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from components import bundle, layout, registry
from components import checkpoints as ck
from components.config import retriever_workers, to_dict
from components.data.datasets import DatasetRef, load_training_data, resolve_dataset
from components.evaluation.ranking import fit_channels
from components.models.channels import describe as describe_fit
from components.storage import Storage
from jobs import embed_items
from jobs import train_workers as workers
from jobs.progress import stage as progress_stage
from jobs.runtime import ray_log_level, ray_session, run_cli

log = logging.getLogger("jobs.train")


# -- driver ------------------------------------------------------------------------------------------
def share_cpus(requested: int, workers: int, free_cpus: List[float], use_gpu: bool) -> int:
    """CPUs (and torch threads) per worker: ``requested`` when set; on GPU 0 (Ray Train's default:
    no CPU asked); else the most that still places every worker on the nodes' free CPUs
    (``free_cpus``, one entry a node; a 2-CPU node: two workers get 1 each, one worker 2), at
    least 1."""
    if requested:
        return requested
    if use_gpu:
        return 0
    best = 1
    for c in range(2, int(max(free_cpus, default=1)) + 1):
        if sum(int(n) // c for n in free_cpus) >= workers:
            best = c
    return best


def free_cpus(settle_s: float = 10.0) -> List[float]:
    """Each live node's free CPUs, read for up to ``settle_s`` while something still holds them (the
    previous stage's workers and Ray Data's actors take a few seconds to go): the most seen per
    node, so only what stays held (Serve replicas, other jobs) is left out. [] when unknown."""
    try:
        from ray._private.state import available_resources_per_node, total_resources_per_node  # DeveloperAPI
    except ImportError:
        return []
    total = {n: float(r.get("CPU", 0)) for n, r in total_resources_per_node().items()}
    seen: Dict[str, float] = {}
    deadline = time.monotonic() + settle_s
    while True:
        for n, r in available_resources_per_node().items():
            seen[n] = max(seen.get(n, 0.0), float(r.get("CPU", 0)))
        if all(seen.get(n, 0.0) >= t for n, t in total.items()) or time.monotonic() > deadline:
            return list(seen.values())
        time.sleep(0.5)


def stage_layout(cfg: Any, name: str) -> Dict[str, int]:
    """Workers and CPUs per worker of stage ``name`` on the running cluster: ``train.num_workers``
    (the retriever: ``train.retriever_workers`` when set) and ``share_cpus`` of
    ``train.cpus_per_worker`` over the nodes' free CPUs (``free_cpus``: Serve replicas or other
    jobs on the cluster keep theirs)."""
    workers = retriever_workers(cfg) if name == "retriever" else cfg.train.num_workers
    auto = not cfg.train.cpus_per_worker and not cfg.train.use_gpu  # only then are the nodes read
    return {"workers": workers, "cpus": share_cpus(cfg.train.cpus_per_worker, workers,
                                                   free_cpus() if auto else [], cfg.train.use_gpu)}


def run_stage(name: str, worker, loop_config: Dict[str, Any], cfg: Any, storage: Storage, run_id: str) -> Path:
    """One TorchTrainer run, with a progress bar the workers tick; returns a local folder with
    the exported best weights."""
    import pyarrow.fs as pafs
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path = storage.path(layout.RAY_TRAIN)
    if not storage.is_s3:
        Path(storage_path).mkdir(parents=True, exist_ok=True)
    shape = stage_layout(cfg, name)
    log.info("stage %s: %d worker(s), %s CPU(s) and torch threads each", name, shape["workers"], shape["cpus"] or "no")
    with progress_stage(f"train {name}", unit="step", remote=True) as bar:
        trainer = TorchTrainer(
            worker, train_loop_config={**loop_config, "progress": bar.actor_name, "threads": shape["cpus"]},
            scaling_config=ScalingConfig(num_workers=shape["workers"], use_gpu=cfg.train.use_gpu,
                                         resources_per_worker={"CPU": shape["cpus"]} if shape["cpus"] else None,
                                         placement_strategy=cfg.train.placement_strategy),
            run_config=RunConfig(
                name=f"{run_id}-{name}", storage_path=storage_path,
                storage_filesystem=storage.fs if storage.is_s3 else pafs.LocalFileSystem(),
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                logging_config=LoggingConfig(log_level=ray_log_level())),  # per-step reports: LLMREC_RAY_LOGS=1
            torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo",
                                     timeout_s=cfg.train.collective_timeout_s))
        t0 = time.perf_counter()
        result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training stage {name} failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError(f"training stage {name} reported no checkpoint")
    out = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    with result.checkpoint.as_directory() as d:
        if not (Path(d) / "best" / layout.WEIGHTS).is_file():
            raise RuntimeError(f"training stage {name}: the last checkpoint has no exported weights")
        shutil.copytree(Path(d) / "best", out, dirs_exist_ok=True)
        progress = json.loads((Path(d) / "progress.json").read_text())
    log.info("stage %s done in %.1fs: %s", name, time.perf_counter() - t0, result.metrics)
    (out / "train_progress.json").write_text(json.dumps({**progress, "last_metrics": result.metrics, "layout": shape},
                                                       default=str))
    return out


def _embed(cfg: Any, ds: DatasetRef, run_id: str, llm: Optional[str]) -> str:
    """The catalog embedded by jobs.embed_items into indexes/<run_id>; returns that prefix."""
    return embed_items.main(OmegaConf.merge(cfg, {"train": {"dataset_version": ds.version},
                                                  "embed": {"run_id": run_id, "llm": llm}}))["prefix"]


def _stages(cfg: Any, storage: Storage, ds: DatasetRef, run_id: str, text_prefix: Optional[str],
            folder: Path, timings: Dict[str, float]) -> Dict[str, Any]:
    """Every configured stage into ``folder``; returns {text_prefix, fusion}."""
    run_prefix = layout.run_scratch(run_id)
    base = {"storage": storage, "dataset_prefix": ds.prefix, "text_prefix": text_prefix,
            "zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision, "run_prefix": run_prefix,
            "fail_at_epoch": cfg.train.fail_at_epoch, "warm_start": cfg.train.warm_start}
    stages, fusion = cfg.train.stages, None
    if "llm" in stages and cfg.train.llm.steps > 0:
        t0 = time.perf_counter()
        llm_dir = run_stage("llm", workers.llm_worker, {**base, "text": to_dict(cfg.text), "llm": to_dict(cfg.train.llm)},
                            cfg, storage, run_id)
        bundle.add_hf_files(llm_dir)
        shutil.copytree(llm_dir, folder / layout.LLM)
        encoder = layout.join(layout.index(f"{run_id}-llm"), layout.ENCODER)  # what the embedding actors read
        storage.upload_dir(llm_dir, encoder)
        text_prefix = base["text_prefix"] = _embed(cfg, ds, f"{run_id}-llm", encoder)
        timings["llm_s"] = round(time.perf_counter() - t0, 1)
    if "retriever" in stages:
        t0 = time.perf_counter()
        r_dir = run_stage("retriever", workers.retriever_worker,
                          {**base, "retriever": to_dict(cfg.retriever), "train": to_dict(cfg.train.retriever)},
                          cfg, storage, run_id)
        shutil.copytree(r_dir, folder / layout.RETRIEVER)
        timings["retriever_s"] = round(time.perf_counter() - t0, 1)
        if cfg.ranker.channels:
            t0 = time.perf_counter()
            data = load_training_data(storage, ds.prefix, text_prefix)
            channels, fusion = fit_channels(bundle.load_retriever(folder), data.text, data.histories,
                                            new_frac=cfg.evaluate.new_item_frac)
            channels.save(folder / layout.CHANNELS)
            timings["channels_s"] = round(time.perf_counter() - t0, 1)
            log.info("channel fusion fitted on valid: %s (NDCG@10 %.4f, retriever alone %.4f)", describe_fit(fusion),
                     fusion["valid_ndcg@10"], fusion["valid_ndcg@10_retriever"])
    if "ranker" in stages:
        t0 = time.perf_counter()
        stage_prefix = layout.join(run_prefix, "ranker-input")  # what the ranker workers read, wherever they run
        for part in (layout.RETRIEVER, layout.CHANNELS):
            if (folder / part).is_dir():
                storage.upload_dir(folder / part, layout.join(stage_prefix, part))
        k_dir = run_stage("ranker", workers.ranker_worker, {**base, "ranker": to_dict(cfg.ranker), "stage_prefix": stage_prefix},
                          cfg, storage, run_id)
        shutil.copytree(k_dir, folder / layout.RANKER)
        timings["ranker_s"] = round(time.perf_counter() - t0, 1)
    return {"text_prefix": text_prefix, "fusion": fusion}


def train(cfg: Any, storage: Storage, ds: DatasetRef, run_id: str) -> Dict[str, Any]:
    """Embed the catalog, run every stage, assemble and publish the bundle. Needs Ray."""
    timings: Dict[str, float] = {}
    promoted = registry.read_pointer(storage)  # the model this run would replace (lineage)
    parent = cfg.train.warm_start
    parent_llm = layout.join(parent, layout.LLM) if parent else None
    if parent_llm and not storage.is_file(layout.join(parent_llm, layout.WEIGHTS)):
        parent_llm = None
    text_prefix = pretrained = None
    if cfg.retriever.use_text:  # embeddings of the encoder this run starts from (the parent's when warm)
        t0 = time.perf_counter()
        text_prefix = pretrained = _embed(cfg, ds, f"{run_id}-base", parent_llm)
        if parent_llm:
            # The parent's encoder was fine-tuned on interactions, new items' included: the
            # new-item evaluation needs the encoder that never saw any, or it would leak.
            pretrained = _embed(cfg, ds, f"{run_id}-pretrained", None) if cfg.evaluate.new_item_variant else None
        timings["embed_s"] = round(time.perf_counter() - t0, 1)
    folder = Path(tempfile.mkdtemp(prefix="bundle-"))
    out = _stages(cfg, storage, ds, run_id, text_prefix, folder, timings)
    if not (folder / layout.LLM).is_dir() and parent_llm:  # serving embeds new items with the same LLM
        storage.download_dir(parent_llm, folder / layout.LLM)
    bundle.add_data_parts(folder, storage, ds.prefix, out["text_prefix"],
                          load_training_data(storage, ds.prefix, None).histories)
    lineage = {"run_id": run_id, "dataset": ds.name, "dataset_version": ds.version,
               "text_embeddings": out["text_prefix"], "text_embeddings_base": pretrained,
               "parent_run": (promoted or {}).get("run_id"), "warm_start": parent, "config": to_dict(cfg),
               "timings": timings, "fusion": out["fusion"], **to_dict(cfg.train.lineage)}
    if (folder / layout.RETRIEVER).is_dir() and bundle.load_catalog(folder).num_rows > cfg.train.ann_index_above:
        t0 = time.perf_counter()
        from serve.retrieval import ship_ann_index

        lineage["ann_index"] = ship_ann_index(folder)
        timings["ann_index_s"] = round(time.perf_counter() - t0, 1)
    bundle.write_lineage(folder, lineage)
    manifest = ck.write_manifest(folder)
    prefix = ck.publish(storage, folder, layout.MODEL, run_id)
    shutil.rmtree(folder, ignore_errors=True)
    return {"run_id": run_id, "prefix": prefix, "manifest": manifest, "timings": timings,
            "text_prefix": out["text_prefix"], "lineage": lineage}


# What main(cfg) reads (jobs.embed_items included): `--help` lists these settings.
CONFIG_SECTIONS = ("storage", "data.source", "data.name", "ray", "text", "retriever", "ranker", "train",
                   "embed.concurrency", "embed.precision", "evaluate.new_item_variant", "evaluate.new_item_frac")


def main(cfg: Any) -> Dict[str, Any]:
    storage = Storage.from_config(cfg.storage)
    ds = resolve_dataset(storage, cfg)
    run_id = cfg.train.run_id or ck.new_run_id()
    with ray_session(cfg.ray):
        out = train(cfg, storage, ds, run_id)
    print(f"trained {run_id}: {storage.uri(out['prefix'])} {out['timings']}", flush=True)
    return out


if __name__ == "__main__":
    run_cli(main)
