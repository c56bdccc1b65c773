"""The retriever's one training loop, run by the Ray Train worker (a DeepSpeed stepper), the
in-process baselines and jobs.quick_train (an AdamW stepper), with its budget and batches
(torch only, no Ray)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import torch

from components.data.sequences import UserHistories, training_windows, trim_padding
from components.evaluation.metrics import ranking_metrics
from components.evaluation.ranking import retriever_ranks
from components.models.retriever import RetrieverConfig, SequenceRetriever
from components.training.stepper import LocalStepper


@dataclass
class RetrieverTrainConfig:
    # At most this many epochs (fewer when ``max_tokens`` caps them or early stopping ends them).
    epochs: int = 200
    # Batch per worker; shrunk on small data so that every worker takes at least
    # ``min_steps_per_epoch`` optimizer steps an epoch (450 users in batches of 64 on two
    # workers would be 3-4 steps an epoch: the model never trains).
    batch_size: int = 32
    min_steps_per_epoch: int = 16
    # Training-token budget: epochs are capped at max_tokens / (tokens in one epoch), so a large
    # dataset gets fewer passes and a small one more (0: no cap).
    max_tokens: int = 1_500_000
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    # Evaluate on valid every N epochs and keep the best (0: only at the end).
    eval_every: int = 2
    # Stop after this many evaluations without improvement on valid NDCG@10 (0: never).
    patience: int = 5
    # Learning-rate schedule: "constant" (with early stopping: measured best on Amazon Gift
    # Cards) or "onecycle" (warm-up to ``lr`` over ``warmup`` of the steps, then cosine decay to
    # ~0 at the last epoch: for a fixed, short budget).
    schedule: str = "constant"
    warmup: float = 0.05


@dataclass
class Budget:
    batch_size: int
    epochs: int
    steps_per_epoch: int
    tokens_per_epoch: int


def plan_budget(tcfg: RetrieverTrainConfig, windows: Dict[str, np.ndarray], world: int = 1) -> Budget:
    """The settings that depend on the data's size, derived from it (same for every loop)."""
    n = len(windows["items"])
    tokens = int((windows["targets"] != 0).sum())
    batch = max(1, min(tcfg.batch_size, -(-n // (tcfg.min_steps_per_epoch * world))))
    epochs = tcfg.epochs
    if tcfg.max_tokens > 0 and tokens > 0:
        epochs = max(1, min(epochs, tcfg.max_tokens // tokens))
    return Budget(batch, epochs, steps_per_epoch(windows, batch, world), tokens)


def batches(windows: Dict[str, np.ndarray], batch_size: int, rng: np.random.Generator, rank: int = 0,
            world: int = 1) -> Iterator[Dict[str, torch.Tensor]]:
    """Shuffled mini-batches of this rank's share, grouped by length: windows of similar length
    share a batch, so left padding (trimmed per batch) costs little compute. Every rank gets
    the same number of batches, as collective ops in data-parallel training require."""
    n = len(windows["items"])
    lengths = (windows["targets"] != 0).sum(1)
    # Random order, then a stable sort by length: ties stay random, batches stay homogeneous.
    order = rng.permutation(n)
    order = order[np.argsort(-lengths[order], kind="stable")]
    chunks = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    chunks = [chunks[k] for k in rng.permutation(len(chunks))]
    per_rank = len(chunks) // world if world > 1 else len(chunks)
    for idx in chunks[rank * per_rank:(rank + 1) * per_rank]:
        yield {k: torch.as_tensor(v) for k, v in trim_padding({k: v[idx] for k, v in windows.items()}).items()}


def steps_per_epoch(windows: Dict[str, np.ndarray], batch_size: int, world: int = 1) -> int:
    """Optimizer steps per epoch of ``batches`` on each rank."""
    chunks = -(-len(windows["items"]) // batch_size)
    return max(1, chunks // world if world > 1 else chunks)


def lr_schedule(opt: torch.optim.Optimizer, tcfg: RetrieverTrainConfig,
                steps: int) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    """``steps``: all optimizer steps of the run (epochs x steps per epoch)."""
    """The schedule ``tcfg.schedule`` over ``steps`` optimizer steps (None: constant lr)."""
    if tcfg.schedule == "constant":
        return None
    if tcfg.schedule != "onecycle":
        raise ValueError(f"train.retriever.schedule must be onecycle or constant; got {tcfg.schedule!r}")
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tcfg.lr, total_steps=max(2, steps),
                                               pct_start=tcfg.warmup, anneal_strategy="cos")


def log_q_from_counts(counts: np.ndarray) -> torch.Tensor:
    """Sampling log-probabilities (smoothed popularity) for sampled softmax; row 0 = padding."""
    q = np.concatenate([[0.0], counts + 1.0])
    q = q / q.sum()
    with np.errstate(divide="ignore"):
        return torch.as_tensor(np.log(q), dtype=torch.float32)




@dataclass
class RetrieverInputs:
    """What the loop trains on: next-item windows, the text table (row 0 padding), the sampling
    log-probabilities, the histories (for validation) and an optional mask of known items."""

    windows: Dict[str, np.ndarray]
    text_emb: Optional[torch.Tensor]
    log_q: torch.Tensor
    histories: UserHistories
    known: Optional[torch.Tensor] = None


def retriever_inputs(h: UserHistories, text: Optional[torch.Tensor], rcfg: RetrieverConfig,
                     known_items: Optional[np.ndarray] = None) -> RetrieverInputs:
    """``text``: [num_items, dim] (0-based rows) or None. ``known_items`` (bool per item) limits the
    softmax to the items that exist at training time."""
    text_emb = torch.cat([torch.zeros(1, text.shape[1]), text]) if (rcfg.use_text and text is not None) else None
    log_q = log_q_from_counts(np.bincount(np.concatenate(h.items), minlength=h.num_items))
    return RetrieverInputs(training_windows(h, rcfg.max_len), text_emb, log_q, h,
                           torch.as_tensor(known_items) if known_items is not None else None)


def new_retriever(h: UserHistories, text: Optional[torch.Tensor], rcfg: RetrieverConfig,
                  seed: int) -> SequenceRetriever:
    """A fresh retriever sized to the data (identical on every rank: seeded)."""
    rcfg = replace(rcfg, num_items=h.num_items, text_dim=text.shape[1] if (rcfg.use_text and text is not None) else 0)
    torch.manual_seed(seed)
    model = SequenceRetriever(rcfg)
    if rcfg.use_text and text is not None:
        model.fit_text_whitening(torch.as_tensor(text))  # a no-op unless retriever.text_whiten
    return model


def valid_metrics(model: SequenceRetriever, x: RetrieverInputs, rank: int = 0, world: int = 1,
                  mean: Callable[[float], float] = float) -> Dict[str, float]:
    """Valid metrics of ``model``; with ``world`` > 1 each worker ranks its share of the users and
    ``mean`` (the stepper's all-reduce average) combines the sums, so every worker gets the
    figures of all users for half (a ``world``-th) of the work."""
    ranks = retriever_ranks(model, x.text_emb, x.histories, "valid", shard=(rank, world))
    local = ranking_metrics(ranks)
    if world == 1:
        return local
    n = mean(float(len(ranks)))
    out: Dict[str, float] = {"n": int(round(n * world))}
    for k in (k for k in ranking_metrics(np.zeros(1)) if k != "n"):
        out[k] = mean(local.get(k, 0.0) * len(ranks)) / n if n > 0 else 0.0
    return out


def new_progress() -> Dict[str, Any]:
    return {"epoch": -1, "best": -1.0, "best_epoch": -1, "bad_evals": 0, "resumed_from": None, "_best_state": None}


def train_retriever(stepper, x: RetrieverInputs, tcfg: RetrieverTrainConfig, budget: Budget,
                    progress: Optional[Dict[str, Any]] = None, rank: int = 0, world: int = 1,
                    before_epoch: Callable[[int], None] = lambda epoch: None,
                    after_epoch: Callable[[Dict[str, Any], Dict[str, Any], bool, bool], None] = lambda *a: None,
                    tick: Callable[..., None] = lambda *a, **k: None) -> Dict[str, Any]:
    """Epochs of next-item training on this rank's share of the windows, evaluated on valid every
    ``tcfg.eval_every`` epochs (and at the last); the best evaluation's weights are kept and the
    run stops after ``tcfg.patience`` evaluations without improvement.

    ``progress`` (from ``new_progress`` or a resumed checkpoint) is updated in place and returned;
    ``progress["_best_state"]`` holds the best weights. ``after_epoch(metrics, progress, improved,
    last)`` is where a worker reports and checkpoints; ``tick`` drives a progress bar."""
    progress = progress or new_progress()
    if progress["epoch"] >= 0:
        progress["resumed_from"] = progress["epoch"]
    tick(0, total=budget.epochs * budget.steps_per_epoch, force=True)
    extra = [x.known] if x.known is not None else []
    for epoch in range(progress["epoch"] + 1, budget.epochs):
        before_epoch(epoch)
        t0, cpu0 = time.perf_counter(), time.process_time()
        stepper.train()
        total, n, tokens = 0.0, 0, 0
        for batch in batches(x.windows, budget.batch_size, np.random.default_rng([tcfg.seed, epoch]), rank, world):
            loss = stepper(batch, x.text_emb, x.log_q, *extra)
            stepper.step(loss)
            total, n, tokens = total + float(loss.item()), n + 1, tokens + int((batch["targets"] > 0).sum())
            tick(1, epoch=epoch)
        wall = time.perf_counter() - t0
        metrics = {"epoch": epoch, "loss": stepper.mean(total / max(n, 1)), "epoch_s": round(wall, 2),
                   "resumed_from": progress["resumed_from"], "steps": n,
                   # per worker, averaged over workers: target tokens a second, and the cores it
                   # kept busy (process CPU time over wall time; its torch threads at most)
                   "tokens_per_s_per_worker": round(stepper.mean(tokens / max(wall, 1e-9)), 1),
                   "cpu_busy_per_worker": round(stepper.mean((time.process_time() - cpu0) / max(wall, 1e-9)), 2)}
        last = epoch == budget.epochs - 1
        improved = False
        if last or (tcfg.eval_every > 0 and (epoch + 1) % tcfg.eval_every == 0):
            with stepper.full_params():
                m = valid_metrics(stepper.module, x, rank, world, stepper.mean)
            metrics.update({f"valid_{k}": v for k, v in m.items() if k != "n"})
            if m["ndcg@10"] > progress["best"]:
                progress.update(best=m["ndcg@10"], best_epoch=epoch, bad_evals=0,
                                best_metrics={f"valid_{k}": v for k, v in m.items()}, _best_state=stepper.state())
                improved = True
            else:
                progress["bad_evals"] += 1
            early = bool(tcfg.patience) and progress["bad_evals"] >= tcfg.patience and not last
            last = last or early
            tick(0, force=True, valid_ndcg10=m["ndcg@10"], **({"stopped": "early"} if early else {}))
        progress["epoch"] = epoch
        metrics["best_epoch"] = progress["best_epoch"]
        after_epoch(metrics, progress, improved, last)
        if last:
            break
    return progress


def fit_retriever_local(h: UserHistories, text: Optional[torch.Tensor], rcfg: RetrieverConfig,
                        tcfg: RetrieverTrainConfig, known_items: Optional[np.ndarray] = None) -> SequenceRetriever:
    """``train_retriever`` in this process with AdamW (baselines, variants, quick bundles); the
    best epoch on valid. With ``known_items`` the other items get a zero ID embedding, as items
    added after training have in serving."""
    model = new_retriever(h, text, rcfg, tcfg.seed)
    x = retriever_inputs(h, text, model.cfg, known_items)
    budget = plan_budget(tcfg, x.windows)
    stepper = LocalStepper(model, tcfg.lr, tcfg.weight_decay,
                           schedule=lambda opt: lr_schedule(opt, tcfg, budget.epochs * budget.steps_per_epoch))
    progress = train_retriever(stepper, x, tcfg, budget)
    if progress["_best_state"] is not None:
        model.load_state_dict(progress["_best_state"])
    # How the run ended, for the record (benchmarks.tune): a best epoch near the budget says more passes may help.
    model.fit_progress = {"epochs_run": progress["epoch"] + 1, "best_epoch": progress["best_epoch"],
                          "budget_epochs": budget.epochs, "best_valid_ndcg@10": progress["best"]}
    if known_items is not None and model.cfg.use_id:
        with torch.no_grad():
            model.id_emb.weight[1:][torch.as_tensor(~known_items)] = 0.0
    return model.eval()
