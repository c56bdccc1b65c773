"""Candidate channels and their fusion (components.models.channels), and as-of ranker statistics."""

import numpy as np
import torch

from components.models.baselines import ItemKNN
from components.models.channels import Channels, FusionConfig, covisitation
from components.evaluation.metrics import rank_and_topk, ranking_metrics
from components.models.ranker import item_stats


def _histories():
    # Items 0-2 are bought together, 3-5 together; item 6 is rare.
    rng = np.random.default_rng(0)
    out = []
    for u in range(40):
        block = [0, 1, 2] if u % 2 else [3, 4, 5]
        out.append(rng.permutation(block))
    out.append(np.array([6, 0]))
    return out


def test_covisitation_keeps_top_neighbours_without_self():
    sim = covisitation(_histories(), 7, neighbors=2, shrink=0.0).toarray()
    assert np.all(np.diag(sim) == 0)
    assert np.all((sim > 0).sum(1) <= 2)
    assert sim[0, 1] > 0.9 and sim[0, 3] == 0  # same block vs other block
    assert np.allclose(sim[:6, :6], sim[:6, :6].T)


def test_itemknn_baseline_is_the_covisitation_channel():
    h = _histories()
    knn = ItemKNN(h, 7).scores([np.array([0]), np.array([3, 4])])
    ch = Channels.fit_data(h, 7, None).raw_scores("covisit", [np.array([0]), np.array([3, 4])], decay=1.0)
    assert torch.allclose(knn, ch)


def test_fusion_fit_is_never_worse_than_a_single_channel():
    h = _histories()
    ch = Channels.fit_data(h, 7, None)
    hist = [np.array([0]), np.array([3]), np.array([1]), np.array([4])]
    targets = np.array([2, 5, 2, 5])
    raw = torch.randn(4, 7, generator=torch.Generator().manual_seed(1))  # an uninformative retriever

    def objective(s):
        return ranking_metrics(rank_and_topk(s.clone(), targets, hist)[0], (10,))["ndcg@10"]

    alone = objective(raw)
    knn_alone = objective(ch.raw_scores("covisit", hist, 1.0))
    fit = ch.fit_weights(raw, hist, objective)
    assert fit["valid_ndcg@10"] >= max(alone, knn_alone) - 1e-9
    assert fit["weights"]["covisit"] > 0
    fused, z = ch.scores(raw, hist)
    assert objective(fused) == fit["valid_ndcg@10"]


def test_channels_round_trip_and_new_item_reached_through_text(tmp_path):
    h = _histories()
    text = torch.eye(7, 4)[:, :4] + 0.01
    ch = Channels.fit_data(h, 7, text, FusionConfig(weights={"retriever": 1.0, "covisit": 0.5, "text": 2.0}))
    ch.save(tmp_path)
    back = Channels.load(tmp_path, text)
    hist = [np.array([0, 1])]
    raw = torch.zeros(1, 7)
    assert torch.allclose(back.scores(raw, hist)[0], ch.scores(raw, hist)[0])
    # A new item (row 7) whose text is item 1's: the text channel puts it on top.
    back.grow(1)
    back.set_text(7, text[1].numpy())
    fused, _ = back.scores(torch.zeros(1, 8), [np.array([1])])
    fused[0, 1] = -np.inf
    assert int(torch.argmax(fused[0])) == 7


def test_ranker_statistics_are_as_of_the_cutoff():
    stats = item_stats([np.array([0, 1]), np.array([1, 2])], [np.array([100, 200]), np.array([300, 400])],
                       [[], [], [], []])
    count, last = stats.as_of(np.array([0, 1, 2, 3]), 250)
    assert count.tolist() == [1, 1, 0, 0]  # item 1's interaction at 300 and item 2's at 400 are later
    assert last.tolist() == [100, 200, 0, 0]
    count, _ = stats.as_of(np.array([1, 5]), 10_000)
    assert count.tolist() == [2, 0]  # item 5 was added after training
    assert np.allclose(stats.log_pop, np.log1p([1, 2, 1, 0]))


