"""The model-holding Serve deployments: user encoder, retriever, ranker and the LLM text embedder.

Each is a thin wrapper over a plain model class (``serve.models``, ``serve.retrieval``): it loads
the promoted bundle's parts it needs (``components.layout.*_PARTS``) and runs a ``ModelWatcher``
thread on the registry pointer that swaps verified versions off the request path. A request pins
the version the retriever answered with, and each replica keeps the previous version, so one
request never mixes two models across a swap. Replica counts, autoscaling and resources come from
the Serve config YAML, not from these decorators.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
from ray import serve

from components import layout
from components.config import ServeAppConfig
from components.online.feedback_log import shard_key, table_bytes
from serve.models import RankerModel, TextModel, UserEncoderModel
from serve.retrieval import RetrievalModel
from serve.settings import as_settings, open_storage
from serve.watcher import ModelWatcher

log = logging.getLogger(__name__)


class StaleVersion(RuntimeError):
    """A request pinned to a model version this replica does not hold: one request never mixes
    two models, so the ingress retries it on the current version instead of falling back."""


def _watcher(settings: ServeAppConfig, parts: Sequence[str], loader: Callable[[Any, str], Any],
             prepare=None) -> ModelWatcher:
    w = ModelWatcher(open_storage(settings), settings.model, parts, loader, settings.watch_interval_s, prepare=prepare)
    w.wait_first(settings.startup_timeout_s)
    return w.start()


class _Versioned:
    """Keeps the current and the previous model so a request pinned to either is served."""

    watcher: ModelWatcher

    def _init_versions(self) -> None:
        self._previous: Dict[str, Any] = {}

    def _start(self, settings: ServeAppConfig, parts: Sequence[str], loader, keep_previous: bool = True) -> None:
        """Load the promoted version (blocking) and start watching the registry."""
        self._init_versions()
        self.watcher = _watcher(settings, parts, loader,
                                prepare=(lambda old, new: self._remember(old)) if keep_previous else None)

    def model_for(self, version: Optional[str]):
        """The model of ``version`` (the one the request was pinned to), never another: a
        replica that does not hold it (a newer version not loaded yet, an older one dropped)
        raises ``StaleVersion`` and the ingress re-runs the request on the current version."""
        cur = self.watcher.current
        if not version or version == cur.version:
            return cur
        candidate = self.watcher.candidate
        if candidate is not None and version == candidate.version:
            return candidate
        old = self._previous.get(version)
        if old is None:
            raise StaleVersion(f"model version {version} is not loaded here (serving {cur.version})")
        return old

    def _remember(self, old) -> None:
        if old is not None:
            self._previous = {old.version: old}

    def status(self) -> Dict[str, Any]:
        return self.watcher.status()

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        problem = self.watcher.problem()
        if problem:
            raise RuntimeError(problem)

    def per_version(self, requests: List[Dict[str, Any]], run) -> List[Any]:
        """Run a dynamic batch as one sub-batch per pinned model version (usually one)."""
        out: List[Any] = [None] * len(requests)
        by_version: Dict[str, List[int]] = {}
        for k, r in enumerate(requests):
            by_version.setdefault(r.get("version") or "", []).append(k)
        for version, idx in by_version.items():
            results = run(self.model_for(version), [requests[k] for k in idx])
            for j, k in enumerate(idx):
                out[k] = results[j]
        return out


@serve.deployment
class UserEncoder(_Versioned):
    """Embedding replicas: user vectors from history item vectors (dynamically batched)."""

    def __init__(self, settings: ServeAppConfig):
        self._start(as_settings(settings), layout.ENCODER_PARTS, lambda f, v: UserEncoderModel(f, v))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def encode(self, requests: List[Dict[str, Any]]) -> List[np.ndarray]:
        return self.per_version(requests, lambda model, batch: model.encode(batch))


@serve.deployment
class Ranker(_Versioned):
    """Ranking replicas: the relevance MLP over the retriever's candidates (dynamically batched)."""

    def __init__(self, settings: ServeAppConfig):
        self._start(as_settings(settings), layout.RANKER_PARTS, lambda f, v: RankerModel(f, v))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def score(self, lists: List[Dict[str, Any]]) -> List[np.ndarray]:
        return self.per_version(lists, lambda model, batch: model.score(batch))


