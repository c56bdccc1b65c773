"""Warm-starting a model from a parent checkpoint whose item vocabulary may differ.

Retraining on new feedback produces a new dataset version: items can appear (upserts, newly
interacted items) or drop out (k-core), so vocabulary rows move. ID-embedding rows are copied by
item id; every other tensor of the same shape is copied as is; new items keep their fresh init.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn as nn

ID_TABLES = ("id_emb.weight",)


def warm_start(model: nn.Module, parent_state: Dict[str, torch.Tensor], parent_item_ids: Sequence[str] = (),
               item_ids: Sequence[str] = (), zero_unmapped: bool = False) -> Dict[str, object]:
    """Load ``parent_state`` into ``model`` in place; rows of ID tables (row 0 = padding, row r =
    vocabulary item r - 1) are matched by item id. ``zero_unmapped``: items the parent never saw
    get a zero ID row (the parent as it would serve them: text only) instead of a fresh init.
    Returns what was copied and what was not."""
    state = model.state_dict()
    copied: List[str] = []
    skipped: List[str] = []
    mapped = 0
    for key, value in parent_state.items():
        if key not in state:
            skipped.append(key)
        elif key in ID_TABLES:
            pos = {iid: r + 1 for r, iid in enumerate(parent_item_ids)}
            table = state[key].clone()
            for r, iid in enumerate(item_ids):
                p = pos.get(iid)
                if p is not None and p < value.shape[0]:
                    table[r + 1] = value[p]
                    mapped += 1
                elif zero_unmapped:
                    table[r + 1] = 0
            state[key] = table
            copied.append(key)
        elif state[key].shape == value.shape:
            state[key] = value
            copied.append(key)
        else:
            skipped.append(key)
    model.load_state_dict(state)
    return {"copied": len(copied), "skipped": skipped, "items_mapped": mapped, "items": len(item_ids)}
