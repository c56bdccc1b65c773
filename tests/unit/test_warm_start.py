"""Warm start across vocabularies: ID rows follow their item ids, other tensors copy, new items stay fresh."""

import torch

from components.models.retriever import RetrieverConfig, SequenceRetriever
from components.training.warm_start import warm_start


def test_id_rows_follow_item_ids_and_new_items_keep_their_init():
    torch.manual_seed(0)
    parent = SequenceRetriever(RetrieverConfig(num_items=3, use_text=False, dim=8, layers=1))
    child = SequenceRetriever(RetrieverConfig(num_items=4, use_text=False, dim=8, layers=1))
    fresh = child.id_emb.weight.detach().clone()
    out = warm_start(child, parent.state_dict(), ["a", "b", "c"], ["c", "x", "a", "b"])
    w, pw = child.id_emb.weight.detach(), parent.id_emb.weight.detach()
    assert torch.equal(w[1], pw[3]) and torch.equal(w[3], pw[1]) and torch.equal(w[4], pw[2])
    assert torch.equal(w[2], fresh[2])  # "x" is new
    assert out["items_mapped"] == 3 and out["skipped"] == []
    assert torch.equal(child.pos_emb.weight, parent.pos_emb.weight)
    warm_start(child, parent.state_dict(), ["a", "b", "c"], ["c", "x", "a", "b"], zero_unmapped=True)
    assert torch.count_nonzero(child.id_emb.weight[2]) == 0


def test_tensors_of_another_shape_are_skipped_not_forced():
    parent = SequenceRetriever(RetrieverConfig(num_items=3, use_text=False, dim=8, layers=1))
    child = SequenceRetriever(RetrieverConfig(num_items=3, use_text=False, dim=8, layers=1, max_len=50))
    out = warm_start(child, parent.state_dict(), ["a", "b", "c"], ["a", "b", "c"])
    assert "pos_emb.weight" in out["skipped"]