def test_live_co_visits_add_to_the_trained_similarity_with_the_cosine_norms():
    h = _histories()
    ch = Channels.fit_data(h, 7, torch.eye(7, 4) + 0.01, FusionConfig(weights={"retriever": 0.0, "covisit": 1.0}))
    trained = np.expm1(ch.log_pop)
    live = ch.live_similarity([(0, 6, 3), (6, 0, 3), (0, 99, 1)], {0: 1, 6: 3})  # code 99: unknown, dropped
    want = 3 / (np.sqrt(trained[0] + 1) * np.sqrt(trained[6] + 3) + 10.0)
    assert live.nnz == 2 and np.isclose(live[0, 6], want) and np.isclose(live[6, 0], want)
    hist = [np.array([0])]
    base = ch.raw_scores("covisit", hist, 1.0)
    assert torch.allclose(ch.raw_scores("covisit", hist, 1.0, live), base + torch.as_tensor(live[0].toarray()))
    # A new item (code 7): scored from its text until live events give it co-visits of its own.
    ch.grow(1)
    ch.set_text(7, (torch.eye(7, 4) + 0.01)[3].numpy())
    before, z = ch.scores(torch.zeros(1, 8), hist)
    assert torch.equal(z["covisit"][0, 7], z["text"][0, 7]) and before[0, 7] < before[0, 6]
    assert ch.cold_codes().tolist() == [7]
    live = ch.live_similarity([(0, 7, 5), (7, 0, 5)], {0: 1, 7: 5})
    assert ch.cold_codes(live).tolist() == [] and not ch.cold_mask(live).any()
    fused, z = ch.scores(torch.zeros(1, 8), hist, live)
    # now just behind item 0's trained neighbours (1, 2: 40 users), ahead of everything else
    assert torch.argsort(fused[0, 1:], descending=True)[:3].tolist() == [0, 1, 6]


def test_items_without_interactions_get_their_own_fitted_weights():
    """Item 7 has no interactions: its fused score is the cold formula. Fitted on an objective
    where user 0's target is item 7 (its text is that of the user's items), the fit raises it to
    the top, while user 1's warm target stays first."""
    h = _histories()
    text = torch.zeros(8, 3)
    text[[0, 1, 2, 7], 0] = 1.0
    text[[3, 4, 5], 1] = 1.0
    text[6, 2] = 1.0
    text += 0.01 * torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    ch = Channels.fit_data(h, 8, text)
    assert ch.cold_mask().tolist() == [False] * 7 + [True]
    hist = [np.array([0, 1]), np.array([3, 4])]
    targets = np.array([7, 5])
    raw = torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    raw[1, 5] = 5.0  # the retriever finds user 1's warm target

    def objective(fused):
        return float((rank_and_topk(fused, targets, hist, topk=0)[0] == 0).mean())

    z = ch.channel_scores(raw, hist)
    buried = {"retriever": 0.0, "text": 0.0, "offset": -3.0, "neighbours": 0.0}
    ch.cfg.cold = buried
    assert objective(ch.scores(raw, hist)[0]) < 1.0  # item 7 at the bottom: user 0 misses
    fit = ch.fit_cold(z, objective)
    assert fit["valid_ndcg@10_cold"] == 1.0 and fit["cold_items"] == 1 and ch.cfg.cold == fit["cold"]
    assert objective(ch.scores(raw, hist)[0]) == 1.0  # the fitted weights are what scores() uses


