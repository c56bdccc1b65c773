"""The Ray Train per-worker functions of jobs.train: each builds its model and a DeepSpeed stepper,
runs the model's one loop (components.training) and touches Ray only to get its context, resume
from the last checkpoint, report and checkpoint (every rank's ZeRO shard, merged by Ray)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from components import bundle, layout
from components.data.datasets import load_training_data
from components.evaluation.ranking import scored_lists
from components.models.ranker import RankerConfig, RankerMLP
from components.models.retriever import RetrieverConfig
from components.models.text_encoder import TextEncoder, TextEncoderConfig, item_text
from components.storage import Storage
from components.training import llm as llm_loop
from components.training import ranker as ranker_loop
from components.training import retriever as retriever_loop
from components.training.stepper import DeepSpeedStepper, load_progress, save_progress
from components.training.warm_start import warm_start
from jobs import telemetry
from jobs.progress import Ticker
from jobs.runtime import quiet_worker_logs

log = logging.getLogger("jobs.train")


# -- what the workers share: context, stepper, resume, report --------------------------------------
def _context() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _stepper(model: torch.nn.Module, lr: float, wd: float, config: Dict[str, Any], micro_batch: int, schedule=None):
    quiet_worker_logs()
    return DeepSpeedStepper(model, lr, wd, config["zero_stage"], config["precision"], micro_batch, schedule)


def _resume(stepper: DeepSpeedStepper) -> Optional[Dict[str, Any]]:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    # Each rank downloads into its own directory: Checkpoint.as_directory shares one temp dir per
    # node, and when the first rank leaves it (and deletes it) before the second registers as a
    # reader, the second fails with "Checkpoint directory ... does not exist" (seen in CI with two
    # workers on one node resuming after a killed worker).
    with tempfile.TemporaryDirectory(prefix="llmrec-resume-") as d:
        ckpt.to_directory(d)
        stepper.load(d)
        return load_progress(d)


def _reporter(stepper: DeepSpeedStepper, best_config: Dict[str, Any]):
    """``report(metrics, progress, checkpoint)``: every rank writes its ZeRO shard, rank 0 the
    progress and best weights; Ray merges them into one checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    def report(metrics: Dict[str, Any], progress: Dict[str, Any], checkpoint: bool) -> None:
        if not checkpoint:
            ray.train.report(metrics)
            return
        rank = ray.train.get_context().get_world_rank()
        with tempfile.TemporaryDirectory() as tmp:
            stepper.save(tmp, rank)
            if rank == 0:
                save_progress(tmp, progress, progress.get("_best_state"), best_config)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    return report


def _maybe_fail(config: Dict[str, Any], epoch: int, rank: int) -> None:
    """Test hook: worker rank 1 dies (once per run) when ``fail_at_epoch`` starts."""
    if config.get("fail_at_epoch", -1) != epoch or rank != 1:
        return
    storage: Storage = config["storage"]
    marker = layout.join(config["run_prefix"], "_fault_injected")
    if not storage.exists(marker):
        storage.write_bytes(marker, b"1")
        # Die a few seconds into the epoch, as a crashed worker would: the previous epoch's
        # checkpoint has been registered by then.
        time.sleep(3)
        log.warning("fault injection: worker rank 1 exits during epoch %d", epoch)
        os._exit(1)