@serve.deployment
class TextEmbedder(_Versioned):
    """The LLM for new item text (fine-tuned weights from the bundle when it has them)."""

    def __init__(self, settings: ServeAppConfig):
        self._start(as_settings(settings), layout.TEXT_PARTS, lambda f, v: TextModel(f, v), keep_previous=False)

    async def embed(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        m = self.watcher.current
        return {"version": m.version, "embeddings": m.embed(items)}


@serve.deployment
class Retriever(_Versioned):
    """Catalog and item vectors in faiss, with upserts; candidates, ranker features, reasons.

    Upserted items are stored under ``layout.UPSERTS`` before they are acknowledged, replayed
    into every new model version, and picked up by the other retriever replicas on their next poll.
    """

    def __init__(self, settings: ServeAppConfig):
        self.settings = s = as_settings(settings)
        self.storage = open_storage(s)
        self._init_versions()
        self._seen_upserts: set = set()
        self._upserts: Dict[str, Dict[str, Any]] = {}
        self.watcher = _watcher(s, layout.RETRIEVER_PARTS, lambda f, v: RetrievalModel(f, v, s.ann_above, s.precision),
                                prepare=self._prepare)
        with self.lock:
            self._sync_upserts(self.watcher.current)
        threading.Thread(target=self._poll_upserts, name="upserts", daemon=True).start()

    def _prepare(self, old: Optional[RetrievalModel], new: RetrievalModel) -> None:
        """Runs under the swap lock: replay every known upsert into the new version."""
        if self._upserts:
            items = list(self._upserts.values())
            new.upsert(items, _embeddings(items))
        self._remember(old)

    def _sync_upserts(self, model: RetrievalModel) -> int:
        """Apply upsert shards written by other replicas (or before a restart)."""
        files = [f for f in self.storage.list_files(layout.UPSERTS, (".parquet",)) if f not in self._seen_upserts]
        n = 0
        for f in sorted(files, key=shard_key):
            try:
                rows = self.storage.read_parquet(f).to_pylist()
            except Exception as exc:
                log.error("skipping unreadable upsert shard %s: %s", f, exc)
                self._seen_upserts.add(f)
                continue
            for r in rows:
                self._upserts[r["item_id"]] = r
            model.upsert(rows, _embeddings(rows))
            candidate = self.watcher.candidate  # read once: the watcher may drop it meanwhile
            if candidate is not None and candidate is not model:
                candidate.upsert(rows, _embeddings(rows))
            self._seen_upserts.add(f)
            n += len(rows)
        return n

    def _poll_upserts(self) -> None:
        while True:
            time.sleep(self.settings.watch_interval_s)
            try:
                with self.lock:
                    self._sync_upserts(self.watcher.current)
            except Exception as exc:  # storage hiccup: try again next interval
                log.warning("upsert poll failed: %s", exc)

    @property
    def lock(self) -> threading.Lock:
        """Serialises catalog reads and writes with upserts and swaps (faiss is not thread-safe)."""
        return self.watcher.swap_lock

    def _preferred(self, prefer: Optional[str]) -> RetrievalModel:
        """The canary's candidate when the request prefers it and this replica holds it (the
        ingress asks so for the users in the canary's share), else the promoted version; the
        version answered pins the rest of the request."""
        candidate = self.watcher.candidate
        if prefer and candidate is not None and candidate.version == prefer:
            return candidate
        return self.watcher.current

    async def history(self, item_ids: List[str], exclude: List[str], prefer: Optional[str] = None) -> Dict[str, Any]:
        with self.lock:
            return self._preferred(prefer).history_inputs(item_ids, exclude)

    async def candidates(self, version: str, u: np.ndarray, hist_rows: List[int], hist_ts: List[int],
                         hist_events: List[int], exclude_rows: List[int], categories: Optional[List[str]],
                         n: int, covisit: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        with self.lock:
            return self.model_for(version).candidates(u, hist_rows, hist_ts, hist_events, exclude_rows,
                                                      categories, n, covisit)

    async def cold_start(self, n: int, exclude: List[str], categories: Optional[List[str]],
                         prefer: Optional[str] = None) -> Dict[str, Any]:
        with self.lock:
            return self._preferred(prefer).cold_start_items(n, exclude, categories)

    async def known(self, item_ids: List[str]) -> List[str]:
        """The ids among ``item_ids`` that are not in the catalog."""
        with self.lock:
            return self.watcher.current.lookup(item_ids)[1]

    async def items(self, item_ids: List[str]) -> List[Optional[Dict[str, Any]]]:
        with self.lock:
            m = self.watcher.current
            return [m.item(i) for i in item_ids]

    async def upsert(self, items: List[Dict[str, Any]], embeddings: Optional[np.ndarray]) -> Dict[str, Any]:
        rows = [{**x, "embedding": None if embeddings is None else [float(v) for v in embeddings[k]]}
                for k, x in enumerate(items)]
        path = layout.join(layout.UPSERTS, f"part-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}.parquet")
        await asyncio.to_thread(self.storage.write_bytes_atomic, path, table_bytes(pa.Table.from_pylist(rows)))
        with self.lock:
            m = self.watcher.current
            new = m.upsert(rows, _embeddings(rows))
            candidate = self.watcher.candidate  # a canary serves the new items too
            if candidate is not None:
                candidate.upsert(rows, _embeddings(rows))
            self._seen_upserts.add(path)
            for r in rows:
                self._upserts[r["item_id"]] = r
        return {"new": new, "version": m.version, "size": m.size}


def _embeddings(rows: List[Dict[str, Any]]) -> Optional[np.ndarray]:
    if not rows or any(r.get("embedding") is None for r in rows):
        return None
    return np.asarray([r["embedding"] for r in rows], dtype=np.float32)


class LocalHandle:
    """Stands in for a DeploymentHandle in fused mode: ``h.method.remote(...)`` calls the method of
    an in-process instance and returns an awaitable, so the request flow is the same code."""

    def __init__(self, obj: Any):
        self._obj = obj

    def __getattr__(self, name: str):
        fn = getattr(self._obj, name)

        class _Method:
            @staticmethod
            def remote(*args, **kwargs):
                async def call():
                    out = fn(*args, **kwargs)
                    return await out if asyncio.iscoroutine(out) or isinstance(out, asyncio.Future) else out
                return call()

        return _Method


def fused_models(settings: ServeAppConfig):
    """(encoder, retriever, ranker) held in this process (fused mode), behind ``LocalHandle``s."""
    return (LocalHandle(UserEncoder.func_or_class(settings)), LocalHandle(Retriever.func_or_class(settings)),
            LocalHandle(Ranker.func_or_class(settings)))
