"""The Ray Serve application: ingress (FastAPI) -> user encoder -> retriever -> ranker, plus the
text-embedding deployment (new items) and the event store (live user state + durable feedback).

    serve run configs/serve.yaml          # or: serve deploy configs/serve.yaml (running cluster)

Replica counts, autoscaling and resources come from the Serve config YAML, not from decorators.
Every model-holding replica runs a ``ModelWatcher`` thread on ``registry/<model>/latest.json``
and swaps verified checkpoints off the request path. A request pins the version the retriever
answered with, and each model replica keeps the previous version, so one request never mixes
two models across a swap.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve.handle import DeploymentHandle

from components import registry
from components.data import privacy
from components.data.schemas import EVENT_TYPES
from components.storage import Storage
from serve import api, auth
from serve.bundle import ModelWatcher
from serve.flow import HandleBackend, recommend
from components.online.feedback_log import GroupCommitLog, RecentIds, list_feedback_shards, read_feedback, shard_key, table_bytes
from components.online.live_state import SessionState, merge_covisit, shard_rows, user_shard
from serve.models import (ENCODER_PARTS, RANKER_PARTS, RETRIEVER_PARTS, TEXT_PARTS, RankerModel, RetrievalModel,
                          TextModel, UserEncoderModel)

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
UPSERTS_PREFIX = "catalog/upserts"


@dataclass
class ServeSettings:
    """The ``args`` of the Serve application (``applications[].args`` in the YAML)."""

    storage_root: str = "storage"
    storage_endpoint: Optional[str] = None
    # graph: ingress -> UserEncoder -> Retriever -> Ranker deployments, each scaled on its own.
    # fused: the ingress replicas hold encoder, retriever and ranker in-process (the same
    # classes, hot swap included) and scale as one; saves four Ray Serve hops per request
    # (configs/serve-fused.yaml). TextEmbedder and EventStore stay deployments in both.
    mode: str = "graph"
    model: str = "recommender"
    # Seconds between registry polls in every model replica (promotion -> serving latency).
    watch_interval_s: float = 2.0
    # How long a replica waits for a first promoted model before failing its start.
    startup_timeout_s: float = 120.0
    # Retriever candidates passed to the ranker.
    candidates: int = 100
    # Events per user kept in the live state (and fed to the user encoder).
    history_len: int = 200
    # Users whose live state stays in the event store's memory; the least recently active beyond
    # that are spilled to a local SQLite file and read back on their next request or event.
    live_users_max: int = 100_000
    # Group commit of /v1/events: events arriving during a write form the next shard (at most
    # feedback_max_events); linger > 0 waits that long to gather more (fewer S3 objects). A write
    # starts within linger + one write time of an event (well under 200 ms on local disk or S3).
    feedback_linger_ms: float = 0.0
    feedback_max_events: int = 1024
    # Access (serve/auth.py): keys from LLMREC_WRITE_KEY / LLMREC_ADMIN_KEY / LLMREC_READ_KEY and
    # this secret file; recommend/health/docs need a key only with require_read_key.
    keys_file: Optional[str] = None
    require_read_key: bool = False
    # Requests per key (per client address without one) and ingress replica, "N/second|minute";
    # null turns it off. rate_limit_storage "redis://host:port" shares the count across replicas.
    rate_limit: Optional[str] = "300/second"
    rate_limit_storage: str = "memory://"
    # Store and look up users by keyed pseudonym (HMAC under $LLMREC_PRIVACY_KEY): must match
    # the dataset's preprocess.pseudonymize_users (a mismatch is logged at rebuild).
    pseudonymize_users: bool = False
    # Live state sharded by user (crc32 of the stored user id): EventStore0..N-1, each the holder
    # of its users' histories, live co-visits and feedback writes, rebuilt from the shared
    # feedback log after a restart. 1 = the single EventStore deployment.
    live_state_shards: int = 1

    @classmethod
    def from_args(cls, args: Optional[Dict[str, Any]]) -> "ServeSettings":
        args = dict(args or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown serve application args: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        out = cls(**args)
        if out.mode not in ("graph", "fused"):
            raise ValueError(f"serve args mode must be graph or fused, got {out.mode!r}")
        if not isinstance(out.live_state_shards, int) or not 1 <= out.live_state_shards <= 256:
            raise ValueError(f"serve args live_state_shards must be an integer 1..256, got {out.live_state_shards!r}")
        if out.rate_limit:
            from limits import parse

            try:
                parse(out.rate_limit)
            except ValueError:
                raise ValueError(f"serve args rate_limit: {out.rate_limit!r} is not like '300/second'") from None
        return out

    def storage(self) -> Storage:
        return Storage(self.storage_root, endpoint_url=self.storage_endpoint)


class StaleVersion(RuntimeError):
    """A request pinned to a model version this replica does not hold: one request never mixes
    two models, so the ingress retries it on the current version instead of falling back."""


# How long a request may wait for every stage to load the version the retriever answered with.
# Replicas poll the registry on their own clocks, so one can be a poll interval plus a load behind
# another (seen: ~0.8 s on 2 busy cores); the retries wait it out instead of failing the request.
STALE_WAIT_S = 10.0
# A 503 (storage or a backend replica down) tells the client when to retry; every 503 route is
# safe to retry (events carry an optional event_id that makes a retry count once).
RETRY_AFTER = {"Retry-After": "1"}


def _watcher(settings: ServeSettings, parts, loader, prepare=None) -> ModelWatcher:
    w = ModelWatcher(settings.storage(), settings.model, parts, loader, settings.watch_interval_s, prepare=prepare)
    w.wait_first(settings.startup_timeout_s)
    return w.start()


class _Versioned:
    """Keeps the current and the previous model so a request pinned to either is served."""

    watcher: ModelWatcher

    def _init_versions(self) -> None:
        self._previous: Dict[str, Any] = {}

    def _start(self, args: Dict[str, Any], parts, loader, keep_previous: bool = True) -> None:
        """Load the promoted version (blocking) and start watching the registry."""
        self._init_versions()
        self.watcher = _watcher(ServeSettings.from_args(args), parts, loader,
                                prepare=(lambda old, new: self._remember(old)) if keep_previous else None)

    def model_for(self, version: Optional[str]):
        """The model of ``version`` (the one the request was pinned to), never another: a
        replica that does not hold it (a newer version not loaded yet, an older one dropped)
        raises ``StaleVersion`` and the ingress re-runs the request on the current version."""
        cur = self.watcher.current
        if not version or version == cur.version:
            return cur
        old = self._previous.get(version)
        if old is None:
            raise StaleVersion(f"model version {version} is not loaded here (serving {cur.version})")
        return old

    def _remember(self, old) -> None:
        if old is not None:
            self._previous = {old.version: old}

    def status(self) -> Dict[str, Any]:
        return self.watcher.status()

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

    def __init__(self, args: Dict[str, Any]):
        self._start(args, ENCODER_PARTS, lambda f, v: UserEncoderModel(f, v))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def encode(self, requests: List[Dict[str, Any]]) -> List[np.ndarray]:
        return self.per_version(requests, lambda model, batch: model.encode(batch))


@serve.deployment
class Ranker(_Versioned):
    """Ranking replicas: the relevance MLP over the retriever's candidates (dynamically batched)."""

    def __init__(self, args: Dict[str, Any]):
        self._start(args, RANKER_PARTS, lambda f, v: RankerModel(f, v))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def score(self, lists: List[Dict[str, Any]]) -> List[np.ndarray]:
        return self.per_version(lists, lambda model, batch: model.score(batch))