def _warm_start(model: torch.nn.Module, config: Dict[str, Any], part: str,
                item_ids: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    """Initialise ``model`` from the parent bundle ``config["warm_start"]`` (a storage prefix)."""
    prefix, storage = config.get("warm_start"), config["storage"]
    if not prefix:
        return None
    if not storage.is_file(layout.join(prefix, part, layout.WEIGHTS)):
        log.warning("warm start: parent %s has no %s; training %s from scratch", prefix, part, part)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        storage.download_dir(layout.join(prefix, part), Path(tmp) / part)
        state, _ = bundle.load_weights(tmp, part, verify=False)
        if item_ids is not None:
            storage.download_dir(layout.join(prefix, layout.ITEMS), Path(tmp) / layout.ITEMS)
        parent_ids = bundle.load_catalog(tmp)["item_id"].to_pylist() if item_ids is not None else []
    out = warm_start(model, state, parent_ids, item_ids or [])
    log.info("warm start of %s from %s: %s", part, prefix, out)
    return out


def _threads(config: Dict[str, Any]) -> None:
    """Torch's intra-op threads: the CPUs the stage gave this worker (jobs.train.stage_layout)."""
    torch.set_num_threads(max(1, int(config.get("threads") or os.environ.get("OMP_NUM_THREADS", "1"))))


def _run_of(config: Dict[str, Any]) -> str:
    return config["run_prefix"].rsplit("/", 1)[-1]


# -- workers -----------------------------------------------------------------------------------------
def retriever_worker(config: Dict[str, Any]) -> None:
    rank, world = _context()
    _threads(config)
    data = load_training_data(config["storage"], config["dataset_prefix"], config["text_prefix"])
    tcfg = retriever_loop.RetrieverTrainConfig(**config["train"])
    model = retriever_loop.new_retriever(data.histories, data.text, RetrieverConfig(**config["retriever"]), tcfg.seed)
    warm = _warm_start(model, config, layout.RETRIEVER, data.items["item_id"].to_pylist())
    x = retriever_loop.retriever_inputs(data.histories, data.text, model.cfg)
    budget = retriever_loop.plan_budget(tcfg, x.windows, world)
    if rank == 0:
        log.info("retriever budget: %d windows, %d tokens an epoch -> batch %d per worker, %d steps an epoch, "
                 "at most %d epochs", len(x.windows["items"]), budget.tokens_per_epoch, budget.batch_size,
                 budget.steps_per_epoch, budget.epochs)
    stepper = _stepper(model, tcfg.lr, tcfg.weight_decay, config, budget.batch_size,
                       lambda opt: retriever_loop.lr_schedule(opt, tcfg, budget.epochs * budget.steps_per_epoch))
    report = _reporter(stepper, bundle.part_config(layout.RETRIEVER, model.cfg))

    def after_epoch(metrics, progress, improved, last):
        metrics["warm_start_items_mapped"] = (warm or {}).get("items_mapped")
        if rank == 0:  # Prometheus gauges through Ray's metrics API (jobs/telemetry.py)
            telemetry.training("retriever", _run_of(config), metrics, metrics["steps"] * budget.batch_size * world)
        # A checkpoint (every rank's ZeRO shard) when the best model moved, and at the end: a
        # resumed run restarts from the last improvement; other epochs cost no DeepSpeed save.
        report(metrics, progress, improved or last)

    retriever_loop.train_retriever(stepper, x, tcfg, budget, _resume(stepper), rank, world,
                                   before_epoch=lambda epoch: _maybe_fail(config, epoch, rank),
                                   after_epoch=after_epoch,
                                   tick=Ticker(config.get("progress") if rank == 0 else None).tick)


def ranker_worker(config: Dict[str, Any]) -> None:
    rank, world = _context()
    _threads(config)
    data = load_training_data(config["storage"], config["dataset_prefix"], config["text_prefix"])
    # The retriever stage's output, from storage: this worker may run on another node than the driver.
    with tempfile.TemporaryDirectory() as tmp:
        config["storage"].download_dir(config["stage_prefix"], tmp)
        retriever = bundle.load_retriever(tmp)
        channels = bundle.load_channels(tmp, data.text)
    kcfg = RankerConfig(**config["ranker"])
    kcfg.dim = retriever.cfg.dim
    lists = scored_lists(retriever, channels, data.text, data.histories, "valid", data.categories, kcfg.candidates)
    fit, held = ranker_loop.split_lists(lists, kcfg)
    torch.manual_seed(0)
    model = RankerMLP(kcfg)
    _warm_start(model, config, layout.RANKER)
    stepper = _stepper(model, kcfg.lr, kcfg.weight_decay, config, kcfg.batch_size)
    report = _reporter(stepper, bundle.part_config(layout.RANKER, kcfg))

    def after_epoch(metrics, progress, improved, last):
        if rank == 0:
            telemetry.training("ranker", _run_of(config), metrics, 0)
        report(metrics, progress, improved or last)  # checkpoints cost a DeepSpeed save each

    ranker_loop.train_ranker(stepper, lists, fit, held, kcfg, _resume(stepper), rank, world, after_epoch,
                             Ticker(config.get("progress") if rank == 0 else None).tick)


def llm_worker(config: Dict[str, Any]) -> None:
    """Contrastive fine-tuning: an item's text should be close to the next item's text."""
    rank, world = _context()
    _threads(config)
    data = load_training_data(config["storage"], config["dataset_prefix"], None)
    lcfg = config["llm"]
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(**config["text"]))
    texts = [item_text(t, x, c) for t, x, c in zip(data.items["title"].to_pylist(), data.items["text"].to_pylist(),
                                                    data.categories)]
    pairs = llm_loop.next_item_pairs(data.histories)
    stepper = _stepper(encoder, lcfg["lr"], 0.01, config, 2 * lcfg["batch_size"])
    report = _reporter(stepper, bundle.part_config(layout.LLM, config["text"]))
    llm_loop.train_llm(stepper, encoder, texts, pairs, lcfg["steps"], lcfg["batch_size"], lcfg["temperature"],
                       _resume(stepper), rank, world, lambda metrics, progress, last: report(metrics, progress, last),
                       Ticker(config.get("progress") if rank == 0 else None).tick)
