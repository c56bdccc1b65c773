"""Training and scoring helpers for the retriever, shared by the Ray Train worker, the
in-process baselines and the evaluator (torch only, no Ray)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from components.models.retriever import SequenceRetriever
from components.data.sequences import UserHistories, history_for, inference_inputs, trim_padding


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


@torch.no_grad()
def user_vectors(model: SequenceRetriever, text_emb: Optional[torch.Tensor], items: Sequence[np.ndarray],
                 events: Sequence[np.ndarray], ts: Sequence[np.ndarray], batch: int = 256) -> torch.Tensor:
    model.eval()
    out = []
    for s in range(0, len(items), batch):
        x = trim_padding(inference_inputs(items[s:s + batch], events[s:s + batch], ts[s:s + batch], model.cfg.max_len))
        out.append(model.user_vector(torch.as_tensor(x["items"]), torch.as_tensor(x["events"]),
                                     torch.as_tensor(x["gaps"]), text_emb))
    return torch.cat(out) if out else torch.empty(0, model.cfg.dim)


@torch.no_grad()
def item_table(model: SequenceRetriever, text_emb: Optional[torch.Tensor]) -> torch.Tensor:
    """[num_items, dim] item vectors (0-based rows)."""
    model.eval()
    return model.item_vectors(text_emb)[1:]


def retriever_scores(model: SequenceRetriever, text_emb: Optional[torch.Tensor], h: UserHistories,
                     split: str) -> tuple[torch.Tensor, np.ndarray, List[np.ndarray]]:
    """(scores [users with a target, num_items], 0-based targets, histories) for ``split``."""
    users, items, events, ts, targets = history_for(h, split)
    u = user_vectors(model, text_emb, items, events, ts)
    return u @ item_table(model, text_emb).T, targets, items

