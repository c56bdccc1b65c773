"""Finding and loading a written dataset version (and its item text embeddings) for training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import pyarrow as pa
import torch

from components import layout
from components.bundle import embeddings_tensor
from components.data.sequences import UserHistories, histories_from_tables
from components.storage import Storage


@dataclass
class DatasetRef:
    name: str
    version: str
    prefix: str


def resolve_dataset(storage: Storage, cfg: Any) -> DatasetRef:
    """The dataset named by ``cfg.data`` at ``cfg.train.dataset_version`` or its latest version."""
    name = cfg.data.name or cfg.data.source
    version = cfg.train.dataset_version
    if not version:
        rel = layout.dataset_latest(name)
        if not storage.is_file(rel):
            raise FileNotFoundError(f"no dataset {name!r} under {storage.uri('datasets')}: run jobs.preprocess first")
        version = storage.read_json(rel)["version"]
    prefix = layout.dataset(name, version)
    if not storage.is_file(layout.join(prefix, layout.STATS)):
        raise FileNotFoundError(f"dataset version {storage.uri(prefix)} is missing or incomplete (no stats.json)")
    return DatasetRef(name, version, prefix)


@dataclass
class TrainingData:
    histories: UserHistories
    items: pa.Table  # catalog in vocabulary order
    text: Optional[torch.Tensor]  # [num_items, dim] LLM embeddings (0-based rows) or None

    def text_emb(self) -> Optional[torch.Tensor]:
        """Text table for the retriever: row 0 is padding, rows 1.. are items."""
        if self.text is None:
            return None
        return torch.cat([torch.zeros(1, self.text.shape[1]), self.text])

    @property
    def categories(self) -> List[List[str]]:
        return self.items["categories"].to_pylist()


def load_training_data(storage: Storage, dataset_prefix: str, text_prefix: Optional[str]) -> TrainingData:
    items = storage.read_parquet(layout.join(dataset_prefix, layout.ITEMS))
    h = histories_from_tables(storage.read_parquet(layout.join(dataset_prefix, layout.SEQUENCES)),
                              storage.read_parquet(layout.join(dataset_prefix, "valid")),
                              storage.read_parquet(layout.join(dataset_prefix, "test")), items.num_rows)
    text = load_text_embeddings(storage, text_prefix, items.num_rows) if text_prefix else None
    return TrainingData(h, items, text)


def load_text_embeddings(storage: Storage, prefix: str, num_items: int) -> torch.Tensor:
    t = storage.read_parquet(layout.join(prefix, layout.TEXT_EMBEDDINGS)).sort_by("item_idx")
    if t.num_rows != num_items:
        raise ValueError(f"{storage.uri(prefix)} has {t.num_rows} item embeddings, the dataset {num_items} items")
    return embeddings_tensor(t)