@serve.deployment
class TextEmbedder(_Versioned):
    """The LLM for new item text (fine-tuned weights from the bundle when it has them)."""

    def __init__(self, args: Dict[str, Any]):
        self._start(args, TEXT_PARTS, lambda f, v: TextModel(f, v), keep_previous=False)

    async def embed(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        m = self.watcher.current
        return {"version": m.version, "embeddings": m.embed(items)}


@serve.deployment
class Retriever(_Versioned):
    """Catalog and item vectors in faiss, with upserts; candidates, ranker features, reasons.

    Upserted items are stored under ``catalog/upserts/`` before they are acknowledged, replayed
    into every new model version, and picked up by the other retriever replicas on their next poll.
    """

    def __init__(self, args: Dict[str, Any]):
        s = ServeSettings.from_args(args)
        self.settings = s
        self.storage = s.storage()
        self._init_versions()
        self._seen_upserts: set = set()
        self._upserts: Dict[str, Dict[str, Any]] = {}
        self.watcher = _watcher(s, RETRIEVER_PARTS, lambda f, v: RetrievalModel(f, self.storage, v),
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
        files = [f for f in self.storage.list_files(UPSERTS_PREFIX, (".parquet",)) if f not in self._seen_upserts]
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

    async def history(self, item_ids: List[str], exclude: List[str]) -> Dict[str, Any]:
        with self.lock:
            return self.watcher.current.history_inputs(item_ids, exclude)

    async def candidates(self, version: str, u: np.ndarray, hist_rows: List[int], hist_ts: List[int],
                         hist_events: List[int], exclude_rows: List[int], categories: Optional[List[str]],
                         n: int, covisit: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        with self.lock:
            return self.model_for(version).candidates(u, hist_rows, hist_ts, hist_events, exclude_rows,
                                                      categories, n, covisit)

    async def cold_start(self, n: int, exclude: List[str], categories: Optional[List[str]]) -> Dict[str, Any]:
        with self.lock:
            return self.watcher.current.cold_start_items(n, exclude, categories)

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
        path = f"{UPSERTS_PREFIX}/part-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}.parquet"
        await asyncio.to_thread(self.storage.write_bytes_atomic, path, table_bytes(pa.Table.from_pylist(rows)))
        with self.lock:
            m = self.watcher.current
            new = m.upsert(rows, _embeddings(rows))
            self._seen_upserts.add(path)
            for r in rows:
                self._upserts[r["item_id"]] = r
        return {"new": new, "version": m.version, "size": m.size}


def _embeddings(rows: List[Dict[str, Any]]) -> Optional[np.ndarray]:
    if not rows or any(r.get("embedding") is None for r in rows):
        return None
    return np.asarray([r["embedding"] for r in rows], dtype=np.float32)


@serve.deployment
class EventStore:
    """Live per-user state and the durable feedback log (one holder; rebuilt from storage on start)."""

    def __init__(self, args: Dict[str, Any], shard: int = 0):
        s = ServeSettings.from_args(args)
        self.shard, self.shards = shard, s.live_state_shards
        self.storage = s.storage()
        self.state = SessionState(s.history_len, s.live_users_max)
        self.log = GroupCommitLog(self.storage, s.feedback_linger_ms / 1000.0, s.feedback_max_events)
        self.acked_ids = RecentIds()
        # Keyed pseudonyms: every user id is mapped here, the one place that stores and looks up
        # users, so no raw id reaches the feedback log or live state (matches a dataset
        # preprocessed with preprocess.pseudonymize_users under the same LLMREC_PRIVACY_KEY).
        self.pseudo = privacy.Pseudonymizer.from_env() if s.pseudonymize_users else None
        t0 = time.perf_counter()
        self.rebuilt = self._rebuild(s.model)
        self.rebuilt["seconds"] = round(time.perf_counter() - t0, 2)
        log.warning("event store rebuilt: %s", self.rebuilt)

    def _rebuild(self, model: str) -> Dict[str, Any]:
        out = {"dataset_events": 0, "feedback_events": 0, "feedback_shards": 0}
        pointer = registry.read_pointer(self.storage, model)
        lin = (pointer or {}).get("lineage", {})
        if lin.get("dataset") and lin.get("dataset_version"):
            prefix = f"datasets/{lin['dataset']}/{lin['dataset_version']}"
            try:
                out["dataset_pseudonymized"] = bool(self.storage.read_json(f"{prefix}/stats.json")
                                                    .get("pseudonymized_users"))
            except Exception:
                out["dataset_pseudonymized"] = None
            if out["dataset_pseudonymized"] is not None and out["dataset_pseudonymized"] != (self.pseudo is not None):
                log.error("dataset %s has %s user ids but this service has pseudonymize_users=%s: histories "
                          "will not match (set both the same)", prefix,
                          "pseudonymized" if out["dataset_pseudonymized"] else "raw", self.pseudo is not None)
            for split in ("train", "valid", "test"):
                try:
                    t = self.storage.read_parquet(f"{prefix}/{split}", columns=["user_id", "item_id", "ts", "event"])
                except Exception as exc:
                    log.warning("history from %s/%s unavailable: %s", prefix, split, exc)
                    continue
                out["dataset_events"] += self.state.add_table(shard_rows(t, self.shard, self.shards))
        shards = list_feedback_shards(self.storage, after=lin.get("feedback_watermark", ""))
        out["feedback_shards"] = len(shards)
        feedback = shard_rows(read_feedback(self.storage, shards, event_ids=True), self.shard, self.shards)
        for eid in feedback["event_id"].drop_null().to_pylist():  # a retry after the restart counts once too
            self.acked_ids.seen(eid)
        out["feedback_events"] = self.state.add_table(feedback.drop_columns(["event_id"]), covisit=True)
        return out

    def _uid(self, user_id: str) -> str:
        return self.pseudo(user_id) if self.pseudo is not None else user_id

    async def append(self, rows: List[Dict[str, Any]]) -> str:
        if self.pseudo is not None:
            rows = [{**r, "user_id": self.pseudo(r["user_id"])} for r in rows]
        path = await self.log.append(rows)  # returns once durable
        for r in rows:
            if r.get("event_id") is not None and self.acked_ids.seen(r["event_id"]):
                continue  # a retry of an acknowledged event: stored again, counted once
            self.state.add(r["user_id"], r["item_id"], r.get("event") or "click", r["ts"])
        return path

    async def history(self, user_id: str) -> List[tuple]:
        return self.state.history(self._uid(user_id))

    async def context(self, user_id: Optional[str], recent_items: List[str]) -> Dict[str, Any]:
        """History and live co-visits for one recommendation (``SessionState.context``)."""
        return self.state.context(self._uid(user_id) if user_id else None, recent_items)

    async def covisit(self, items: List[str]) -> Dict[str, Any]:
        """Live co-visits of ``items`` among this shard's users (the requester lives elsewhere)."""
        return self.state.covisit_rows(items)

    async def users(self, limit: int) -> List[str]:
        return self.state.users(limit)

    async def ranked_users(self, limit: int) -> List[tuple]:
        return [(u, len(self.state.history(u))) for u in self.state.users(limit)]

    async def forget(self, user_id: str) -> Dict[str, Any]:
        """Forget the user everywhere: live state now, then every stored table (privacy.forget_user)
        once the events queued before this call are stored, so none of them escapes the rewrite."""
        uid = self._uid(user_id)
        live = self.state.forget(uid)
        await self.log.drain()
        record = await asyncio.to_thread(privacy.forget_user, self.storage, user_id)
        self.state.forget(uid)
        return {**record, "live_events_removed": live}

    async def status(self) -> Dict[str, Any]:
        return {"shard": self.shard, "shards": self.shards,
                "users": len(self.state), "users_spilled": self.state.spilled, "users_reloaded": self.state.reloaded,
                "rebuilt": self.rebuilt, "shards_written": self.log.shards_written,
                "events_written": self.log.events_written, "write_failures": self.log.write_failures,
                "last_write_ms": round(self.log.last_write_s * 1000, 2),
                "live_covisit_events": self.state.covisit.events, "live_covisit_items": len(self.state.covisit.pairs)}


class ShardedEvents:
    """The EventStore shards behind the one interface the ingress calls (``h.method.remote``):
    per-user calls go to the shard that owns the user, event batches are split by owner and
    acknowledged once every part is stored, co-visits of the requester's items are summed over
    all shards (``merge_covisit``), listings and status gather every shard."""

    def __init__(self, handles: List[Any], pseudonymize: bool):
        self.handles = list(handles)
        self.pseudo = privacy.Pseudonymizer.from_env() if pseudonymize else None
        for name in ("append", "context", "history", "users", "forget", "status"):
            setattr(self, name, _Remote(getattr(self, "_" + name)))

    def _index(self, user_id: str) -> int:
        return user_shard(self.pseudo(user_id) if self.pseudo is not None else user_id, len(self.handles))

    def owner(self, user_id: str):
        return self.handles[self._index(user_id)]

    async def _append(self, rows: List[Dict[str, Any]]) -> str:
        """Stored (every part durable) before it returns; a failed part fails the call, and the
        client's retry with the same event_ids counts the parts already stored once."""
        parts: Dict[int, List[Dict[str, Any]]] = {}
        for r in rows:
            parts.setdefault(self._index(r["user_id"]), []).append(r)
        return ",".join(await asyncio.gather(*[self.handles[k].append.remote(p) for k, p in parts.items()]))

    async def _context(self, user_id: Optional[str], recent_items: List[str]) -> Dict[str, Any]:
        if not user_id:  # anonymous: only co-visits of the request's items, from every shard
            parts = await asyncio.gather(*[h.covisit.remote(recent_items) for h in self.handles])
            return {"history": [], "covisit": merge_covisit(parts)}
        owner = self.owner(user_id)
        own = await owner.context.remote(user_id, recent_items)
        items = [e[0] for e in own["history"]] + list(recent_items)
        others = await asyncio.gather(*[h.covisit.remote(items) for h in self.handles if h is not owner])
        return {"history": own["history"], "covisit": merge_covisit([own["covisit"], *others])}

    async def _history(self, user_id: str) -> List[tuple]:
        return await self.owner(user_id).history.remote(user_id)

    async def _users(self, limit: int) -> List[str]:
        parts = await asyncio.gather(*[h.ranked_users.remote(limit) for h in self.handles])
        return [u for u, _ in sorted((x for p in parts for x in p), key=lambda x: -x[1])[:limit]]

    async def _forget(self, user_id: str) -> Dict[str, Any]:
        return await self.owner(user_id).forget.remote(user_id)

    async def _status(self) -> Dict[str, Any]:
        parts = await asyncio.gather(*[h.status.remote() for h in self.handles])
        out: Dict[str, Any] = {k: sum(p[k] for p in parts) for k in (
            "users", "users_spilled", "users_reloaded", "shards_written", "events_written", "write_failures",
            "live_covisit_events", "live_covisit_items")}
        out.update(shards=len(parts), last_write_ms=max(p["last_write_ms"] for p in parts), per_shard=parts,
                   # events: each shard rebuilt its own users'; shards and seconds: every shard read
                   # the whole log, in parallel
                   rebuilt={**{k: sum(p["rebuilt"].get(k) or 0 for p in parts) for k in ("dataset_events",
                                                                                        "feedback_events")},
                            **{k: max(p["rebuilt"].get(k) or 0 for p in parts) for k in ("feedback_shards",
                                                                                        "seconds")}})
        return out


class _Remote:
    """``obj.method.remote(...)`` for a coroutine function, like a DeploymentHandle method."""

    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args, **kwargs):
        return self._fn(*args, **kwargs)


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


# -- ingress -----------------------------------------------------------------------------------
app = FastAPI(title="llmrec", version="1", description="LLM-enhanced real-time recommendations on Ray Serve.")


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    """Every error answers {"error": "..."} (the field first where one is at fault), like 422s."""
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)}, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    errors = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        errors.append(f"{loc or 'body'}: {e.get('msg')}")
    return JSONResponse(status_code=422, content={"error": "; ".join(errors), "detail": [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]})


