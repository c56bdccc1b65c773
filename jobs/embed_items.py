"""Embed the item catalog with the LLM text encoder (Ray Data batch inference, actor pool).

    python -m jobs.embed_items storage.root=<uri> [train.dataset_version=...] [embed.llm=<prefix>]

Writes ``indexes/<run_id>/text_embeddings.parquet`` (item_idx, item_id, embedding) and a faiss
index over them (``text.faiss``, inner product on normalised vectors). ``embed.llm``: a
fine-tuned encoder (a bundle's ``llm/`` part in storage) instead of the base one.
``embed.precision``: the encoder's number format in this pass (auto: bf16 where the hardware
computes it natively, else fp32; the stored vectors are float32 either way).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional

import pyarrow as pa

from components import bundle, layout
from components.checkpoints import new_run_id
from components.config import to_dict
from components.data.datasets import resolve_dataset
from components.models.text_encoder import embed_catalog, inference_dtype, text_index_bytes
from components.storage import Storage
from jobs.progress import stage as progress_stage
from jobs.runtime import ray_session, run_cli

log = logging.getLogger("jobs.embed_items")
COLUMNS = ["item_idx", "item_id", "title", "text", "categories"]


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


def main(cfg: Any) -> Dict[str, Any]:
    t0 = time.perf_counter()
    storage = Storage.from_config(cfg.storage)
    ds = resolve_dataset(storage, cfg)
    prefix = layout.index(cfg.embed.run_id or new_run_id("embed"))
    items = storage.read_parquet(layout.join(ds.prefix, layout.ITEMS)).select(COLUMNS)
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
    table = pa.concat_tables(parts).sort_by("item_idx")
    storage.write_parquet(layout.join(prefix, layout.TEXT_EMBEDDINGS), table)
    storage.write_bytes(layout.join(prefix, layout.TEXT_INDEX), text_index_bytes(bundle.embeddings_tensor(table)))
    result = {"prefix": prefix, "rows": table.num_rows, "dim": int(table["embedding"].type.list_size),
              "seconds": round(time.perf_counter() - t0, 2)}
    print(f"embedded {result['rows']} items with the LLM (dim {result['dim']}) in {result['seconds']}s "
          f"-> {storage.uri(prefix)}", flush=True)
    return result


if __name__ == "__main__":
    run_cli(main)
