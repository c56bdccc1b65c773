"""Train the recommender on Ray Train (TorchTrainer) with DeepSpeed ZeRO.

    python -m jobs.train storage.root=<uri> [train.stages=[llm,retriever,ranker]] [train.zero_stage=2]

Stages, each one TorchTrainer run with ``train.num_workers`` workers (gloo on CPU):
  llm        contrastive fine-tuning of the text encoder on (item, next item) text pairs, then the
             catalog is re-embedded with it (jobs.embed_items);
  retriever  the sequence retriever, full-softmax (or sampled) next-item loss, best epoch on valid;
  ranker     the MLP ranker on the retriever's hard candidates for the valid targets.
Every epoch with an evaluation writes a DeepSpeed checkpoint through ``ray.train.report`` (all
ranks' shards merged), so a killed worker resumes from it (FailureConfig). The result is a bundle
``checkpoints/recommender/<run_id>/`` (retriever/, ranker/, text embeddings, catalog, lineage).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from components import checkpoints as ck
from components import layout
from components.bundle import save_interactions
from components.config import to_dict
from components.data.datasets import DatasetRef, load_training_data, resolve_dataset
from components.models.ranker import RankerConfig, RankerMLP, holdout_rows, listwise_loss
from components.models.retriever import RetrieverConfig, SequenceRetriever
from components.models.channels import Channels, describe as describe_fit
from components.evaluation.ranking import fit_channels, scored_lists
from components.training.retriever import (RetrieverTrainConfig, batches, log_q_from_counts, lr_schedule,
                                           plan_budget, retriever_scores)
from components.data.sequences import training_windows
from components.evaluation.metrics import rank_and_topk, ranking_metrics
from components.storage import Storage
from components.training.warm_start import warm_start
from components.models.text_encoder import TextEncoder, TextEncoderConfig, contrastive_loss, item_text
from jobs.progress import Ticker, stage as progress_stage
from jobs.runtime import ray_log_level, ray_session, run_cli
from jobs import telemetry

log = logging.getLogger("jobs.train")
BUNDLE = "recommender"


# -- DeepSpeed plumbing (runs inside Ray Train workers) ---------------------------------------
def deepspeed_config(zero_stage: int, precision: str, micro_batch: int) -> Dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage},
        # A torch optimizer instead of DeepSpeed's fused Adam: no ~85 s JIT build on CPU.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _deepspeed(model: torch.nn.Module, lr: float, wd: float, config: Dict[str, Any], micro_batch: int,
               schedule=None):
    """A DeepSpeed engine over ``model`` with AdamW; ``schedule(opt)`` builds an lr scheduler that
    the engine steps with the optimizer and saves in (and restores from) its checkpoints."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if ray_log_level() != "INFO":  # DeepSpeed's INFO lines and torch's deprecation notes from its comm calls
        import warnings

        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
        try:  # Ray Train's "Reporting training result N" INFO line per report (a logger named by file)
            from ray.train.v2._internal.execution import context as train_context

            logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
        except ImportError:
            pass
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=wd)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=schedule,
        config=deepspeed_config(config["zero_stage"], config["precision"], micro_batch))
    return engine