class Guard:
    """Access, rate and size checks before a route reads anything (an unauthenticated client
    cannot make the replica read a body). Plain ASGI, not Starlette's BaseHTTPMiddleware: it
    adds no task or stream per request on the hot path."""

    BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k: v for k, v in scope.get("headers") or () if k in (b"authorization", b"content-length")}
        authorization = headers[b"authorization"].decode("latin-1") if b"authorization" in headers else None
        method, path = scope["method"], scope["path"]
        policy, limiter = auth.current()
        denied = policy.check(method, path, authorization)
        if denied is not None:
            status, message = denied
            extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return await JSONResponse({"error": message}, status, extra)(scope, receive, send)
        if path != "/healthz":  # probes are never throttled
            client = scope.get("client")
            wait = limiter.hit(auth.client_id(authorization, client[0] if client else None))
            if wait is not None:
                return await JSONResponse({"error": f"rate limit: retry in {wait} s"}, 429,
                                          {"Retry-After": str(wait)})(scope, receive, send)
        too_big = JSONResponse({"error": f"body: larger than {api.MAX_BODY_BYTES} bytes"}, 413)
        size = headers.get(b"content-length")
        if size is not None:
            if not size.isdigit() or int(size) > api.MAX_BODY_BYTES:
                return await too_big(scope, receive, send)
            return await self.app(scope, receive, send)
        if method not in self.BODY_METHODS:
            return await self.app(scope, receive, send)
        # No length announced (chunked): count while reading, stop at the limit, and replay the
        # body read so far to the route.
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > api.MAX_BODY_BYTES:
                return await too_big(scope, receive, send)
        pending = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return await self.app(scope, replay, send)


