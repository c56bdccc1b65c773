"""Offline evaluation: the recommender's final ranking (retriever + ranker), slices, baselines
and the new-item variant (torch/numpy, no Ray)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from components.models.baselines import ItemKNN, MostPopular, item_counts
from components.models.channels import Channels
from components.evaluation.metrics import coverage, evaluate_scorer, popularity_deciles, rank_and_topk, ranking_metrics
from components.models.ranker import RankerMLP, context_features, item_stats
from components.models.retriever import RetrieverConfig, SequenceRetriever
from components.training.retriever import (RetrieverTrainConfig, batches, item_table, log_q_from_counts,
                                           lr_schedule, plan_budget, retriever_scores, user_vectors)
from components.data.sequences import UserHistories, history_for, training_windows


def fit_retriever_local(h: UserHistories, text: Optional[torch.Tensor], rcfg: RetrieverConfig,
                        tcfg: RetrieverTrainConfig, known_items: Optional[np.ndarray] = None) -> SequenceRetriever:
    """In-process training with plain AdamW (baselines and variants); best epoch on valid.

    ``known_items`` (bool per item) limits the softmax to the items that exist at training
    time; the others get a zero ID embedding, as items added after training have in serving."""
    rcfg = replace(rcfg, num_items=h.num_items, text_dim=text.shape[1] if (rcfg.use_text and text is not None) else 0)
    torch.manual_seed(tcfg.seed)
    model = SequenceRetriever(rcfg)
    text_emb = torch.cat([torch.zeros(1, text.shape[1]), text]) if rcfg.use_text else None
    log_q = log_q_from_counts(np.bincount(np.concatenate(h.items), minlength=h.num_items))
    windows = training_windows(h, rcfg.max_len)
    budget = plan_budget(tcfg, windows)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = lr_schedule(opt, tcfg, budget.epochs * budget.steps_per_epoch)
    mask = torch.as_tensor(known_items) if known_items is not None else None
    best, best_state, bad = -1.0, None, 0
    for epoch in range(budget.epochs):
        model.train()
        for batch in batches(windows, budget.batch_size, np.random.default_rng([tcfg.seed, epoch])):
            loss = model(batch, text_emb, log_q, mask)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if sched is not None:
                sched.step()
        last = epoch == budget.epochs - 1
        if last or (tcfg.eval_every and (epoch + 1) % tcfg.eval_every == 0):
            s, t, hist = retriever_scores(model, text_emb, h, "valid")
            ndcg = ranking_metrics(rank_and_topk(s, t, hist)[0], (10,))["ndcg@10"]
            if ndcg > best:
                best, bad = ndcg, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
            if tcfg.patience and bad >= tcfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    if known_items is not None and rcfg.use_id:
        with torch.no_grad():
            model.id_emb.weight[1:][torch.as_tensor(~known_items)] = 0.0
    model.eval()
    return model


def text_table(text: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if text is None else torch.cat([torch.zeros(1, text.shape[1]), text])


def scored_lists(retriever: SequenceRetriever, channels: Optional[Channels], text: Optional[torch.Tensor],
                 h: UserHistories, split: str, categories: List[List[str]], candidates: int,
                 topk: int = 100) -> Dict[str, Any]:
    """Everything the ranker needs for ``split``: fused channel scores over the catalog (the
    retriever alone without ``channels``), the target ranks and top lists under that order, and
    the ranker's inputs for the first ``candidates`` of each list (user and item vectors,
    context features). Shared by ranker training (jobs.train) and evaluation."""
    te = text_table(text) if retriever.cfg.use_text else None
    raw, targets, hist = retriever_scores(retriever, te, h, split)
    users, items, events, ts, _ = history_for(h, split)
    if channels is not None:
        fused, z = channels.scores(raw, hist)
    else:
        fused, z = raw, {}
    ranks, top = rank_and_topk(fused.clone(), targets, hist, max(topk, candidates))
    cand = top[:, :candidates]
    if candidates == 0:  # no ranker: the order is all that is needed
        return {"top": top, "cand": cand, "ranks": ranks, "targets": targets, "users": users}
    cz = {name: np.take_along_axis(x.numpy(), cand, 1) for name, x in z.items()}
    stats = item_stats(h.items, h.ts, categories, text)
    ctx = context_features(stats, cand, np.take_along_axis(fused.numpy(), cand, 1), items, ts, events, cz)
    table = item_table(retriever, te)
    positive = np.array([int(np.flatnonzero(cand[r] == targets[r])[0]) if (cand[r] == targets[r]).any() else -1
                         for r in range(len(targets))], dtype=np.int64)
    return {"u": user_vectors(retriever, te, items, events, ts), "i": table[torch.as_tensor(cand)], "ctx": ctx,
            "top": top, "cand": cand, "positive": positive, "ranks": ranks, "targets": targets, "users": users}


def final_ranking(retriever: SequenceRetriever, ranker: Optional[RankerMLP], text: Optional[torch.Tensor],
                  h: UserHistories, split: str, categories: List[List[str]], topk: int = 100,
                  channels: Optional[Channels] = None):
    """Ranks of the targets and top-``topk`` lists: the fused channel order (the retriever's
    alone without ``channels``), with the ranker re-scoring its first ``ranker.cfg.candidates``
    when given. Returns (ranks, top, targets, users)."""
    C = ranker.cfg.candidates if ranker is not None else 0
    lists = scored_lists(retriever, channels, text, h, split, categories, C, topk)
    ranks, top, targets, users = lists["ranks"], lists["top"], lists["targets"], lists["users"]
    if ranker is None:
        return ranks, top[:, :topk], targets, users
    cand = lists["cand"]
    with torch.no_grad():
        ranker.eval()
        s = ranker(lists["u"], lists["i"], lists["ctx"]).numpy()
    order = np.argsort(-s, axis=1, kind="stable")
    reranked = np.concatenate([np.take_along_axis(cand, order, 1), top[:, C:]], 1)[:, :topk]
    new_ranks = ranks.copy()
    for r in range(len(targets)):
        hit = np.flatnonzero(reranked[r] == targets[r])
        if ranks[r] < C:  # the ranker only moves items inside the candidate list
            new_ranks[r] = int(hit[0]) if len(hit) else ranks[r]
    return new_ranks, reranked, targets, users


def fit_channels(retriever: SequenceRetriever, text: Optional[torch.Tensor], h: UserHistories) -> tuple[Channels, Dict]:
    """Channels over the training histories, fusion weights fitted on valid NDCG@10."""
    te = text_table(text) if retriever.cfg.use_text else None
    raw, targets, hist = retriever_scores(retriever, te, h, "valid")
    channels = Channels.fit_data(h.items, h.num_items, text)

    def objective(fused: torch.Tensor) -> float:
        return ranking_metrics(rank_and_topk(fused.clone(), targets, hist)[0], (10,))["ndcg@10"]

    retriever_only = objective(raw)
    fit = channels.fit_weights(raw, hist, objective)
    fit["valid_ndcg@10_retriever"] = retriever_only
    return channels, fit


def slice_masks(h: UserHistories, users: np.ndarray, targets: np.ndarray, rare_max: int, short_max: int,
                split: str = "test") -> Dict[str, np.ndarray]:
    counts = item_counts(h.items, h.num_items)
    hist_len = np.array([len(h.items[u]) for u in users])
    masks = {"all": np.ones(len(targets), bool), f"rare_items(<={rare_max})": counts[targets] <= rare_max,
             f"short_history(<={short_max})": hist_len <= short_max}
    dec = popularity_deciles(counts, targets)
    for d in range(10):
        masks[f"pop_decile_{d}"] = dec == d
    return masks


def baseline_rankings(h: UserHistories, split: str, topk: int = 100) -> Dict[str, tuple]:
    """MostPopular and ItemKNN on the same split: name -> (ranks, top)."""
    users, items, _, _, targets = history_for(h, split)
    out = {}
    for name, model in (("MostPopular", MostPopular(h.items, h.num_items)), ("ItemKNN", ItemKNN(h.items, h.num_items))):
        out[name] = evaluate_scorer(lambda rows, m=model: m.scores([items[r] for r in rows]), targets, items, topk)
    return out


def new_item_histories(h: UserHistories, frac: float) -> tuple[UserHistories, np.ndarray]:
    """The new-item variant: the ``frac`` of items that appear last (by first train interaction)
    lose every training interaction. Returns (filtered histories, new-item mask)."""
    first = np.full(h.num_items, np.iinfo(np.int64).max)
    for it, ts in zip(h.items, h.ts):
        np.minimum.at(first, it, ts)
    for t in (h.valid, h.test):  # items only seen in valid/test count as newest
        np.minimum.at(first, t["item_idx"], np.where(first[t["item_idx"]] == np.iinfo(np.int64).max,
                                                     t["ts"], first[t["item_idx"]]))
    n_new = max(1, int(round(frac * h.num_items)))
    new = np.zeros(h.num_items, bool)
    new[np.argsort(first, kind="stable")[-n_new:]] = True
    keep = [~new[it] for it in h.items]
    return UserHistories([it[k] for it, k in zip(h.items, keep)], [e[k] for e, k in zip(h.events, keep)],
                         [t[k] for t, k in zip(h.ts, keep)], h.valid, h.test, h.num_items), new


def summarize(ranks: np.ndarray, top: np.ndarray, num_items: int, ks=(10, 20)) -> Dict[str, Any]:
    m = ranking_metrics(ranks, ks)
    m["coverage@10"] = coverage(top, num_items, 10)
    return m


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, round(time.perf_counter() - t0, 2)