@contextmanager
def full_params(engine, zero_stage: int):
    """Under ZeRO-3 parameters are partitioned: gather them for evaluation/export."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def _state(engine, zero_stage: int) -> Dict[str, torch.Tensor]:
    with full_params(engine, zero_stage):
        return {k: v.detach().clone().float() for k, v in engine.module.state_dict().items()}


def _mean_across_workers(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t.item())


def _resume(engine) -> Optional[Dict[str, Any]]:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        ck.verify_state(d)  # before DeepSpeed unpickles anything in it
        engine.load_checkpoint(d, tag="state", load_module_strict=True)
        progress = json.loads((Path(d) / "progress.json").read_text())
        best = Path(d) / "best"
        progress["_best_state"] = ck.load_local(best)[0] if (best / layout.WEIGHTS).is_file() else None
    return progress


def _report(engine, metrics: Dict[str, Any], progress: Dict[str, Any], best_state, best_config) -> None:
    """Checkpoint (every rank writes its ZeRO shard; Ray merges them) and report."""
    import ray.train
    from ray.train import Checkpoint

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="state")
        ck.write_state_manifest(tmp, rank)
        if rank == 0:
            (Path(tmp) / "progress.json").write_text(json.dumps({k: v for k, v in progress.items()
                                                                 if not k.startswith("_")}))
            if best_state is not None:
                ck.save_local(Path(tmp) / "best", best_state, best_config, metrics=progress.get("best_metrics"))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def _maybe_fail(config: Dict[str, Any], epoch: int, rank: int) -> None:
    """Test hook: worker rank 1 dies (once per run) when ``fail_at_epoch`` starts."""
    if config.get("fail_at_epoch", -1) != epoch or rank != 1:
        return
    storage: Storage = config["storage"]
    marker = f"{config['run_prefix']}/_fault_injected"
    if not storage.exists(marker):
        storage.write_bytes(marker, b"1")
        # Die a few seconds into the epoch, as a crashed worker would: the previous epoch's
        # checkpoint has been registered by then.
        time.sleep(3)
        log.warning("fault injection: worker rank 1 exits during epoch %d", epoch)
        os._exit(1)


def _warm_start(model: torch.nn.Module, config: Dict[str, Any], part: str,
                item_ids: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    """Initialise from the parent bundle ``config["warm_start"]`` (a storage prefix), if given."""
    prefix = config.get("warm_start")
    if not prefix:
        return None
    storage: Storage = config["storage"]
    rel = f"{prefix}/{part}/{layout.WEIGHTS}"
    if not storage.is_file(rel):
        log.warning("warm start: parent %s has no %s; training %s from scratch", prefix, part, part)
        return None
    parent = load_safetensors(storage.read_bytes(rel))
    parent_ids = (storage.read_parquet(f"{prefix}/items").sort_by("item_idx")["item_id"].to_pylist()
                  if item_ids is not None else [])
    out = warm_start(model, parent, parent_ids, item_ids or [])
    log.info("warm start of %s from %s: %s", part, prefix, out)
    return out


# -- workers ---------------------------------------------------------------------------------
def retriever_worker(config: Dict[str, Any]) -> None:
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    data = load_training_data(config["storage"], config["dataset_prefix"], config["text_prefix"])
    h = data.histories
    rcfg = RetrieverConfig(**config["retriever"])
    rcfg.num_items = h.num_items
    rcfg.text_dim = data.text.shape[1] if (rcfg.use_text and data.text is not None) else 0
    tcfg = RetrieverTrainConfig(**config["train"])
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    model = SequenceRetriever(rcfg)
    warm = _warm_start(model, config, "retriever", data.items["item_id"].to_pylist())
    text_emb = data.text_emb() if rcfg.use_text else None
    counts = np.bincount(np.concatenate(h.items), minlength=h.num_items)
    log_q = log_q_from_counts(counts)
    windows = training_windows(h, rcfg.max_len)
    budget = plan_budget(tcfg, windows, world)
    if rank == 0:
        log.info("retriever budget: %d windows, %d tokens an epoch -> batch %d per worker, %d steps an epoch, "
                 "at most %d epochs", len(windows["items"]), budget.tokens_per_epoch, budget.batch_size,
                 budget.steps_per_epoch, budget.epochs)
    engine = _deepspeed(model, tcfg.lr, tcfg.weight_decay, config, budget.batch_size,
                        lambda opt: lr_schedule(opt, tcfg, budget.epochs * budget.steps_per_epoch))
    progress = _resume(engine) or {"epoch": -1, "best": -1.0, "best_epoch": -1, "bad_evals": 0,
                                   "resumed_from": None, "_best_state": None}
    if progress["epoch"] >= 0:
        progress["resumed_from"] = progress["epoch"]
    best_state = progress.pop("_best_state", None)
    best_config = {"retriever": to_dict_safe(rcfg), "kind": "retriever"}
    ticker = Ticker(config.get("progress") if rank == 0 else None)
    ticker.tick(0, total=budget.epochs * budget.steps_per_epoch, force=True)
    for epoch in range(progress["epoch"] + 1, budget.epochs):
        _maybe_fail(config, epoch, rank)
        t0 = time.perf_counter()
        engine.train()
        total, n = 0.0, 0
        for batch in batches(windows, budget.batch_size, np.random.default_rng([tcfg.seed, epoch]), rank, world):
            loss = engine(batch, text_emb, log_q)
            engine.backward(loss)
            engine.step()
            total, n = total + float(loss.item()), n + 1
            ticker.tick(1, epoch=epoch)
        metrics = {"epoch": epoch, "loss": _mean_across_workers(total / max(n, 1)),
                   "epoch_s": round(time.perf_counter() - t0, 2), "resumed_from": progress["resumed_from"],
                   "warm_start_items_mapped": (warm or {}).get("items_mapped")}
        last = epoch == budget.epochs - 1
        evaluate = last or (tcfg.eval_every > 0 and (epoch + 1) % tcfg.eval_every == 0)
        improved = False
        if evaluate:
            with full_params(engine, config["zero_stage"]):
                scores, targets, hist = retriever_scores(engine.module, text_emb, h, "valid")
            m = ranking_metrics(rank_and_topk(scores, targets, hist)[0])
            metrics.update({f"valid_{k}": v for k, v in m.items() if k != "n"})
            if m["ndcg@10"] > progress["best"]:
                progress.update(best=m["ndcg@10"], best_epoch=epoch, bad_evals=0,
                                best_metrics={f"valid_{k}": v for k, v in m.items()})
                best_state = _state(engine, config["zero_stage"])
                improved = True
            else:
                progress["bad_evals"] += 1
            early = bool(tcfg.patience) and progress["bad_evals"] >= tcfg.patience and epoch < budget.epochs - 1
            last = last or early
            ticker.tick(0, force=True, valid_ndcg10=m["ndcg@10"], **({"stopped": "early"} if early else {}))
        progress["epoch"] = epoch
        metrics["best_epoch"] = progress["best_epoch"]
        if rank == 0:  # Prometheus gauges through Ray's metrics API (jobs/telemetry.py)
            telemetry.training("retriever", _run_of(config), metrics, n * budget.batch_size * world)
        # A checkpoint (every rank's ZeRO shard) when the best model moved, and at the end: a
        # resumed run restarts from the last improvement, and evaluations that did not improve
        # cost no DeepSpeed save.
        if improved or last:
            _report(engine, metrics, progress, best_state, best_config)
        else:
            ray.train.report(metrics)
        if last:
            break


def _run_of(config: Dict[str, Any]) -> str:
    return config["run_prefix"].rsplit("/", 1)[-1]


def ranker_worker(config: Dict[str, Any]) -> None:
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data = load_training_data(config["storage"], config["dataset_prefix"], config["text_prefix"])
    # The retriever stage's output, from storage: this worker may run on another node than the driver.
    with tempfile.TemporaryDirectory() as tmp:
        config["storage"].download_dir(config["stage_prefix"], tmp)
        retriever, _ = load_retriever(Path(tmp) / "retriever", data)
        channels = load_channels(Path(tmp) / "channels", data)
    kcfg = RankerConfig(**config["ranker"])
    kcfg.dim = retriever.cfg.dim
    lists = ranker_lists(retriever, channels, data, "valid", kcfg.candidates)
    keep = lists["positive"] >= 0
    users = np.flatnonzero(keep)
    held = holdout_rows(users, kcfg.holdout)
    fit = np.setdiff1d(users, held)
    torch.manual_seed(0)
    model = RankerMLP(kcfg)
    _warm_start(model, config, "ranker")
    engine = _deepspeed(model, kcfg.lr, kcfg.weight_decay, config, kcfg.batch_size)
    progress = _resume(engine) or {"epoch": -1, "best": -1.0, "best_epoch": -1, "_best_state": None}
    best_state = progress.pop("_best_state", None)
    best_config = {"ranker": to_dict_safe(kcfg), "kind": "ranker"}
    if progress["epoch"] < 0:  # the untrained residual is the retriever's order: the bar to clear
        with full_params(engine, config["zero_stage"]):
            m = ranker_holdout_metrics(engine.module, lists, held)
        progress.update(best=m, retriever_order_holdout_ndcg=m, best_metrics={"holdout_ndcg@10": m})
        best_state = _state(engine, config["zero_stage"])
    ticker = Ticker(config.get("progress") if rank == 0 else None)
    per_epoch = len(range(0, max(len(fit) // world - kcfg.batch_size + 1, 1), kcfg.batch_size))
    ticker.tick(0, total=kcfg.epochs * per_epoch, force=True)
    for epoch in range(progress["epoch"] + 1, kcfg.epochs):
        engine.train()
        rng = np.random.default_rng([7, epoch])
        order = rng.permutation(fit)
        per = len(order) // world
        mine = order[rank * per:(rank + 1) * per]
        total, n = 0.0, 0
        for s in range(0, max(len(mine) - kcfg.batch_size + 1, 1), kcfg.batch_size):
            idx = mine[s:s + kcfg.batch_size]
            if len(idx) == 0:
                break
            scores = engine(lists["u"][idx], lists["i"][idx], lists["ctx"][idx])
            loss = listwise_loss(scores, torch.as_tensor(lists["positive"][idx]))
            engine.backward(loss)
            engine.step()
            total, n = total + float(loss.item()), n + 1
            ticker.tick(1, epoch=epoch)
        with full_params(engine, config["zero_stage"]):
            m = ranker_holdout_metrics(engine.module, lists, held)
        ticker.tick(0, force=True, holdout_ndcg10=m)
        metrics = {"epoch": epoch, "loss": _mean_across_workers(total / max(n, 1)), "holdout_ndcg@10": m,
                   "retriever_order_holdout_ndcg@10": progress.get("retriever_order_holdout_ndcg"),
                   "train_lists": int(len(fit)), "holdout_lists": int(len(held))}
        if rank == 0:
            telemetry.training("ranker", _run_of(config), metrics, 0)
        improved = m > progress["best"]
        if improved:
            progress.update(best=m, best_epoch=epoch, best_metrics={"holdout_ndcg@10": m})
            best_state = _state(engine, config["zero_stage"])
        progress["epoch"] = epoch
        if improved or epoch == kcfg.epochs - 1:  # checkpoints cost a DeepSpeed save each
            _report(engine, metrics, progress, best_state, best_config)
        else:
            ray.train.report(metrics)


def llm_worker(config: Dict[str, Any]) -> None:
    """Contrastive fine-tuning: an item's text should be close to the next item's text."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data = load_training_data(config["storage"], config["dataset_prefix"], None)
    lcfg = config["llm"]
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(**config["text"]))
    texts = [item_text(t, x, c) for t, x, c in zip(data.items["title"].to_pylist(), data.items["text"].to_pylist(),
                                                    data.categories)]
    a = np.concatenate([s[:-1] for s in data.histories.items if len(s) > 1])
    b = np.concatenate([s[1:] for s in data.histories.items if len(s) > 1])
    differ = a != b
    a, b = a[differ], b[differ]
    engine = _deepspeed(encoder, lcfg["lr"], 0.01, config, 2 * lcfg["batch_size"])
    progress = _resume(engine) or {"epoch": -1}
    rng = np.random.default_rng(11)
    total = 0.0
    steps = lcfg["steps"]
    ticker = Ticker(config.get("progress") if rank == 0 else None)
    ticker.tick(0, total=steps, force=True)
    for step in range(progress["epoch"] + 1, steps):
        pick = rng.integers(0, len(a), lcfg["batch_size"] * world)[rank * lcfg["batch_size"]:(rank + 1) * lcfg["batch_size"]]
        tok = encoder.tokenize([texts[k] for k in a[pick]] + [texts[k] for k in b[pick]])
        emb = engine(tok["input_ids"], tok["attention_mask"])  # one forward per step (FACTS.md)
        half = len(pick)
        loss = contrastive_loss(emb[:half], emb[half:], lcfg["temperature"])
        engine.backward(loss)
        engine.step()
        total += float(loss.item())
        progress["epoch"] = step
        last = step == steps - 1
        ticker.tick(1, force=last, loss=float(loss.item()))
        if last:
            state = _state(engine, config["zero_stage"])
            progress["best_metrics"] = {"contrastive_loss": _mean_across_workers(total / steps)}
            _report(engine, {"step": step, "loss": progress["best_metrics"]["contrastive_loss"]}, progress,
                    state, {"text": config["text"], "kind": "llm"})
        else:
            ray.train.report({"step": step, "loss": float(loss.item())})