app.add_middleware(Guard)


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    return reg, {
        "latency": Histogram("llmrec_request_seconds", "request latency", ["route"], registry=reg,
                             buckets=(0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5)),
        "served": Counter("llmrec_recommendations_served", "items recommended", registry=reg),
        "requests": Counter("llmrec_requests", "requests by route and status", ["route", "status"], registry=reg),
        "events": Counter("llmrec_events_ingested", "events stored durably", registry=reg),
        "version": Gauge("llmrec_model_info", "model version served (value 1)", ["deployment", "version"], registry=reg),
        "swaps": Gauge("llmrec_model_swaps", "hot swaps since replica start", ["deployment"], registry=reg),
        "stale": Counter("llmrec_stale_version_retries", "requests re-pinned because a replica did not hold "
                         "their model version (a swap or a new replica between two hops)", registry=reg),
    }


def _http_host() -> Optional[str]:
    """The address Serve's proxies bind to (None if the controller cannot say)."""
    try:
        import ray
        from ray.serve.context import _get_global_client

        return ray.get(_get_global_client()._controller.get_http_config.remote(), timeout=30).host
    except Exception as exc:  # an internal API: a newer Ray may move it
        log.warning("could not read Serve's http host (%s); bind check skipped", exc)
        return None


# Everything the ingress uses must be defined above it: serve.ingress serialises the class when
# it is decorated.
@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, encoder: DeploymentHandle, retriever: DeploymentHandle, ranker: DeploymentHandle,
                 text: DeploymentHandle, events: DeploymentHandle, args: Dict[str, Any]):
        self.settings = ServeSettings.from_args(args)
        policy = auth.AccessPolicy.load(keys_file=self.settings.keys_file,
                                        require_read_key=self.settings.require_read_key)
        auth.check_bind(policy, _http_host())
        auth.configure(policy, auth.RateLimiter(self.settings.rate_limit, self.settings.rate_limit_storage))
        log.info("access: %s", auth.dumps_public(policy))
        if self.settings.mode == "fused":  # the model stages live in this replica
            encoder = LocalHandle(UserEncoder.func_or_class(args))
            retriever = LocalHandle(Retriever.func_or_class(args))
            ranker = LocalHandle(Ranker.func_or_class(args))
        if isinstance(events, list):  # live state sharded by user (live_state_shards > 1)
            events = ShardedEvents(events, self.settings.pseudonymize_users)
        self.encoder, self.retriever, self.ranker, self.text, self.events = encoder, retriever, ranker, text, events
        self.backend = HandleBackend(encoder, retriever, ranker, events)
        self.registry, self.m = _metrics()
        self.page = (STATIC / "index.html").read_text()

    def _observe(self, route: str, t0: float, status: int) -> None:
        self.m["latency"].labels(route).observe(time.perf_counter() - t0)
        self.m["requests"].labels(route, str(status)).inc()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self) -> str:
        return self.page

    @app.get("/healthz")
    async def healthz(self) -> Dict[str, Any]:
        status = await self.retriever.status.remote()
        return {"status": "ok", "model_version": status["version"]}

    @app.get("/v1/version")
    async def version(self) -> Dict[str, Any]:
        names = ("encoder", "retriever", "ranker", "text")
        handles = (self.encoder, self.retriever, self.ranker, self.text)
        out = dict(zip(names, await asyncio.gather(*[h.status.remote() for h in handles])))
        out["events"] = await self.events.status.remote()
        out["model_version"] = out["retriever"]["version"]
        return out

    @app.get("/metrics", include_in_schema=False)
    async def metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        try:
            v = await self.version()
            for name in ("encoder", "retriever", "ranker", "text"):
                self.m["version"].labels(name, v[name]["version"]).set(1)
                self.m["swaps"].labels(name).set(v[name]["swaps"])
        except Exception as exc:  # metrics must answer even when a deployment is down
            log.warning("metrics: version status unavailable: %s", exc)
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/recommend", response_model=api.RecommendResponse)
    async def recommend(self, req: api.RecommendRequest) -> api.RecommendResponse:
        t0 = time.perf_counter()
        try:
            attempt = 0
            while True:
                try:
                    out = await recommend(req, self.backend, self.settings.candidates, self.settings.history_len, t0)
                    break
                except StaleVersion:  # a swap between two hops: re-pin to the version now served
                    if time.perf_counter() - t0 > STALE_WAIT_S:
                        raise
                    self.m["stale"].inc()
                    await asyncio.sleep(min(0.05 * 2 ** attempt, 0.5))
                    attempt += 1
        except Exception as exc:
            self._observe("recommend", t0, 503)
            log.exception("recommend failed")
            raise HTTPException(503, f"recommendation backend unavailable: {exc}", headers=RETRY_AFTER) from None
        self._observe("recommend", t0, 200)
        self.m["served"].inc(len(out.items))
        return out

    @app.post("/v1/events", status_code=202, response_model=api.EventsResponse)
    async def post_events(self, req: api.EventsRequest) -> JSONResponse:
        t0 = time.perf_counter()
        rows = [e.model_dump() for e in req.events]
        try:
            shard = await self.events.append.remote(rows)
        except Exception as exc:
            self._observe("events", t0, 503)
            raise HTTPException(503, f"events not stored, retry: {exc}", headers=RETRY_AFTER) from None
        self.m["events"].inc(len(rows))
        try:  # informational: the events are stored already, so this must not fail the request
            unknown = await self.retriever.known.remote(sorted({r["item_id"] for r in rows}))
        except Exception as exc:
            log.warning("events stored; catalog lookup for unknown_items failed: %s", exc)
            unknown = []
        self._observe("events", t0, 202)
        return JSONResponse(status_code=202, content=api.EventsResponse(
            accepted=len(rows), shard=shard, unknown_items=unknown).model_dump())

    @app.put("/v1/items", response_model=api.ItemsResponse)
    async def put_items(self, req: api.ItemsRequest) -> api.ItemsResponse:
        t0 = time.perf_counter()
        items = [x.model_dump() for x in req.items]
        try:
            emb = await self.text.embed.remote(items)
            out = await self.retriever.upsert.remote(items, emb["embeddings"])
        except Exception as exc:
            self._observe("items", t0, 503)
            raise HTTPException(503, f"items not indexed, retry: {exc}", headers=RETRY_AFTER) from None
        self._observe("items", t0, 200)
        return api.ItemsResponse(upserted=len(items), new=out["new"], model_version=out["version"])

    @app.get("/v1/items/{item_id}")
    async def get_item(self, item_id: str = PathParam(min_length=1, max_length=api.MAX_ID)) -> Dict[str, Any]:
        (item,) = await self.retriever.items.remote([item_id])
        if item is None:
            raise HTTPException(404, f"item_id: {item_id!r} is not in the catalog")
        return item

    # -- for the demo page ---------------------------------------------------------------------
    @app.get("/v1/users")
    async def users(self, limit: int = Query(20, ge=1, le=1000)) -> Dict[str, Any]:
        return {"users": await self.events.users.remote(limit)}

    @app.get("/v1/users/{user_id}/history")
    async def user_history(self, user_id: str = PathParam(min_length=1, max_length=api.MAX_ID),
                           limit: int = Query(20, ge=1, le=200)) -> Dict[str, Any]:
        hist = (await self.events.history.remote(user_id))[-limit:][::-1]
        items = await self.retriever.items.remote([h[0] for h in hist])
        return {"user_id": user_id, "events": [
            {"item_id": h[0], "event": EVENT_TYPES[h[1]], "ts": h[2], "title": (it or {}).get("title", "")}
            for h, it in zip(hist, items)]}


    @app.delete("/v1/users/{user_id}")
    async def forget_user(self, user_id: str = PathParam(min_length=1, max_length=api.MAX_ID)) -> Dict[str, Any]:
        """Forget the user: live state, feedback, datasets, reports (admin key). The answer is
        the audit record, which names the user only by a digest."""
        t0 = time.perf_counter()
        try:
            out = await self.events.forget.remote(user_id)
        except Exception as exc:
            self._observe("forget", t0, 503)
            log.error("forget failed: %s", type(exc).__name__)  # the id is not logged
            raise HTTPException(503, "forget not completed, retry (it is idempotent)", headers=RETRY_AFTER) from None
        self._observe("forget", t0, 200)
        return {"forgotten": True, **out}


