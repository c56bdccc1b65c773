"""Save and load every part of a model bundle, once: training, evaluation, retraining and serving
all go through these functions.

A bundle (``checkpoints/<model>/<run_id>/``, see ``components.layout``) is self-contained: serving
loads a model from its parts alone, without the dataset it was trained on.

    retriever/     weights + config of the sequence retriever
    ranker/        weights + config of the ranker (absent: no ranker)
    channels/      fitted candidate channels and their fusion weights (absent: retriever order)
    llm/           the fine-tuned text encoder (absent: the base encoder named in the lineage)
    text/          item text embeddings in vocabulary order
    items/         the catalog in vocabulary order
    interactions/  the training (item, ts) pairs: popularity and recency features
    lineage.json   dataset, version, text embeddings, config, timings, fusion fit
    manifest.json  sha256 of every file

Every loader takes the bundle's root folder (or a folder holding some of its parts).
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from components import checkpoints as ck
from components import layout
from components.data.sequences import UserHistories
from components.models.channels import Channels
from components.models.ranker import RankerConfig, RankerMLP
from components.models.retriever import RetrieverConfig, SequenceRetriever
from components.models.text_encoder import TextEncoder, TextEncoderConfig
from components.storage import Storage

# The key each weights part keeps its model config under in config.json.
HF = "hf"  # an llm/ part's Hugging Face files: tokenizer, config, peft adapter
CONFIG_KEYS = {layout.RETRIEVER: "retriever", layout.RANKER: "ranker", layout.LLM: "text"}


def has(folder: str | Path, part: str) -> bool:
    """Whether ``folder`` holds ``part`` (weights parts: their weights file)."""
    p = Path(folder) / part
    if part in CONFIG_KEYS:
        return (p / layout.WEIGHTS).is_file()
    if part == layout.CHANNELS:
        return (p / Channels.META).is_file()
    return p.is_dir() and any(p.rglob("*.parquet"))


# -- weights parts -----------------------------------------------------------------------------
def save_weights(folder: str | Path, part: str, state: Dict[str, torch.Tensor], model_cfg: Any,
                 metrics: Optional[Dict[str, Any]] = None) -> Path:
    """Write a weights part (``retriever``, ``ranker`` or ``llm``) into ``folder/part``."""
    cfg = asdict(model_cfg) if is_dataclass(model_cfg) else dict(model_cfg)
    return ck.save_local(Path(folder) / part, state, {CONFIG_KEYS[part]: cfg, "kind": part}, metrics=metrics)


def part_config(part: str, model_cfg: Any) -> Dict[str, Any]:
    """The ``config.json`` a weights part is saved with (for writers that save it themselves)."""
    cfg = asdict(model_cfg) if is_dataclass(model_cfg) else dict(model_cfg)
    return {CONFIG_KEYS[part]: cfg, "kind": part}


def load_weights(folder: str | Path, part: str, verify: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, model config dict) of a weights part, for code that loads them into a model it
    builds itself (a warm start into another vocabulary)."""
    state, config, _ = ck.load_local(Path(folder) / part, verify=verify)
    return state, config[CONFIG_KEYS[part]]


def load_retriever(folder: str | Path, verify: bool = True) -> SequenceRetriever:
    """The bundle's retriever, in eval mode."""
    state, cfg = load_weights(folder, layout.RETRIEVER, verify)
    model = SequenceRetriever(RetrieverConfig(**cfg))
    model.load_state_dict(state)
    return model.eval()


def load_ranker(folder: str | Path, verify: bool = True) -> Optional[RankerMLP]:
    """The bundle's ranker in eval mode, or None for a bundle without one."""
    if not has(folder, layout.RANKER):
        return None
    state, cfg = load_weights(folder, layout.RANKER, verify)
    model = RankerMLP(RankerConfig(**cfg))
    model.load_state_dict(state)
    return model.eval()


def load_text_encoder(folder: str | Path, base_cfg: Optional[Dict[str, Any]] = None,
                      verify: bool = True) -> TextEncoder:
    """The bundle's fine-tuned LLM (``llm/``), else the base encoder of ``base_cfg`` (default: the
    text config recorded in the bundle's lineage). In eval mode."""
    if has(folder, layout.LLM):
        state, cfg = load_weights(folder, layout.LLM, verify)
        encoder = TextEncoder(TextEncoderConfig(**cfg))
        encoder.load_exported(state)  # strict: a LoRA adapter onto its base, or every weight
    else:
        cfg = base_cfg if base_cfg is not None else read_lineage(folder).get("config", {}).get("text", {})
        encoder = TextEncoder(TextEncoderConfig(**cfg))
    return encoder.eval()


def add_hf_files(part: str | Path) -> None:
    """Write the Hugging Face files of an ``llm/`` part (tokenizer, model config, and with LoRA
    the peft adapter) under ``<part>/hf/`` and re-seal its manifest."""
    state, cfg = ck.load_local(part)[:2]
    encoder = TextEncoder(TextEncoderConfig(**cfg[CONFIG_KEYS[layout.LLM]]))
    encoder.load_exported(state)
    encoder.save_hf(Path(part) / HF)
    ck.write_manifest(part)


# -- tables --------------------------------------------------------------------------------------
def read_parquet_dir(folder: str | Path, name: Optional[str] = None) -> pa.Table:
    """Every Parquet file under ``folder`` (or the one named ``name``), as one table."""
    folder = Path(folder)
    files = [folder / name] if name else sorted(p for p in folder.rglob("*.parquet"))
    if not files or not files[0].is_file():
        raise ck.CheckpointError(f"{folder}: no Parquet files{' named ' + name if name else ''}")
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def load_catalog(folder: str | Path) -> pa.Table:
    """The catalog (item_idx, item_id, title, text, categories, ...) in vocabulary order."""
    return read_parquet_dir(Path(folder) / layout.ITEMS).sort_by("item_idx")


