"""Embed the item catalog with the LLM text encoder (Ray Data batch inference, actor pool).

    python -m jobs.embed_items storage.root=<uri> [train.dataset_version=...] [embed.llm=<prefix>]

Writes ``indexes/<run_id>/text_embeddings.parquet`` (item_idx, item_id, embedding, text_key) and
a faiss index over them (``text.faiss``, inner product on normalised vectors). ``embed.llm``: a
fine-tuned encoder (a bundle's ``llm/`` part in storage) instead of the base one.
``embed.precision``: the encoder's number format in this pass (auto: bf16 where the hardware
computes it natively, else fp32; the stored vectors are float32 either way).

Incremental (``embed.reuse``, on by default): an item whose text the same encoder embedded
before keeps that vector, and only new or changed items go through the encoder. The encoder is
identified by its fingerprint (``encoder_fingerprint``: the text settings, the number format
and the bytes of its files, the fine-tuned part's included); ``indexes/by-encoder/<fingerprint>.json``
names the latest output embedded with it, and an item matches by ``text_key`` (a hash of the
string the encoder reads). A retrain's first pass, with the parent's fine-tuned encoder, so
reuses the parent's vectors for every item whose text did not change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components import bundle, layout
from components.checkpoints import new_run_id
from components.config import to_dict
from components.data.datasets import resolve_dataset
from components.models.text_encoder import (embed_catalog, inference_dtype, item_text, model_path,
                                           text_index_bytes)
from components.storage import Storage
from jobs.progress import stage as progress_stage
from jobs.runtime import ray_session, run_cli

log = logging.getLogger("jobs.embed_items")
COLUMNS = ["item_idx", "item_id", "title", "text", "categories"]
BY_ENCODER = "by-encoder"  # indexes/by-encoder/<fingerprint>.json: the latest output of that encoder


class ItemEmbedder:
    """Ray Data actor: loads the encoder once (fine-tuned weights from ``llm_prefix`` in storage:
    the actor may run on any node, so nothing comes from the driver's disk), embeds batches."""

    def __init__(self, text_cfg: Dict[str, Any], storage: Optional[Storage] = None, llm_prefix: Optional[str] = None,
                 precision: str = "fp32"):
        import torch

        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            if llm_prefix:
                storage.download_dir(llm_prefix, Path(tmp) / layout.LLM)
            self.encoder = bundle.load_text_encoder(tmp, text_cfg)
        self.encoder.to(inference_dtype(precision))  # the vectors come back float32 either way

    def __call__(self, batch: pa.Table) -> pa.Table:
        return embed_catalog(self.encoder, batch)


# What main(cfg) reads: `--help` lists these settings.
CONFIG_SECTIONS = ("storage", "data.source", "data.name", "train.dataset_version", "text", "embed", "ray")


def text_keys(items: pa.Table) -> pa.Array:
    """Per item, a hash of the exact string the encoder reads (``item_text``)."""
    return pa.array([hashlib.sha256(item_text(t, x, c).encode()).hexdigest()[:32]
                     for t, x, c in zip(items["title"].to_pylist(), items["text"].to_pylist(),
                                        items["categories"].to_pylist())], pa.string())


def _file_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def encoder_fingerprint(cfg: Any, storage: Storage) -> Optional[str]:
    """What decides the vectors an encoder gives a text: the ``text`` settings, the number format
    of the pass, the bytes of the base model's files (a local folder, or a storage folder once
    fetched), and of the fine-tuned part's (``embed.llm``). None for a random-init encoder (no
    two passes are alike). A Hugging Face hub name counts by its name only."""
    text = to_dict(cfg.text)
    if text.get("random_init"):
        return None
    h = hashlib.sha256(json.dumps({"text": text, "dtype": str(inference_dtype(cfg.embed.precision))},
                                  sort_keys=True, default=str).encode())
    base = Path(model_path(text.get("model")))
    if base.is_dir():
        for f in sorted(p for p in base.rglob("*") if p.is_file()):
            h.update(f.relative_to(base).as_posix().encode() + _file_digest(f.read_bytes()))
    if cfg.embed.llm:
        for rel in storage.list_files(cfg.embed.llm):
            if not rel.endswith(layout.MANIFEST):  # the manifest carries a time: the files are what count
                h.update(rel[len(cfg.embed.llm):].encode() + _file_digest(storage.read_bytes(rel)))
    return h.hexdigest()[:32]


def _reusable(storage: Storage, fingerprint: Optional[str], keys: pa.Array) -> Optional[pa.Table]:
    """The previous vectors of this encoder for the texts in ``keys`` (text_key, embedding), or
    None: no previous output (or it is gone, or holds no text keys)."""
    pointer = layout.join(layout.INDEXES, BY_ENCODER, f"{fingerprint}.json")
    if fingerprint is None or not storage.is_file(pointer):
        return None
    prev = storage.read_json(pointer)["prefix"]
    path = layout.join(prev, layout.TEXT_EMBEDDINGS)
    if not storage.is_file(path):
        log.warning("the previous embeddings of this encoder (%s) are gone: embedding every item", storage.uri(prev))
        return None
    table = storage.read_parquet(path)
    if "text_key" not in table.column_names:
        return None
    table = table.select(["text_key", "embedding"])
    table = table.filter(pc.is_in(table["text_key"], value_set=keys))
    # one row per text (two items with one text share a vector)
    _, first = np.unique(table["text_key"].to_numpy(zero_copy_only=False), return_index=True)
    return table.take(pa.array(first))


def _embed_with_ray(cfg: Any, storage: Storage, items: pa.Table) -> pa.Table:
    """(item_idx, item_id, embedding) for ``items``, by a pool of encoder actors."""
    with ray_session(cfg.ray):
        import ray

        # Several blocks, so every actor of the pool gets work (one block would keep one busy).
        n = cfg.embed.concurrency
        step = max(64, -(-items.num_rows // (2 * n)))
        data = ray.data.from_arrow([items.slice(s, step) for s in range(0, max(items.num_rows, 1), step)])
        out = data.map_batches(ItemEmbedder, fn_constructor_kwargs={"text_cfg": to_dict(cfg.text), "storage": storage,
                                                                     "llm_prefix": cfg.embed.llm,
                                                                     "precision": cfg.embed.precision},
                               batch_size=64, batch_format="pyarrow", num_cpus=1,
                               compute=ray.data.ActorPoolStrategy(size=n))
        parts = []
        with progress_stage("embed items", total=items.num_rows, unit="item") as bar:
            for part in out.iter_batches(batch_size=None, batch_format="pyarrow"):
                parts.append(part)
                bar.update(part.num_rows)
    return pa.concat_tables(parts)


def main(cfg: Any) -> Dict[str, Any]:
    t0 = time.perf_counter()
    storage = Storage.from_config(cfg.storage)
    ds = resolve_dataset(storage, cfg)
    prefix = layout.index(cfg.embed.run_id or new_run_id("embed"))
    items = storage.read_parquet(layout.join(ds.prefix, layout.ITEMS)).select(COLUMNS)
    keys = text_keys(items)
    items = items.append_column("text_key", keys)
    fingerprint = encoder_fingerprint(cfg, storage)
    prev = _reusable(storage, fingerprint, keys) if cfg.embed.reuse else None
    parts, reused = [], 0
    if prev is not None and prev.num_rows:
        at = pc.index_in(items["text_key"], value_set=prev["text_key"])
        known = pc.is_valid(at)
        hits = items.filter(known)
        parts.append(pa.table({"item_idx": hits["item_idx"], "item_id": hits["item_id"],
                               "embedding": prev["embedding"].take(pc.drop_null(at)), "text_key": hits["text_key"]}))
        items, reused = items.filter(pc.invert(known)), hits.num_rows
    if items.num_rows or not parts:
        new = _embed_with_ray(cfg, storage, items.drop_columns(["text_key"]))
        new = new.sort_by("item_idx")
        keyed = items.sort_by("item_idx")
        parts.append(new.append_column("text_key", keyed["text_key"]))
    table = pa.concat_tables([p.cast(parts[0].schema) for p in parts]).sort_by("item_idx")
    storage.write_parquet(layout.join(prefix, layout.TEXT_EMBEDDINGS), table, row_group_size=layout.TEXT_ROW_GROUP)
    storage.write_bytes(layout.join(prefix, layout.TEXT_INDEX), text_index_bytes(bundle.embeddings_tensor(table)))
    if fingerprint is not None:  # written last: it names only a complete output
        storage.write_json_atomic(layout.join(layout.INDEXES, BY_ENCODER, f"{fingerprint}.json"),
                                  {"prefix": prefix, "items": table.num_rows})
    result = {"prefix": prefix, "rows": table.num_rows, "dim": int(table["embedding"].type.list_size),
              "reused": reused, "embedded": table.num_rows - reused, "seconds": round(time.perf_counter() - t0, 2)}
    print(f"embedded {result['embedded']} items with the LLM (dim {result['dim']}), reused {reused} unchanged "
          f"in {result['seconds']}s -> {storage.uri(prefix)}", flush=True)
    return result


if __name__ == "__main__":
    run_cli(main)