def build(args: Optional[Dict[str, Any]] = None) -> serve.Application:
    """Application builder for ``serve run``/``serve deploy`` (``import_path: serve.app:build``).

    ``args`` are ``ServeSettings`` fields. Deployment options (replicas, autoscaling, resources)
    come from the config YAML; ``deployment_options`` (name -> options) applies the same
    settings when the app is started from Python (jobs.pipeline, tests).
    """
    args = dict(args or {})
    options: Dict[str, Dict[str, Any]] = args.pop("deployment_options", None) or {}
    s = ServeSettings.from_args(args)
    a = asdict(s)

    def dep(d):
        return d.options(**options[d.name]) if d.name in options else d

    text = dep(TextEmbedder).bind(a)
    if s.live_state_shards == 1:
        events = dep(EventStore).bind(a)
    else:  # one deployment per user shard, each with the EventStore options of the config
        events = [dep(EventStore).options(name=f"EventStore{k}").bind(a, k) for k in range(s.live_state_shards)]
    if s.mode == "fused":
        return dep(Ingress).bind(None, None, None, text, events, a)
    encoder = dep(UserEncoder).bind(a)
    retriever = dep(Retriever).bind(a)
    ranker = dep(Ranker).bind(a)
    return dep(Ingress).bind(encoder, retriever, ranker, text, events, a)