def embeddings_tensor(table: pa.Table) -> torch.Tensor:
    """[rows, dim] float32 from a text-embeddings table (sorted by item_idx). A fixed-size list
    column is read as one flat buffer: a row at a time (``np.stack`` of per-row arrays) peaked at
    ~5x the table's size and 3 GB of heap left behind at 10^6 items of 384 floats."""
    col = table["embedding"]
    col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if pa.types.is_fixed_size_list(col.type) and col.null_count == 0:
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return torch.from_numpy(np.array(flat.reshape(len(col), col.type.list_size), dtype=np.float32))  # owned: writable
    return torch.as_tensor(np.stack(col.to_numpy(zero_copy_only=False)).astype(np.float32))


def release_unused_memory() -> None:
    """Hand memory freed by a large load back to the OS: Arrow's allocator (mimalloc) keeps what
    reading a bundle's Parquet parts used (~3 GB after a 10^6-item retriever replica's load), and
    glibc's heap what Python objects did. A replica calls it once its model is built."""
    import ctypes
    import gc

    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def load_text_embeddings(folder: str | Path) -> Optional[torch.Tensor]:
    """[num_items, dim] LLM embeddings (0-based rows), or None for a bundle without text."""
    if not has(folder, layout.TEXT):
        return None
    path = Path(folder) / layout.TEXT / layout.TEXT_EMBEDDINGS
    if not path.is_file():
        raise ck.CheckpointError(f"{path.parent}: no Parquet files named {layout.TEXT_EMBEDDINGS}")
    # Row group by row group (``layout.TEXT_ROW_GROUP`` rows each as jobs.embed_items writes
    # them) into one preallocated table: reading the whole file (decoded pages, the column, its
    # combined chunks, the owned copy) peaked at 6.5 GB for the 1.5 GB table of 10^6 items of 384
    # floats, a replica's load peak; now the table plus one row group.
    pf = pq.ParquetFile(path)
    order = pf.read(columns=["item_idx"])["item_idx"].to_numpy()
    if not len(order):
        return embeddings_tensor(pf.read(columns=["embedding"]))
    where = None  # row k of the file goes to its item_idx's rank (None: already in order)
    if not bool((np.diff(order) > 0).all()):
        where = np.empty(len(order), dtype=np.int64)
        where[np.argsort(order, kind="stable")] = np.arange(len(order))
    out: Optional[torch.Tensor] = None
    at = 0
    for group in range(pf.num_row_groups):  # one at a time (iter_batches decodes ahead: +2 GB)
        part = embeddings_tensor(pf.read_row_group(group, columns=["embedding"], use_threads=False))
        if out is None:
            out = torch.empty(len(order), part.shape[1], dtype=torch.float32)
        if where is None:
            out[at:at + len(part)] = part
        else:
            out[torch.as_tensor(where[at:at + len(part)])] = part
        at += len(part)
    del pf, part
    release_unused_memory()  # the decoded pages Arrow's allocator keeps (2 GB at 10^6 items)
    return out


def load_channels(folder: str | Path, text: Optional[torch.Tensor]) -> Optional[Channels]:
    """The bundle's fitted channels over ``text`` (0-based rows), or None for a bundle without them."""
    return Channels.load(Path(folder) / layout.CHANNELS, text) if has(folder, layout.CHANNELS) else None


def save_interactions(folder: str | Path, items: List[np.ndarray], ts: List[np.ndarray]) -> None:
    """The training histories' (item, ts) pairs, flattened: what popularity and recency need."""
    flat = np.concatenate(items).astype(np.int64) if len(items) else np.empty(0, np.int64)
    flat_ts = np.concatenate(ts).astype(np.int64) if len(ts) else np.empty(0, np.int64)
    out = Path(folder) / layout.INTERACTIONS
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"item_idx": flat, "ts": flat_ts}), out / "train.parquet")


def load_interactions(folder: str | Path) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """(items, ts) as lists of arrays (one array: the flattened training pairs); empty lists for
    a bundle without them (neutral popularity and recency features)."""
    if not has(folder, layout.INTERACTIONS):
        return [], []
    t = read_parquet_dir(Path(folder) / layout.INTERACTIONS)
    return [t["item_idx"].to_numpy().astype(np.int64)], [t["ts"].to_numpy().astype(np.int64)]


def add_data_parts(folder: str | Path, storage: Storage, dataset_prefix: str, text_prefix: Optional[str],
                   histories: UserHistories) -> None:
    """Copy what a model needs of its data into the bundle: the text embeddings it was trained
    with (``text/``), the catalog (``items/``) and the training interactions."""
    folder = Path(folder)
    if text_prefix:
        for name in (layout.TEXT_EMBEDDINGS, layout.TEXT_INDEX):
            if storage.is_file(layout.join(text_prefix, name)):
                (folder / layout.TEXT).mkdir(parents=True, exist_ok=True)
                (folder / layout.TEXT / name).write_bytes(storage.read_bytes(layout.join(text_prefix, name)))
    storage.download_dir(layout.join(dataset_prefix, layout.ITEMS), folder / layout.ITEMS)
    save_interactions(folder, histories.items, histories.ts)


def read_lineage(folder: str | Path) -> Dict[str, Any]:
    p = Path(folder) / layout.LINEAGE
    return json.loads(p.read_text()) if p.is_file() else {}


def write_lineage(folder: str | Path, lineage: Dict[str, Any]) -> None:
    (Path(folder) / layout.LINEAGE).write_text(json.dumps(lineage, indent=2, default=str))
