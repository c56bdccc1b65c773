"""Full-ranking metrics with history exclusion, and slices (numpy/torch, no Ray)."""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import numpy as np
import torch


def rank_and_topk(scores: torch.Tensor, targets: np.ndarray, histories: Sequence[np.ndarray],
                  topk: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Rank (0-based) of each target among all items, with the user's history excluded.

    The history is excluded as serving excludes it, the target included: a target the user
    already has (a repeat, possible only in data kept without de-duplication) is a miss, with
    rank ``num_items``, as in the reference peer's protocol.

    Args:
        scores: [B, num_items] float scores (modified in place: history -> -inf).
        targets: [B] 0-based target item codes.
        histories: per row, the 0-based items to exclude.
        topk: how many top items to return (0: none, the ranks only).

    Returns:
        (ranks [B], top [B, topk] item codes in rank order).
    """
    scores = scores.float()
    lens = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    rows = np.repeat(np.arange(len(histories)), lens)
    cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) if lens.sum() else np.empty(0, np.int64)
    repeat = np.bincount(rows[cols == np.asarray(targets, dtype=np.int64)[rows]], minlength=len(targets)) > 0
    scores[torch.as_tensor(rows), torch.as_tensor(cols)] = float("-inf")
    t = torch.as_tensor(targets, dtype=torch.long)
    target_score = scores.gather(1, t[:, None])
    # Ties count against the model (pessimistic), so a constant scorer gets no free hits.
    ranks = ((scores >= target_score).sum(1) - 1).numpy()
    ranks[repeat] = scores.shape[1]
    if topk <= 0:
        return ranks, np.empty((len(targets), 0), dtype=np.int64)
    top = torch.topk(scores, min(topk, scores.shape[1]), dim=1).indices
    return ranks, top.numpy()


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = (10, 20)) -> Dict[str, float]:
    """Recall@K (= hit rate with one target), NDCG@K and MRR@K from 0-based ranks."""
    ranks = np.asarray(ranks)
    out: Dict[str, float] = {"n": int(len(ranks))}
    if len(ranks) == 0:
        return out
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).mean())
    return out


def coverage(top: np.ndarray, num_items: int, k: int = 10) -> float:
    """Share of the catalog that appears in anyone's top-k."""
    return float(len(np.unique(top[:, :k])) / max(num_items, 1))


def sliced_metrics(ranks: np.ndarray, masks: Dict[str, np.ndarray], ks: Sequence[int] = (10, 20)) -> Dict[str, Dict]:
    return {name: ranking_metrics(ranks[m], ks) for name, m in masks.items()}


def popularity_deciles(item_counts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Decile (0 = least popular, 9 = most) of each target by train interaction count."""
    order = np.argsort(item_counts, kind="stable")
    decile_of = np.empty(len(item_counts), dtype=np.int64)
    decile_of[order] = np.minimum(9, np.arange(len(item_counts)) * 10 // max(len(item_counts), 1))
    return decile_of[targets]


def batched_scores(score_fn: Callable[[np.ndarray], torch.Tensor], rows: int, batch: int = 256):
    """Yield (start, scores) over row batches so the full [users, items] matrix never exists."""
    for start in range(0, rows, batch):
        yield start, score_fn(np.arange(start, min(rows, start + batch)))


def evaluate_scorer(score_fn: Callable[[np.ndarray], torch.Tensor], targets: np.ndarray,
                    histories: List[np.ndarray], topk: int = 100, batch: int = 256):
    """score_fn(row indices) -> [b, num_items]; returns (ranks, top)."""
    ranks, tops = [], []
    for start, scores in batched_scores(score_fn, len(targets), batch):
        stop = start + scores.shape[0]
        r, t = rank_and_topk(scores, targets[start:stop], histories[start:stop], topk)
        ranks.append(r)
        tops.append(t)
    return np.concatenate(ranks), np.concatenate(tops)
