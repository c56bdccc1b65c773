"""The recommender's rankings over the catalog (torch/numpy, no Ray): the retriever's scores, the
fused channels' order, the ranker's re-scoring of its candidates, the channel fusion fit, the
baselines, slices and the new-item variant's histories."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from components.data.sequences import UserHistories, history_for, inference_inputs, trim_padding, user_hash
from components.evaluation.metrics import coverage, evaluate_scorer, popularity_deciles, rank_and_topk, ranking_metrics
from components.models.baselines import ItemKNN, MostPopular, item_counts
from components.models.channels import Channels
from components.models.ranker import RankerMLP, context_features, item_stats
from components.models.retriever import SequenceRetriever


# Rows (users) scored at once are bounded so that a [rows, items] matrix holds at most this many
# cells: lists for 22k users x 12k items are built in ~14 chunks, never as one 1 GB matrix per channel.
CHUNK_CELLS = 20_000_000
# The fusion fit scores the valid users' [users, items] matrices a few hundred times (every grid
# point): it reads a fixed sample of at most this many cells (users chosen by a hash of the user
# id, ``fit_rows``). Every shared dataset fits whole (Scientific: 45M cells); Amazon Beauty
# (22k users x 12k items) fits on ~5k users.
FIT_CELLS = 60_000_000


def chunk_rows(num_items: int, cells: int = CHUNK_CELLS, batch: int = 256) -> int:
    """Users per chunk: at most ``cells`` [users, items] cells, a multiple of ``user_vectors``'s
    batch (the same batches, hence the same numbers, as scoring everyone at once)."""
    return max(batch, cells // max(num_items, 1) // batch * batch)


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


def retriever_ranks(model: SequenceRetriever, text_emb: Optional[torch.Tensor], h: UserHistories, split: str,
                    chunk_cells: int = CHUNK_CELLS, shard: tuple[int, int] = (0, 1)) -> np.ndarray:
    """The ranks of ``split``'s targets under the retriever alone (``retriever_scores`` ranked),
    scored in chunks of at most ``chunk_cells`` [users, items] cells. ``shard=(rank, world)``:
    only every ``world``-th target from ``rank`` (data-parallel workers split an evaluation)."""
    users, items, events, ts, targets = history_for(h, split)
    rank, world = shard
    if world > 1:
        items, events, ts, targets = items[rank::world], events[rank::world], ts[rank::world], targets[rank::world]
    table = item_table(model, text_emb)
    step = chunk_rows(h.num_items, chunk_cells)
    ranks = [rank_and_topk(user_vectors(model, text_emb, items[s:s + step], events[s:s + step], ts[s:s + step]) @ table.T,
                           targets[s:s + step], items[s:s + step], topk=0)[0] for s in range(0, len(targets), step)]
    return np.concatenate(ranks) if ranks else np.empty(0, np.int64)


def text_table(text: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if text is None else torch.cat([torch.zeros(1, text.shape[1]), text])


def fit_rows(users: np.ndarray, num_items: int, cells: int = FIT_CELLS) -> np.ndarray:
    """Rows of ``users`` a fit reads: all of them when ``users x num_items <= cells``, else the
    ``cells // num_items`` rows with the smallest hash of their user id (fixed across runs)."""
    n = len(users)
    keep = max(1, cells // max(num_items, 1))
    if n <= keep:
        return np.arange(n)
    return np.sort(np.argsort(user_hash(users), kind="stable")[:keep])


def _concat(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {k: (torch.cat([p[k] for p in parts]) if isinstance(parts[0][k], torch.Tensor)
                else np.concatenate([p[k] for p in parts])) for k in parts[0]}


def scored_lists(retriever: SequenceRetriever, channels: Optional[Channels], text: Optional[torch.Tensor],
                 h: UserHistories, split: str, categories: List[List[str]], candidates: int,
                 topk: int = 100, chunk_cells: int = CHUNK_CELLS) -> Dict[str, Any]:
    """Everything the ranker needs for ``split``: fused channel scores over the catalog (the
    retriever alone without ``channels``), the target ranks and top lists under that order, and
    the ranker's inputs for the first ``candidates`` of each list (user and item vectors,
    context features). Shared by ranker training (jobs.train) and evaluation. Users are scored in
    chunks of at most ``chunk_cells`` [users, items] cells; only the lists are kept."""
    te = text_table(text) if retriever.cfg.use_text else None
    users, items, events, ts, targets = history_for(h, split)
    table = item_table(retriever, te)
    stats = item_stats(h.items, h.ts, categories) if candidates else None
    step = chunk_rows(h.num_items, chunk_cells)
    parts = []
    for s in range(0, max(len(targets), 1), step):
        sl = slice(s, s + step)
        part = _lists(retriever, te, table, channels, stats, items[sl], events[sl], ts[sl], targets[sl],
                      candidates, topk)
        parts.append({**part, "users": users[sl]})
    return _concat(parts)


def _lists(retriever: SequenceRetriever, te: Optional[torch.Tensor], table: torch.Tensor,
           channels: Optional[Channels], stats: Any, items: List[np.ndarray], events: List[np.ndarray],
           ts: List[np.ndarray], targets: np.ndarray, candidates: int, topk: int) -> Dict[str, Any]:
    """``scored_lists`` for one chunk of users."""
    u = user_vectors(retriever, te, items, events, ts)
    raw = u @ table.T
    if channels is not None:
        fused, z = channels.scores(raw, items)
    else:
        fused, z = raw, {}
    ranks, top = rank_and_topk(fused.clone(), targets, items, max(topk, candidates))
    cand = top[:, :candidates]
    if candidates == 0:  # no ranker: the order is all that is needed
        return {"top": top, "cand": cand, "ranks": ranks, "targets": targets}
    cz = {name: np.take_along_axis(x.numpy(), cand, 1) for name, x in z.items()}
    ctx = context_features(stats, cand, np.take_along_axis(fused.numpy(), cand, 1), items, ts, events, cz)
    positive = np.array([int(np.flatnonzero(cand[r] == targets[r])[0]) if (cand[r] == targets[r]).any() else -1
                         for r in range(len(targets))], dtype=np.int64)
    return {"u": u, "i": table[torch.as_tensor(cand)], "ctx": ctx, "top": top, "cand": cand, "positive": positive,
            "ranks": ranks, "targets": targets}


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


def fit_channels(retriever: SequenceRetriever, text: Optional[torch.Tensor], h: UserHistories,
                 cells: int = FIT_CELLS, new_frac: float = 0.1) -> tuple[Channels, Dict]:
    """Channels over the training histories, fusion weights fitted on valid NDCG@10 (on the
    ``fit_rows`` sample of valid users when the valid scores would exceed ``cells``), then the
    weights of items without interactions (``Channels.fit_cold``) on the same users' valid with
    the newest ``new_frac`` of the items made new as serving sees an item added through the API:
    no interactions (``new_item_histories``), hence no co-visits and no popularity, and no ID
    embedding in the retriever's item vector. (The retriever itself was trained with those
    interactions: what it learnt from them elsewhere is a small leak into three numbers.)"""
    te = text_table(text) if retriever.cfg.use_text else None
    users, items, events, ts, targets = history_for(h, "valid")
    rows = fit_rows(users, h.num_items, cells)
    hist = [items[r] for r in rows]
    targets = targets[rows]
    raw = user_vectors(retriever, te, hist, [events[r] for r in rows], [ts[r] for r in rows]) @ item_table(retriever, te).T
    channels = Channels.fit_data(h.items, h.num_items, text)

    def objective(fused: torch.Tensor, hist: Sequence[np.ndarray] = hist) -> float:  # fused: ranked in place
        return ranking_metrics(rank_and_topk(fused, targets, hist, topk=0)[0], (10,))["ndcg@10"]

    retriever_only = objective(raw.clone())
    fit = channels.fit_weights(raw, hist, objective)
    fit.update({"valid_ndcg@10_retriever": retriever_only, "fit_users": int(len(rows)), "valid_users": int(len(users))})
    del raw
    hn, new = new_item_histories(h, new_frac)
    _, items, events, ts, _ = history_for(hn, "valid")
    hist_n = [items[r] for r in rows]
    hide = torch.cat([torch.zeros(1, dtype=torch.bool), torch.as_tensor(new)])
    with torch.no_grad():
        table = retriever.eval().item_vectors(te, hide_ids=hide)[1:]
    raw = user_vectors(retriever, te, hist_n, [events[r] for r in rows], [ts[r] for r in rows]) @ table.T
    simulated = Channels.fit_data(hn.items, h.num_items, text, channels.cfg)
    fit.update(simulated.fit_cold(simulated.channel_scores(raw, hist_n),
                                  lambda fused: objective(fused, hist_n)))
    fit["new_item_targets"] = int(new[targets].sum())
    channels.cfg.cold = fit["cold"]
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
