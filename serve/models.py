"""What the small model-holding deployments compute, as plain classes (no Ray; unit-tested directly).

A promoted bundle (``components.layout``, ``components.bundle``) is loaded part by part; each
class loads only the parts its deployment fetches (``components.layout.*_PARTS``):

- ``UserEncoderModel``  retriever/   history item vectors -> user vector (causal transformer)
- ``RankerModel``       ranker/      candidate re-scoring (identity when the bundle has none)
- ``TextModel``         llm/         item text -> LLM embedding (for new items)

The catalog, its faiss index and candidate generation are ``serve.retrieval.RetrievalModel``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from components import bundle
from components.models.ranker import NUM_CONTEXT, RankerMLP
from components.models.retriever import gap_buckets
from components.models.text_encoder import item_text


class UserEncoderModel:
    """History item vectors -> user vectors; batched over requests."""

    def __init__(self, folder: Path, version: str = ""):
        self.version = version
        self.model = bundle.load_retriever(folder, verify=False)  # verified on fetch
        torch.set_num_threads(1)

    @property
    def dim(self) -> int:
        return self.model.cfg.dim

    @torch.no_grad()
    def encode(self, histories: Sequence[Dict[str, np.ndarray]]) -> np.ndarray:
        """Each history: ``vectors`` [L, d] (item vectors from the retriever), ``events`` [L]
        (0-based codes) and ``ts`` [L] epoch ms, oldest first. Returns [B, d] float32.

        Histories are batched by length, without padding: the transformer attends over padded
        positions too, so padding would make a user's vector depend on who shared the batch."""
        m = self.model
        out = np.zeros((len(histories), m.cfg.dim), dtype=np.float32)
        groups: Dict[int, List[int]] = {}
        for b, h in enumerate(histories):
            groups.setdefault(min(m.cfg.max_len, len(h["events"])), []).append(b)
        for L, idx in groups.items():
            if L == 0:
                continue
            x = torch.as_tensor(np.stack([np.asarray(histories[b]["vectors"][-L:], dtype=np.float32) for b in idx]))
            events = torch.as_tensor(np.stack([np.asarray(histories[b]["events"], dtype=np.int64)[-L:] + 1
                                               for b in idx]))
            gaps = torch.as_tensor(np.stack([gap_buckets(np.asarray(histories[b]["ts"], dtype=np.int64))[-L:]
                                             for b in idx]))
            present = torch.ones(len(idx), L, dtype=torch.bool)
            out[idx] = m.encode_vectors(x, events, gaps, present)[:, -1].numpy()
        return out


class RankerModel:
    """Candidate re-scoring by the bundle's ranker; the retrieval scores for a bundle without one."""

    def __init__(self, folder: Path, version: str = ""):
        self.version = version
        self.model: Optional[RankerMLP] = bundle.load_ranker(folder, verify=False)
        torch.set_num_threads(1)

    @torch.no_grad()
    def score(self, lists: Sequence[Dict[str, np.ndarray]]) -> List[np.ndarray]:
        """Each list: ``u`` [d], ``i`` [C, d], ``ctx`` [C, F], ``retrieval`` [C]. Returns scores per list.
        Lists of different lengths are padded to one batch."""
        if self.model is None:
            return [np.asarray(x["retrieval"], dtype=np.float32) for x in lists]
        C = max(len(x["retrieval"]) for x in lists)
        d = len(lists[0]["u"])
        u = torch.as_tensor(np.stack([x["u"] for x in lists]), dtype=torch.float32)
        i = torch.zeros(len(lists), C, d)
        ctx = torch.zeros(len(lists), C, NUM_CONTEXT)
        for b, x in enumerate(lists):
            n = len(x["retrieval"])
            i[b, :n] = torch.tensor(np.asarray(x["i"], dtype=np.float32))
            ctx[b, :n] = torch.tensor(np.asarray(x["ctx"], dtype=np.float32))
        s = self.model(u, i, ctx).numpy()
        return [s[b, :len(x["retrieval"])] for b, x in enumerate(lists)]


class TextModel:
    """The LLM for new item text: the bundle's fine-tuned encoder, else the configured base one."""

    def __init__(self, folder: Path, version: str = ""):
        self.version = version
        self.encoder = bundle.load_text_encoder(folder, verify=False)
        torch.set_num_threads(1)

    def embed(self, items: Sequence[Dict[str, Any]]) -> np.ndarray:
        texts = [item_text(x.get("title") or "", x.get("text") or "", x.get("categories") or []) for x in items]
        return self.encoder.encode(texts).numpy()