# -- shared by workers, the evaluator and serving ------------------------------------------------
def to_dict_safe(obj) -> Dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else dict(obj)


def load_retriever(folder: str | Path, data) -> tuple[SequenceRetriever, Optional[torch.Tensor]]:
    state, config, _ = ck.load_local(folder)
    rcfg = RetrieverConfig(**config["retriever"])
    model = SequenceRetriever(rcfg)
    model.load_state_dict(state)
    model.eval()
    return model, (data.text_emb() if rcfg.use_text else None)


def load_channels(folder: str | Path, data) -> Optional[Channels]:
    """The bundle's fitted channels (``channels/``), or None for a bundle without them."""
    folder = Path(folder)
    return Channels.load(folder, data.text) if (folder / "fusion.json").is_file() else None


def ranker_lists(retriever: SequenceRetriever, channels: Optional[Channels], data, split: str,
                 candidates: int) -> Dict[str, Any]:
    """Candidate lists for ranker training: the fused channels' top-C with features."""
    return scored_lists(retriever, channels, data.text, data.histories, split, data.categories, candidates)


@torch.no_grad()
def ranker_holdout_metrics(model: RankerMLP, lists: Dict[str, Any], rows: np.ndarray) -> float:
    if len(rows) == 0:
        return 0.0
    model.eval()
    s = model(lists["u"][rows], lists["i"][rows], lists["ctx"][rows])
    order = torch.argsort(s, dim=1, descending=True).numpy()
    ranks = np.array([int(np.flatnonzero(order[k] == lists["positive"][r])[0]) for k, r in enumerate(rows)])
    return ranking_metrics(ranks, (10,))["ndcg@10"]


