"""Sequence retriever: item vectors from LLM text (+ optional ID embedding), user vector from a
causal transformer over the user's recent items, event types and time gaps; score <u, i>.

Text-only, ID-only and hybrid are configurations of the same module. Items are indexed from 1
(0 is padding). Item text embeddings are an input, not a parameter: a new item becomes
recommendable as soon as its text is embedded (its ID embedding stays at zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

GAP_BUCKETS = 32


@dataclass
class RetrieverConfig:
    num_items: int = 0  # set from the dataset vocabulary
    text_dim: int = 0  # set from the item embeddings; 0 with use_text=false
    use_id: bool = True
    use_text: bool = True
    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 200
    dropout: float = 0.3
    # Probability of hiding an item's ID embedding in training, so the text path alone must
    # carry it (what new items have at serving time).
    id_dropout: float = 0.1
    num_events: int = 6
    # softmax: full cross-entropy over the catalog. sampled: sampled softmax with logQ correction.
    # auto: softmax up to sampled_above items, sampled above; made concrete when the model is
    # built, so a saved model's config says which one it trained with.
    loss: str = "auto"
    # The catalog size above which loss=auto samples: a full softmax scores every item at every
    # training position, so its step cost and its logits' memory (4 B x items a position) grow
    # with the catalog, while a sampled one's grow with num_negatives.
    sampled_above: int = 200_000
    num_negatives: int = 1024
    # Logits are <u, i> / temperature; 0 means sqrt(dim). User and item vectors are layer-normed
    # (norm ~ sqrt(dim) each), so unscaled logits start with a spread of ~dim and the softmax
    # saturates: on ml-latest-small sqrt(dim) reached the same valid NDCG in about half the epochs.
    temperature: float = 0.0
    # ZCA-whiten the frozen LLM text embeddings (mean and covariance of the catalog's, fitted
    # when the model is created and saved with it) before the learned projection: sentence
    # embeddings are anisotropic (a few directions carry most of the variance, BERT-whitening,
    # Su et al. 2021; UniSRec's parametric whitening), so item texts start out nearly parallel.
    text_whiten: bool = False


def gap_buckets(ts_ms: np.ndarray) -> np.ndarray:
    """Time since the previous event, in log2-second buckets (0 for the first event)."""
    gaps = np.diff(ts_ms, prepend=ts_ms[:1]) / 1000.0 if len(ts_ms) else ts_ms
    return np.clip(np.floor(np.log2(np.maximum(gaps, 0) + 1.0)), 0, GAP_BUCKETS - 1).astype(np.int64)


def attention_mask(present: torch.Tensor, heads: int) -> torch.Tensor:
    """[B * heads, L, L] bool, True = may not attend: causal, and no real position attends to
    padding, so a user's vector does not depend on who shares the batch (or on the padded length).
    A padding position attends to itself only (its output is zeroed): no row is fully masked."""
    L = present.shape[1]
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=present.device), 1)
    mask = causal[None] | ~present[:, None, :]
    mask &= ~torch.eye(L, dtype=torch.bool, device=present.device)[None]
    return mask.repeat_interleave(heads, dim=0)


def resolve_loss(cfg: RetrieverConfig) -> RetrieverConfig:
    """``cfg`` with ``loss="auto"`` replaced by the loss its catalog size (``num_items``) calls for."""
    if cfg.loss != "auto":
        return cfg
    return replace(cfg, loss="sampled" if cfg.num_items > cfg.sampled_above else "softmax")


class SequenceRetriever(nn.Module):
    def __init__(self, cfg: RetrieverConfig):
        super().__init__()
        cfg = resolve_loss(cfg)
        if not (cfg.use_id or cfg.use_text):
            raise ValueError("retriever needs use_id or use_text")
        if cfg.use_text and cfg.text_dim <= 0:
            raise ValueError("retriever.use_text needs item text embeddings (text_dim > 0)")
        if cfg.loss not in ("softmax", "sampled"):
            raise ValueError(f"retriever.loss must be auto, softmax or sampled; got {cfg.loss!r}")
        self.cfg = cfg
        d = cfg.dim
        self.logit_scale = 1.0 / (cfg.temperature if cfg.temperature > 0 else math.sqrt(d))
        if cfg.use_id:
            self.id_emb = nn.Embedding(cfg.num_items + 1, d, padding_idx=0)
            nn.init.normal_(self.id_emb.weight, std=0.02)
            with torch.no_grad():
                self.id_emb.weight[0].zero_()
        if cfg.use_text:
            self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            if cfg.text_whiten:  # identity until fit_text_whitening; saved in the state dict
                self.register_buffer("text_mean", torch.zeros(cfg.text_dim))
                self.register_buffer("text_white", torch.eye(cfg.text_dim))
        self.item_norm = nn.LayerNorm(d)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.event_emb = nn.Embedding(cfg.num_events + 1, d, padding_idx=0)
        self.gap_emb = nn.Embedding(GAP_BUCKETS, d)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(d, cfg.heads, 4 * d, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(d)

    # -- items ------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_text_whitening(self, text: torch.Tensor, shrink: float = 0.01) -> None:
        """ZCA whitening from the catalog's text embeddings ``text`` [n, text_dim] (no padding
        row): x -> (x - mean) U diag((lambda + eps)^-1/2) U^T, eps = ``shrink`` * mean eigenvalue so
        that directions with almost no variance are not blown up into noise."""
        if not (self.cfg.use_text and self.cfg.text_whiten):
            return
        x = text.double()
        mean = x.mean(0)
        cov = torch.cov((x - mean).T)
        lam, u = torch.linalg.eigh(cov)
        lam = lam.clamp(min=0)
        w = u @ torch.diag((lam + shrink * lam.mean() + 1e-12).rsqrt()) @ u.T
        self.text_mean.copy_(mean.float())
        self.text_white.copy_(w.float())

    def text_vectors(self, text_emb: torch.Tensor) -> torch.Tensor:
        """The learned projection of (whitened) text embeddings [..., text_dim] -> [..., dim]."""
        if self.cfg.text_whiten:
            text_emb = (text_emb - self.text_mean) @ self.text_white
        return self.text_proj(text_emb)

    def item_vectors(self, text_emb: Optional[torch.Tensor] = None, ids: Optional[torch.Tensor] = None,
                     hide_ids: Optional[torch.Tensor] = None, text_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Vectors of items ``ids`` (1-based; default all, row 0 = padding).

        Args:
            text_emb: [num_items + 1, text_dim] text embeddings aligned with item ids (row 0 unused).
            ids: item ids to compute; default every item including padding.
            hide_ids: bool mask like ``ids``; True drops the ID embedding of that item.
            text_rows: the text embeddings of ``ids`` already gathered [..., text_dim], instead
                of ``text_emb``.
        """
        if ids is None:
            ids = torch.arange(self.cfg.num_items + 1, device=self.pos_emb.weight.device)
        v = torch.zeros(*ids.shape, self.cfg.dim, device=ids.device)
        if self.cfg.use_id:
            idv = self.id_emb(ids.clamp(max=self.cfg.num_items))
            if hide_ids is not None:
                idv = idv * (~hide_ids).unsqueeze(-1)
            v = v + idv
        if self.cfg.use_text:
            v = v + self.text_vectors(text_emb[ids] if text_rows is None else text_rows)
        v = self.item_norm(v)
        return v * (ids > 0).unsqueeze(-1)

    def catalog_vectors(self, text: Optional[torch.Tensor], chunk: int = 65536) -> torch.Tensor:
        """``item_vectors()`` of every item [num_items + 1, dim] (row 0: padding) from the 0-based
        text table [num_items, text_dim] (None for an ID-only model), ``chunk`` items at a time:
        no padded copy of the table and no temporaries of its size (whitening and the gather
        made four, 6 GB at 10^6 items of 384 floats, when a serving replica loaded)."""
        n = self.cfg.num_items
        out = torch.empty(n + 1, self.cfg.dim)
        for s in range(0, n + 1, chunk):
            ids = torch.arange(s, min(n + 1, s + chunk))
            rows = text[(ids - 1).clamp(min=0)].float() if self.cfg.use_text else None  # row 0: masked
            out[s:s + len(ids)] = self.item_vectors(ids=ids, text_rows=rows)
        return out

    # -- users ------------------------------------------------------------------------------
    def encode(self, items: torch.Tensor, events: torch.Tensor, gaps: torch.Tensor,
               text_emb: Optional[torch.Tensor] = None, hide_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden state at every position [B, L, dim] (causal: position t sees items <= t).
        Sequences are left-padded with 0 so the last position is the most recent event."""
        return self.encode_vectors(self.item_vectors(text_emb, items, hide_ids), events, gaps, items > 0)

    def encode_vectors(self, vectors: torch.Tensor, events: torch.Tensor, gaps: torch.Tensor,
                       present: torch.Tensor) -> torch.Tensor:
        """``encode`` from item vectors [B, L, dim] already computed (serving: the retriever
        deployment owns the item vectors, new items included); ``present`` [B, L] marks real events."""
        L = vectors.shape[1]
        x = vectors * math.sqrt(self.cfg.dim)
        pos = torch.arange(L, device=vectors.device) + (self.cfg.max_len - L)
        x = x + self.pos_emb(pos)[None] + self.event_emb(events) + self.gap_emb(gaps)
        keep = present.unsqueeze(-1).to(x.dtype)
        x = self.drop(x) * keep
        h = self.encoder(x, mask=attention_mask(present, self.cfg.heads))
        return self.out_norm(h) * keep

    def user_vector(self, items, events, gaps, text_emb=None) -> torch.Tensor:
        """[B, dim]: the state after the most recent event."""
        return self.encode(items, events, gaps, text_emb)[:, -1]

    # -- training ---------------------------------------------------------------------------
    def forward(self, batch: dict, text_emb: Optional[torch.Tensor] = None,
                log_q: Optional[torch.Tensor] = None, item_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Next-item cross-entropy at every position that has a target.

        batch: items, events, gaps, targets ([B, L] long; targets 0 = none).
        log_q: [num_items + 1] log sampling probabilities, for ``loss=sampled``.
        item_mask: [num_items] bool, the items that exist at training time (full softmax only);
            others are left out of the softmax, as items added later would be.
        """
        items, targets = batch["items"], batch["targets"]
        hide = None
        if self.training and self.cfg.use_id and self.cfg.use_text and self.cfg.id_dropout > 0:
            hide = torch.rand(items.shape, device=items.device) < self.cfg.id_dropout
        h = self.encode(items, batch["events"], batch["gaps"], text_emb, hide)
        mask = targets > 0
        h, t = h[mask], targets[mask]
        if self.cfg.loss == "softmax":
            table = self.item_vectors(text_emb)[1:]
            logits = (h @ table.T) * self.logit_scale
            if item_mask is not None:
                logits = logits.masked_fill(~item_mask[None], float("-inf"))
            return F.cross_entropy(logits, t - 1)
        return self._sampled_loss(h, t, text_emb, log_q)

    def _sampled_loss(self, h, t, text_emb, log_q) -> torch.Tensor:
        """Sampled softmax with logQ correction (Yi et al., 2019): shared negatives drawn from q."""
        if log_q is None:
            raise ValueError("sampled softmax needs log_q (item sampling log-probabilities)")
        q = log_q[1:].exp()
        neg = torch.multinomial(q, self.cfg.num_negatives, replacement=True) + 1
        pos_v = self.item_vectors(text_emb, t)
        neg_v = self.item_vectors(text_emb, neg)
        # The correction applies to the scaled logits: softmax(s / T - log q).
        pos_logit = (h * pos_v).sum(-1, keepdim=True) * self.logit_scale - log_q[t].unsqueeze(-1)
        neg_logit = (h @ neg_v.T) * self.logit_scale - log_q[neg][None]
        neg_logit = neg_logit.masked_fill(neg[None] == t[:, None], float("-inf"))  # accidental hits
        logits = torch.cat([pos_logit, neg_logit], 1)
        return F.cross_entropy(logits, torch.zeros(len(t), dtype=torch.long, device=h.device))
