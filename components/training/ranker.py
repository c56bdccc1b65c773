"""The ranker's one training loop (torch only, no Ray): listwise softmax over the fused channels'
candidate lists of the valid targets, the epoch picked on held-out lists, the untrained residual
(the fused order itself) included as a candidate. Run by the Ray Train worker (a DeepSpeed
stepper) and jobs.quick_train (an AdamW stepper)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from components.evaluation.metrics import ranking_metrics
from components.models.ranker import RankerConfig, RankerMLP, holdout_rows, listwise_loss
from components.training.stepper import LocalStepper


def split_lists(lists: Dict[str, Any], kcfg: RankerConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rows to fit on, held-out rows): the lists whose target is among the candidates, split by
    ``holdout_rows`` (the evaluation holds out the same rows)."""
    users = np.flatnonzero(lists["positive"] >= 0)
    held = holdout_rows(users, kcfg.holdout)
    return np.setdiff1d(users, held), held


@torch.no_grad()
def holdout_ndcg(model: RankerMLP, lists: Dict[str, Any], rows: np.ndarray) -> float:
    """NDCG@10 of the ranker's order of the ``rows`` lists (the target's rank among the candidates)."""
    if len(rows) == 0:
        return 0.0
    model.eval()
    s = model(lists["u"][rows], lists["i"][rows], lists["ctx"][rows])
    order = torch.argsort(s, dim=1, descending=True).numpy()
    ranks = np.array([int(np.flatnonzero(order[k] == lists["positive"][r])[0]) for k, r in enumerate(rows)])
    return ranking_metrics(ranks, (10,))["ndcg@10"]


def steps_per_epoch(fit: np.ndarray, batch_size: int, world: int = 1) -> int:
    return len(range(0, max(len(fit) // world - batch_size + 1, 1), batch_size))


def new_progress() -> Dict[str, Any]:
    return {"epoch": -1, "best": -1.0, "best_epoch": -1, "_best_state": None}


def train_ranker(stepper, lists: Dict[str, Any], fit: np.ndarray, held: np.ndarray, kcfg: RankerConfig,
                 progress: Optional[Dict[str, Any]] = None, rank: int = 0, world: int = 1,
                 after_epoch: Callable[[Dict[str, Any], Dict[str, Any], bool, bool], None] = lambda *a: None,
                 tick: Callable[..., None] = lambda *a, **k: None) -> Dict[str, Any]:
    """``kcfg.epochs`` epochs over this rank's share of the ``fit`` lists (reshuffled every epoch),
    each scored on the ``held`` lists; the best of the untrained state and every epoch is kept in
    ``progress["_best_state"]``. ``after_epoch(metrics, progress, improved, last)``: report and
    checkpoint (a worker); ``tick``: a progress bar."""
    progress = progress or new_progress()
    if progress["epoch"] < 0:  # the untrained residual is the fused order: the bar to clear
        with stepper.full_params():
            m = holdout_ndcg(stepper.module, lists, held)
        progress.update(best=m, retriever_order_holdout_ndcg=m, best_metrics={"holdout_ndcg@10": m},
                        _best_state=stepper.state())
    tick(0, total=kcfg.epochs * steps_per_epoch(fit, kcfg.batch_size, world), force=True)
    for epoch in range(progress["epoch"] + 1, kcfg.epochs):
        stepper.train()
        order = np.random.default_rng([7, epoch]).permutation(fit)
        per = len(order) // world
        mine = order[rank * per:(rank + 1) * per]
        total, n = 0.0, 0
        for s in range(0, max(len(mine) - kcfg.batch_size + 1, 1), kcfg.batch_size):
            idx = mine[s:s + kcfg.batch_size]
            if len(idx) == 0:
                break
            loss = listwise_loss(stepper(lists["u"][idx], lists["i"][idx], lists["ctx"][idx]),
                                 torch.as_tensor(lists["positive"][idx]))
            stepper.step(loss)
            total, n = total + float(loss.item()), n + 1
            tick(1, epoch=epoch)
        with stepper.full_params():
            m = holdout_ndcg(stepper.module, lists, held)
        tick(0, force=True, holdout_ndcg10=m)
        metrics = {"epoch": epoch, "loss": stepper.mean(total / max(n, 1)), "holdout_ndcg@10": m,
                   "retriever_order_holdout_ndcg@10": progress.get("retriever_order_holdout_ndcg"),
                   "train_lists": int(len(fit)), "holdout_lists": int(len(held))}
        improved = m > progress["best"]
        if improved:
            progress.update(best=m, best_epoch=epoch, best_metrics={"holdout_ndcg@10": m}, _best_state=stepper.state())
        progress["epoch"] = epoch
        after_epoch(metrics, progress, improved, epoch == kcfg.epochs - 1)
    return progress


def fit_ranker_local(lists: Dict[str, Any], kcfg: RankerConfig, seed: int = 0) -> RankerMLP:
    """``train_ranker`` in this process with AdamW (quick bundles); the best epoch's weights."""
    fit, held = split_lists(lists, kcfg)
    torch.manual_seed(seed)
    model = RankerMLP(kcfg)
    progress = train_ranker(LocalStepper(model, kcfg.lr, kcfg.weight_decay), lists, fit, held, kcfg)
    model.load_state_dict(progress["_best_state"])
    return model.eval()