# -- driver --------------------------------------------------------------------------------------
def run_stage(name: str, worker, loop_config: Dict[str, Any], cfg: Any, storage: Storage, run_id: str) -> Path:
    """One TorchTrainer run, with a progress bar the workers tick; returns a local folder with
    the exported best weights."""
    storage_path = storage.path("ray_train")
    if not storage.is_s3:
        Path(storage_path).mkdir(parents=True, exist_ok=True)
    with progress_stage(f"train {name}", unit="step", remote=True) as bar:
        return _fit(name, worker, {**loop_config, "progress": bar.actor_name}, cfg, storage, storage_path, run_id)


def _fit(name: str, worker, loop_config: Dict[str, Any], cfg: Any, storage: Storage, storage_path: str,
         run_id: str) -> Path:
    import pyarrow.fs as pafs
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     placement_strategy=cfg.train.placement_strategy),
        run_config=RunConfig(
            name=f"{run_id}-{name}", storage_path=storage_path,
            storage_filesystem=storage.fs if storage.is_s3 else pafs.LocalFileSystem(),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level=ray_log_level())),  # per-step reports: LLMREC_RAY_LOGS=1
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
    )
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
    (out / "train_progress.json").write_text(json.dumps({**progress, "last_metrics": result.metrics}, default=str))
    return out


