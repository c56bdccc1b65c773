"""The HTTP API (the contract in DESIGN.md, "Serving contract"): the FastAPI routes of the ingress
deployment. Each route validates its request (``serve/api.py``), calls the deployments through
their handles and answers; ``/v1/recommend`` runs the request flow of ``serve/flow.py``.

A new endpoint goes here (its request and response models in ``serve/api.py``, the right it needs
in ``serve/auth.py``). Access, rate and size checks run before any route (``serve/guard.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional

from fastapi import FastAPI, HTTPException, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from components.config import ServeAppConfig
from components.data.schemas import EVENT_TYPES
from serve import api
from serve.deployments import StaleVersion, fused_models
from serve.events import ShardedEvents
from serve.flow import HandleBackend, recommend
from serve.guard import Guard, configure_access
from serve.metrics import CONTENT_TYPE, MODEL_DEPLOYMENTS, IngressMetrics, cluster_exposition
from serve.rollout import CanaryView
from serve.settings import as_settings

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"

# How long a request may wait for every stage to load the version the retriever answered with.
# Replicas poll the registry on their own clocks, so one can be a poll interval plus a load behind
# another (seen: ~0.8 s on 2 busy cores); the retries wait it out instead of failing the request.
STALE_WAIT_S = 10.0
# A 503 (storage or a backend replica down) tells the client when to retry; every 503 route is
# safe to retry (events carry an optional event_id that makes a retry count once).
RETRY_AFTER = {"Retry-After": "1"}

http_app = FastAPI(title="llmrec", version="1", description="LLM-enhanced real-time recommendations on Ray Serve.")

# The key the Guard checks, declared in the OpenAPI schema so that /docs has an Authorize button.
# Only a declaration: auto_error=False reads the header and never answers, so the Guard (which runs
# before any route) stays the one place that answers 401/403, with its own messages.
API_KEY = HTTPBearer(scheme_name="apiKey", auto_error=False, description=(
    "Authorization: Bearer <key>. LLMREC_WRITE_KEY may post events; LLMREC_ADMIN_KEY may also upsert "
    "items, read users and histories and forget users; reads need a key only with require_read_key "
    "or LLMREC_READ_KEY set (serve/auth.py)."))
NEEDS_KEY = Security(API_KEY)  # on the write and admin routes (serve/auth.py _ROUTES)
# The read routes: a key only when the config asks for one, so optional ({} = none); declared in
# the schema alone, which adds no dependency to the request path.
KEY_IF_REQUIRED = {"security": [{}, {API_KEY.scheme_name: []}]}


@http_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    """Every error answers {"error": "..."} (the field first where one is at fault), like 422s."""
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)}, headers=exc.headers)


@http_app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    errors = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        errors.append(f"{loc or 'body'}: {e.get('msg')}")
    return JSONResponse(status_code=422, content={"error": "; ".join(errors), "detail": [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]})


http_app.add_middleware(Guard)


# Everything the ingress uses must be defined above it: serve.ingress serialises the class when
# it is decorated.
# How often each ingress replica records the model versions and swaps it sees (llmrec_model_info):
# Prometheus scrapes the Ray metrics agents, not this replica, so the replica keeps them fresh
# itself; Ray's agents export on a 10 s interval by default.
MODEL_INFO_REFRESH_S = 10.0


@serve.deployment
@serve.ingress(http_app)
class Ingress:
    """The HTTP front door. ``encoder``/``retriever``/``ranker`` are None in fused mode (the
    models then live in this replica); ``events`` is a list of handles with sharded live state."""

    def __init__(self, encoder: Optional[DeploymentHandle], retriever: Optional[DeploymentHandle],
                 ranker: Optional[DeploymentHandle], text: DeploymentHandle, events: Any, judge: DeploymentHandle,
                 settings: ServeAppConfig):
        self.settings = s = as_settings(settings)
        configure_access(s)
        if s.mode == "fused":  # the model stages live in this replica
            encoder, retriever, ranker = fused_models(s)
        if isinstance(events, list):  # live state sharded by user (live_state_shards > 1)
            events = ShardedEvents(events, s.pseudonymize_users)
        self.encoder, self.retriever, self.ranker, self.text, self.events = encoder, retriever, ranker, text, events
        self.backend = HandleBackend(encoder, retriever, ranker, events)
        self.metrics = IngressMetrics()
        self.judge, self.canary = judge, CanaryView(s, judge)
        self.page = (STATIC / "index.html").read_text()
        try:  # Serve runs the constructor on the replica's event loop
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a hand-built ingress (no replica, no loop) records nothing anyway
            loop = None
        # kept here: the loop holds only a weak reference to a task
        self._model_info = loop.create_task(self._record_model_info()) if loop else None
        if loop:
            self.canary.start(loop)

    async def _record_model_info(self) -> None:
        while True:
            try:
                self.metrics.set_versions(await self._model_status())
            except Exception as exc:  # a deployment down or starting: the next round records it
                log.debug("model info not recorded: %s", exc)
            await asyncio.sleep(MODEL_INFO_REFRESH_S)

    @http_app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self) -> str:
        return self.page

    @http_app.get("/healthz", openapi_extra=KEY_IF_REQUIRED)
    async def healthz(self) -> Dict[str, Any]:
        status = await self.retriever.status.remote()
        return {"status": "ok", "model_version": status["version"]}

    async def _model_status(self) -> Dict[str, Any]:
        handles = (self.encoder, self.retriever, self.ranker, self.text)
        return dict(zip(MODEL_DEPLOYMENTS, await asyncio.gather(*[h.status.remote() for h in handles])))

    @http_app.get("/v1/version", openapi_extra=KEY_IF_REQUIRED)
    async def version(self) -> Dict[str, Any]:
        out = await self._model_status()
        out["events"] = await self.events.status.remote()
        out["model_version"] = out["retriever"]["version"]
        try:
            out["canary"] = await self.judge.status.remote()
        except Exception as exc:  # the judge restarting: the rest of the answer still holds
            out["canary"] = {"error": f"canary judge unavailable: {type(exc).__name__}"}
        return out

    @http_app.get("/metrics", include_in_schema=False)
    async def prometheus(self) -> Response:
        """The llmrec series of every replica (serve/metrics.py): gathered from the Ray metrics
        agent of every alive node, so the answer does not depend on the replica that serves it."""
        return Response(await asyncio.to_thread(cluster_exposition), media_type=CONTENT_TYPE)

    @http_app.post("/v1/recommend", response_model=api.RecommendResponse, openapi_extra=KEY_IF_REQUIRED)
    async def recommend(self, req: api.RecommendRequest) -> api.RecommendResponse:
        t0 = time.perf_counter()
        prefer = self.canary.prefer(req.user_id)  # a canary's candidate, for the users in its share
        try:
            attempt = 0
            while True:
                try:
                    out = await recommend(req, self.backend, self.settings.candidates, self.settings.history_len, t0,
                                          prefer)
                    break
                except StaleVersion:  # a swap between two hops: re-pin to the version now served
                    if time.perf_counter() - t0 > STALE_WAIT_S:
                        raise
                    self.metrics.stale_retry()
                    if prefer:  # a hop has not loaded the candidate yet: this request gets the promoted one
                        prefer = None
                        continue
                    await asyncio.sleep(min(0.05 * 2 ** attempt, 0.5))
                    attempt += 1
        except Exception as exc:
            self.metrics.observe("recommend", t0, 503)
            log.exception("recommend failed")
            if self.canary.canary is not None:
                self.canary.served(prefer or self.canary.canary["control"], req.user_id, [],
                                   (time.perf_counter() - t0) * 1000, error=True)
            raise HTTPException(503, f"recommendation backend unavailable: {exc}", headers=RETRY_AFTER) from None
        self.metrics.observe("recommend", t0, 200, out.model_version)
        self.metrics.recommended(len(out.items))
        if self.canary.canary is not None:  # no list built on the hot path while no canary runs
            self.canary.served(out.model_version, req.user_id, [it.item_id for it in out.items], out.took_ms)
        return out

    @http_app.post("/v1/events", status_code=202, response_model=api.EventsResponse, dependencies=[NEEDS_KEY])
    async def post_events(self, req: api.EventsRequest) -> JSONResponse:
        t0 = time.perf_counter()
        rows = [e.model_dump() for e in req.events]
        try:  # the event store knows the served catalog itself: no lookup on the write path
            out = await self.events.append.remote(rows)
        except Exception as exc:
            self.metrics.observe("events", t0, 503)
            raise HTTPException(503, f"events not stored, retry: {exc}", headers=RETRY_AFTER) from None
        self.metrics.ingested(len(rows))
        self.canary.acted(rows)
        self.metrics.observe("events", t0, 202)
        return JSONResponse(status_code=202, content=api.EventsResponse(
            accepted=len(rows), shard=out["shard"], unknown_items=out["unknown"]).model_dump())

    @http_app.put("/v1/items", response_model=api.ItemsResponse, dependencies=[NEEDS_KEY])
    async def put_items(self, req: api.ItemsRequest) -> api.ItemsResponse:
        t0 = time.perf_counter()
        items = [x.model_dump() for x in req.items]
        try:
            emb = await self.text.embed.remote(items)
            out = await self.retriever.upsert.remote(items, emb["embeddings"])
        except Exception as exc:
            self.metrics.observe("items", t0, 503)
            raise HTTPException(503, f"items not indexed, retry: {exc}", headers=RETRY_AFTER) from None
        try:  # live co-visits count them from the next event (the store's poll catches a miss)
            await self.events.add_catalog.remote([x["item_id"] for x in items])
        except Exception as exc:
            log.warning("event store not told of %d upserted items (its next poll reads them): %s", len(items), exc)
        self.metrics.observe("items", t0, 200, out["version"])
        return api.ItemsResponse(upserted=len(items), new=out["new"], model_version=out["version"])

    @http_app.get("/v1/items/{item_id}", openapi_extra=KEY_IF_REQUIRED)
    async def get_item(self, item_id: str = PathParam(min_length=1, max_length=api.MAX_ID)) -> Dict[str, Any]:
        (item,) = await self.retriever.items.remote([item_id])
        if item is None:
            raise HTTPException(404, f"item_id: {item_id!r} is not in the catalog")
        return item

    # -- canary rollout (serve/rollout.py) -----------------------------------------------------
    @http_app.post("/v1/admin/canary", dependencies=[NEEDS_KEY])
    async def start_canary(self, req: api.CanaryRequest) -> Dict[str, Any]:
        """Serve a published bundle to ``share`` of the users beside the promoted version, judged
        by online metrics (admin key)."""
        try:
            rule = req.rule.model_dump(exclude_none=True) if req.rule is not None else None
            out = await self.judge.start.remote(req.run_id, req.share, rule)
        except Exception as exc:
            log.warning("canary not started: %s", exc)
            raise HTTPException(503, "canary judge or storage unavailable, retry", headers=RETRY_AFTER) from None
        if "error" in out:
            raise HTTPException(out["status"], out["error"])
        canary = out["canary"]
        self.canary.set(canary)
        return {"canary": {k: canary[k] for k in ("run_id", "share", "control", "rule", "created_at")}}

    @http_app.delete("/v1/admin/canary", dependencies=[NEEDS_KEY])
    async def end_canary(self) -> Dict[str, Any]:
        """End the running canary without promoting it (roll back; admin key): its figures are logged."""
        try:
            out = await self.judge.end.remote("ended by an operator (DELETE /v1/admin/canary)")
        except Exception as exc:
            log.warning("canary not ended: %s", exc)
            raise HTTPException(503, "canary judge or storage unavailable, retry", headers=RETRY_AFTER) from None
        if out is None:
            raise HTTPException(404, "no canary is running")
        self.canary.set(None)
        return out

    # -- for the demo page ---------------------------------------------------------------------
    @http_app.get("/v1/users", dependencies=[NEEDS_KEY])
    async def users(self, limit: int = Query(20, ge=1, le=1000)) -> Dict[str, Any]:
        return {"users": await self.events.users.remote(limit)}

    @http_app.get("/v1/users/{user_id}/history", dependencies=[NEEDS_KEY])
    async def user_history(self, user_id: str = PathParam(min_length=1, max_length=api.MAX_ID),
                           limit: int = Query(20, ge=1, le=200)) -> Dict[str, Any]:
        hist = (await self.events.history.remote(user_id))[-limit:][::-1]
        items = await self.retriever.items.remote([h[0] for h in hist])
        return {"user_id": user_id, "events": [
            {"item_id": h[0], "event": EVENT_TYPES[h[1]], "ts": h[2], "title": (it or {}).get("title", "")}
            for h, it in zip(hist, items)]}

    @http_app.delete("/v1/users/{user_id}", dependencies=[NEEDS_KEY])
    async def forget_user(self, user_id: str = PathParam(min_length=1, max_length=api.MAX_ID)) -> Dict[str, Any]:
        """Forget the user: live state, feedback, datasets, reports (admin key). The answer is
        the audit record, which names the user only by a digest."""
        t0 = time.perf_counter()
        try:
            out = await self.events.forget.remote(user_id)
        except Exception as exc:
            self.metrics.observe("forget", t0, 503)
            log.error("forget failed: %s", type(exc).__name__)  # the id is not logged
            raise HTTPException(503, "forget not completed, retry (it is idempotent)", headers=RETRY_AFTER) from None
        self.metrics.observe("forget", t0, 200)
        return {"forgotten": True, **out}
