"""Embed the item catalog with the LLM text encoder (Ray Data batch inference, actor pool).

    python -m jobs.embed_items storage.root=<uri> [train.dataset_version=...]

Writes ``indexes/<run_id>/text_embeddings.parquet`` (item_idx, item_id, embedding) and a faiss
index over them (``text.faiss``, inner product on normalised vectors).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pyarrow as pa

from components.checkpoints import load_local, new_run_id
from components.config import to_dict
from components.data.datasets import DatasetRef, resolve_dataset
from components.storage import Storage
from components.models.text_encoder import TextEncoder, TextEncoderConfig, item_text
from jobs.progress import stage as progress_stage
from jobs.runtime import ray_session, run_cli

log = logging.getLogger("jobs.embed_items")


class ItemEmbedder:
    """Ray Data actor: loads the encoder once (fine-tuned weights from ``weights_prefix`` in
    storage: the actor may run on any node, so nothing comes from the driver's disk), embeds
    batches of items."""

    def __init__(self, text_cfg: Dict[str, Any], storage: Optional[Storage] = None,
                 weights_prefix: Optional[str] = None):
        import torch

        torch.set_num_threads(1)
        self.encoder = TextEncoder(TextEncoderConfig(**text_cfg))
        if weights_prefix:
            with tempfile.TemporaryDirectory() as tmp:
                storage.download_dir(weights_prefix, tmp)
                state, _, _ = load_local(tmp)
            self.encoder.load_state_dict(state)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [item_text(t, x, c) for t, x, c in zip(batch["title"].to_pylist(), batch["text"].to_pylist(),
                                                         batch["categories"].to_pylist())]
        emb = self.encoder.encode(texts).numpy().astype(np.float32)
        return pa.table({"item_idx": batch["item_idx"], "item_id": batch["item_id"],
                         "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])})


def embed_items(cfg: Any, storage: Storage, ds: DatasetRef, run_id: str, llm_dir: Optional[str] = None,
                llm_prefix: Optional[str] = None, concurrency: int = 2) -> Dict[str, Any]:
    """Run the embedding pass; returns {prefix, rows, dim, seconds}. Needs an initialised Ray.
    Fine-tuned encoder weights: ``llm_prefix`` in storage, or ``llm_dir`` on this machine (put
    next to the embeddings, ``indexes/<run_id>/encoder``, for the actors to read)."""
    import faiss
    import ray

    t0 = time.perf_counter()
    prefix = f"indexes/{run_id}"
    if llm_dir and not llm_prefix:
        llm_prefix = f"{prefix}/encoder"
        storage.upload_dir(llm_dir, llm_prefix)
    items = storage.read_parquet(f"{ds.prefix}/items").select(["item_idx", "item_id", "title", "text", "categories"])
    # Several blocks, so every actor of the pool gets work (one block would keep one busy).
    step = max(64, -(-items.num_rows // (2 * concurrency)))
    data = ray.data.from_arrow([items.slice(s, step) for s in range(0, max(items.num_rows, 1), step)])
    out = data.map_batches(ItemEmbedder, fn_constructor_kwargs={"text_cfg": to_dict(cfg.text), "storage": storage,
                                                                 "weights_prefix": llm_prefix},
                           batch_size=64, batch_format="pyarrow", num_cpus=1,
                           compute=ray.data.ActorPoolStrategy(size=concurrency))
    parts = []
    with progress_stage("embed items", total=items.num_rows, unit="item") as bar:
        for part in out.iter_batches(batch_size=None, batch_format="pyarrow"):
            parts.append(part)
            bar.update(part.num_rows)
    table = pa.concat_tables(parts).sort_by("item_idx")
    storage.write_parquet(f"{prefix}/text_embeddings.parquet", table)
    emb = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index, str(Path(tmp) / "text.faiss"))
        storage.write_bytes(f"{prefix}/text.faiss", (Path(tmp) / "text.faiss").read_bytes())
    return {"prefix": prefix, "rows": table.num_rows, "dim": int(emb.shape[1]),
            "seconds": round(time.perf_counter() - t0, 2)}


def main(cfg: Any) -> Dict[str, Any]:
    storage = Storage.from_config(cfg.storage)
    ds = resolve_dataset(storage, cfg)
    with ray_session(cfg.ray):
        out = embed_items(cfg, storage, ds, cfg.train.run_id or new_run_id("embed"))
    print(f"embedded {out['rows']} items (dim {out['dim']}) in {out['seconds']}s -> {storage.uri(out['prefix'])}")
    return out


if __name__ == "__main__":
    run_cli(main)