def train(cfg: Any, storage: Storage, ds: DatasetRef, run_id: str, text_prefix: Optional[str],
          parent: Optional[Dict[str, Any]] = None, warm_start_prefix: Optional[str] = None,
          llm_from: Optional[str] = None, extra_lineage: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """All configured stages; assembles and publishes the bundle. Needs an initialised Ray.

    ``warm_start_prefix``: a parent bundle to initialise the retriever and ranker from (item rows
    matched by id). ``llm_from``: a parent bundle whose fine-tuned ``llm/`` this bundle carries
    when the llm stage does not run (so serving embeds new items with the same LLM)."""
    from jobs.embed_items import embed_items

    run_prefix = f"runs/{run_id}"
    base = {"storage": storage, "dataset_prefix": ds.prefix, "text_prefix": text_prefix,
            "zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision, "run_prefix": run_prefix,
            "fail_at_epoch": cfg.train.fail_at_epoch, "warm_start": warm_start_prefix}
    bundle = Path(tempfile.mkdtemp(prefix="bundle-"))
    timings: Dict[str, float] = {}
    llm_dir = None
    base_text_prefix = text_prefix  # embeddings of the encoder before any fine-tuning on this data
    if "llm" in cfg.train.stages and cfg.train.llm.steps > 0:
        t0 = time.perf_counter()
        llm_dir = run_stage("llm", llm_worker, {**base, "text": to_dict(cfg.text), "llm": to_dict(cfg.train.llm)},
                            cfg, storage, run_id)
        out = embed_items(cfg, storage, ds, f"{run_id}-llm", llm_dir=str(llm_dir))
        text_prefix = base["text_prefix"] = out["prefix"]
        shutil.copytree(llm_dir, bundle / "llm")
        timings["llm_s"] = round(time.perf_counter() - t0, 1)
    if "retriever" in cfg.train.stages:
        t0 = time.perf_counter()
        r_dir = run_stage("retriever", retriever_worker,
                          {**base, "retriever": to_dict(cfg.retriever), "train": to_dict(cfg.train.retriever)},
                          cfg, storage, run_id)
        shutil.copytree(r_dir, bundle / "retriever")
        timings["retriever_s"] = round(time.perf_counter() - t0, 1)
    fusion = None
    if "retriever" in cfg.train.stages and cfg.ranker.channels:
        t0 = time.perf_counter()
        data = load_training_data(storage, ds.prefix, text_prefix)
        retriever, _ = load_retriever(bundle / "retriever", data)
        channels, fusion = fit_channels(retriever, data.text, data.histories)
        channels.save(bundle / "channels")
        timings["channels_s"] = round(time.perf_counter() - t0, 1)
        log.info("channel fusion fitted on valid: %s (NDCG@10 %.4f, retriever alone %.4f)", describe_fit(fusion),
                 fusion["valid_ndcg@10"], fusion["valid_ndcg@10_retriever"])
    if "ranker" in cfg.train.stages:
        t0 = time.perf_counter()
        stage_prefix = f"{run_prefix}/ranker-input"  # what the ranker workers read, wherever they run
        for part in ("retriever", "channels"):
            if (bundle / part).is_dir():
                storage.upload_dir(bundle / part, f"{stage_prefix}/{part}")
        k_dir = run_stage("ranker", ranker_worker, {**base, "ranker": to_dict(cfg.ranker), "stage_prefix": stage_prefix},
                          cfg, storage, run_id)
        shutil.copytree(k_dir, bundle / "ranker")
        timings["ranker_s"] = round(time.perf_counter() - t0, 1)
    if llm_dir is None and llm_from and storage.is_file(f"{llm_from}/llm/{layout.WEIGHTS}"):
        storage.download_dir(f"{llm_from}/llm", bundle / "llm")
    if text_prefix:
        storage.download_dir(text_prefix, bundle / "text")
    storage.download_dir(f"{ds.prefix}/items", bundle / "items")
    h = load_training_data(storage, ds.prefix, None).histories
    save_interactions(bundle, h.items, h.ts)
    lineage = {"run_id": run_id, "dataset": ds.name, "dataset_version": ds.version, "text_embeddings": text_prefix,
               "text_embeddings_base": base_text_prefix, "parent_run": (parent or {}).get("run_id"), "warm_start": warm_start_prefix, "config": to_dict(cfg),
               "timings": timings, "fusion": fusion, **(extra_lineage or {})}
    (bundle / "lineage.json").write_text(json.dumps(lineage, indent=2, default=str))
    manifest = ck.write_manifest(bundle)
    prefix = ck.publish(storage, bundle, BUNDLE, run_id)
    return {"run_id": run_id, "prefix": prefix, "local_dir": str(bundle), "manifest": manifest,
            "timings": timings, "text_prefix": text_prefix, "lineage": lineage}


def main(cfg: Any) -> Dict[str, Any]:
    from jobs.embed_items import embed_items

    storage = Storage.from_config(cfg.storage)
    ds = resolve_dataset(storage, cfg)
    run_id = cfg.train.run_id or ck.new_run_id()
    with ray_session(cfg.ray):
        text_prefix = embed_items(cfg, storage, ds, f"{run_id}-base")["prefix"] if cfg.retriever.use_text else None
        out = train(cfg, storage, ds, run_id, text_prefix)
    print(f"trained {run_id}: {storage.uri(out['prefix'])} {out['timings']}")
    return out


if __name__ == "__main__":
    run_cli(main)