def test_scoring_a_candidate_pool_matches_the_whole_catalog_on_the_pool():
    """Issue 24: serving a large catalog scores a pool of candidates. Each channel standardises
    its pool scores by the whole catalog's mean and spread (computed exactly: from the text
    vectors' moments, the sparse co-visit rows, the popularity vector; the retriever's from the
    caller), so an item of the pool gets the score the whole-catalog computation gives it; a cold
    item too when its text neighbours are in the pool. Scoring every item is the whole-catalog
    computation exactly."""
    rng = np.random.default_rng(1)
    n = 300
    hist = [rng.integers(0, 250, size=rng.integers(2, 12)) for _ in range(400)]  # items 250+: cold
    text = torch.nn.functional.normalize(torch.randn(n, 16), dim=1)
    ch = Channels.fit_data(hist, n, text, FusionConfig(weights={"retriever": 1.0, "covisit": 0.5, "text": 0.35,
                                                                "popularity": 0.2}))
    users = [hist[0], hist[5], np.array([260, 3])]  # the last with a cold item in its history
    raw = torch.randn(3, n)
    full, zf = ch.scores(raw, users)
    same, _ = ch.scores(raw, users, items=np.arange(n), stats={"retriever": (raw.mean(1), raw.std(1))})
    assert torch.allclose(full, same, atol=1e-4)

    items = np.unique(np.concatenate([rng.choice(n, 120, replace=False), np.arange(245, 270)]))
    sub, z = ch.scores(raw[:, items], users, items=items, stats={"retriever": (raw.mean(1), raw.std(1))})
    for name in zf:
        assert torch.allclose(z[name], zf[name][:, items], atol=1e-4), name
    # with live co-visits (serving's events since training) added to the trained ones, one of
    # them giving a cold item (260) its first co-visit
    last = int(hist[0][-1])
    live = ch.live_similarity([(last, 3, 4), (3, last, 4), (260, 1, 2), (1, 260, 2)], {3: 2, 260: 2, 1: 1})
    _, zl = ch.scores(raw, users, live)
    _, zp = ch.scores(raw[:, items], users, live, items=items, stats={"retriever": (raw.mean(1), raw.std(1))})
    assert not torch.allclose(zl["covisit"], zf["covisit"])
    for name in zl:
        assert torch.allclose(zp[name], zl[name][:, items], atol=1e-4), name
    cold = ch.cold_mask()[items]
    idx, _ = ch.text_neighbours(torch.as_tensor(items[cold]))
    covered = np.isin(idx.numpy(), items).all(1)
    keep = np.flatnonzero(~cold).tolist() + np.flatnonzero(cold)[covered].tolist()
    assert len(keep) > len(items) // 2
    assert torch.allclose(sub[:, keep], full[:, items][:, keep], atol=1e-4)
    # without the retriever's catalog figures, a sample of the pool (``ref``) stands in
    ref = np.arange(0, len(items), 2)
    _, z2 = ch.scores(raw[:, items], users, items=items, ref=ref)
    r = raw[:, items]
    assert torch.allclose(z2["retriever"], (r - r[:, ref].mean(1, keepdim=True)) / (r[:, ref].std(1, keepdim=True) + 1e-6))
    # the text moments follow a changed vector
    ch.set_text(7, np.ones(16, np.float32))
    m, sd = ch.text_moments().of(torch.ones(1, 16))
    x = (ch.text @ torch.ones(16)).double()
    assert abs(m.item() - x.mean().item()) < 1e-4 and abs(sd.item() - x.std().item()) < 1e-4


def test_items_added_one_by_one_keep_the_text_neighbours_already_computed():
    """Serving adds items one PUT at a time: each new item's text neighbours are computed once
    (a scan of the catalog), and adding another item or setting its text must not drop the
    ones already computed, yet must give what a fresh computation gives."""
    text = torch.nn.functional.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    hist = [np.arange(k, k + 5) % 25 for k in range(25)]  # items 25..29: no interactions
    ch = Channels.fit_data(hist, 30, text)
    first = ch.text_neighbours(torch.tensor([25, 26]))
    for k in range(3):  # three upserts: a row each, then its text
        ch.grow(1)
        ch.set_text(30 + k, text[k].numpy() + 0.1)
        assert (ch._nb[0][[25, 26]] == first[0].numpy()).all()  # kept, not recomputed
    got = ch.text_neighbours(torch.tensor([25, 26, 30, 31, 32]))
    ch._nb = None
    want = ch.text_neighbours(torch.tensor([25, 26, 30, 31, 32]))
    assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1])
    assert ch.num_items == 33 and ch.sim.shape == (33, 33) and len(ch.log_pop) == 33 and ch.text.shape == (33, 8)
