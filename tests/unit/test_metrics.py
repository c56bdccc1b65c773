import math

import numpy as np
import torch

from components.models.baselines import ItemKNN, MostPopular
from components.evaluation.metrics import coverage, popularity_deciles, rank_and_topk, ranking_metrics


def test_ranks_exclude_history_and_a_repeated_target_is_a_miss():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    ranks, top = rank_and_topk(scores, np.array([2, 0]), [np.array([0, 1]), np.array([0, 3])], topk=2)
    # user 0: items 0,1 excluded -> target first; user 1: the target is in the history, masked
    # as serving masks it -> a miss (rank = number of items), never in the top lists
    assert ranks.tolist() == [0, 4]
    assert top[0].tolist() == [2, 3]
    assert 0 not in top[1].tolist()


def test_ties_count_against_the_model():
    ranks, _ = rank_and_topk(torch.zeros(1, 5), np.array([3]), [np.array([], dtype=int)])
    assert ranks.tolist() == [4]


def test_metric_values_by_hand():
    m = ranking_metrics(np.array([0, 1, 9, 10, 50]), ks=(10,))
    assert m["recall@10"] == 3 / 5
    assert math.isclose(m["ndcg@10"], (1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5)
    assert math.isclose(m["mrr@10"], (1 + 1 / 2 + 1 / 10) / 5)


def test_coverage_and_deciles():
    assert coverage(np.array([[0, 1], [1, 2]]), 10, k=2) == 0.3
    counts = np.arange(20)
    assert popularity_deciles(counts, np.array([0, 19])).tolist() == [0, 9]


def test_baselines():
    hist = [np.array([0, 1]), np.array([0, 1]), np.array([2, 3]), np.array([0])]
    mp = MostPopular(hist, 4).scores([np.array([])])
    assert mp.argmax().item() == 0
    knn = ItemKNN(hist, 4, neighbors=3, shrink=0.0).scores([np.array([1])])
    assert knn[0].argmax().item() == 0  # item 1 co-occurs with item 0
    assert knn[0, 3].item() == 0.0
