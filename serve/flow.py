"""The /v1/recommend request flow, written once against a backend interface.

``HandleBackend`` calls the Serve deployments (each call one hop); ``LocalBackend`` calls the same
model objects in-process. The ingress uses the first; the serving benchmark measures the second
as the floor, so the difference is what Ray Serve adds.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import numpy as np

from components.data.schemas import EVENT_CODE
from serve import api


class HandleBackend:
    def __init__(self, encoder, retriever, ranker, events):
        self.encoder, self.retriever, self.ranker, self.events = encoder, retriever, ranker, events

    async def context(self, user_id: Optional[str], recent_items: List[str]) -> Dict[str, Any]:
        return await self.events.context.remote(user_id, recent_items)

    async def history_inputs(self, item_ids: List[str], exclude: List[str], prefer: Optional[str] = None) -> Dict[str, Any]:
        return await self.retriever.history.remote(item_ids, exclude, prefer)

    async def encode(self, request: Dict[str, Any]) -> np.ndarray:
        return await self.encoder.encode.remote(request)

    async def candidates(self, version: str, *args) -> Dict[str, Any]:
        return await self.retriever.candidates.remote(version, *args)

    async def score(self, lists: Dict[str, Any]) -> np.ndarray:
        return await self.ranker.score.remote(lists)

    async def cold_start(self, n: int, exclude: List[str], categories: Optional[List[str]],
                         prefer: Optional[str] = None) -> Dict[str, Any]:
        return await self.retriever.cold_start.remote(n, exclude, categories, prefer)


class LocalBackend:
    """The same calls on in-process objects (serve.models, serve.retrieval and
    components.online.live_state.SessionState)."""

    def __init__(self, encoder, retrieval, ranker, state):
        self.encoder, self.retrieval, self.ranker, self.state = encoder, retrieval, ranker, state

    async def context(self, user_id: Optional[str], recent_items: List[str]) -> Dict[str, Any]:
        return self.state.context(user_id, recent_items)

    async def history_inputs(self, item_ids: List[str], exclude: List[str], prefer: Optional[str] = None) -> Dict[str, Any]:
        return self.retrieval.history_inputs(item_ids, exclude)

    async def encode(self, request: Dict[str, Any]) -> np.ndarray:
        return self.encoder.encode([request])[0]

    async def candidates(self, version: str, *args) -> Dict[str, Any]:
        return self.retrieval.candidates(*args)

    async def score(self, lists: Dict[str, Any]) -> np.ndarray:
        return self.ranker.score([lists])[0]

    async def cold_start(self, n: int, exclude: List[str], categories: Optional[List[str]],
                         prefer: Optional[str] = None) -> Dict[str, Any]:
        return self.retrieval.cold_start_items(n, exclude, categories)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


async def recommend(req: api.RecommendRequest, backend, candidates: int, history_len: int,
                    t0: Optional[float] = None, prefer: Optional[str] = None) -> api.RecommendResponse:
    """Stored history + ``recent_events`` -> user vector -> candidates -> ranker -> top k with reasons.
    No known history (unknown user, no usable recent events) -> cold start. Live state answers
    the user's history and the live co-visits of their items in one call. ``prefer``: the canary
    candidate's version for a user in its share (the retriever answers it if it holds it; every
    later hop is pinned to the version it answered)."""
    t0 = time.perf_counter() if t0 is None else t0
    recent = [e.item_id for e in req.recent_events]
    live = await backend.context(req.user_id, recent) if req.user_id or recent else {"history": [], "covisit": None}
    stored = live["history"]
    entries = list(stored) + [(e.item_id, EVENT_CODE[e.event], e.ts or api.now_ms()) for e in req.recent_events]
    categories = req.filters.categories if req.filters and req.filters.categories else None
    h = await backend.history_inputs([e[0] for e in entries], req.exclude, prefer)
    asked = set(req.exclude) | {e.item_id for e in req.recent_events}
    unknown = [i for i in h["unknown"] if i in asked]  # stale ids in stored feedback are not the caller's
    known = [entries[k] for k in h["known"]][-history_len:]
    if not known:
        c = await backend.cold_start(req.k, req.exclude, categories, prefer)
        items = [api.RecommendedItem(item_id=x["item_id"], title=x["title"], score=float(s), reason=None,
                                     categories=x["categories"]) for x, s in zip(c["items"], c["scores"])]
        return api.RecommendResponse(user_id=req.user_id, items=items, model_version=c["version"],
                                     took_ms=_ms(t0), cold_start=True, unknown_items=unknown)
    version, rows, vectors = h["version"], h["rows"][-history_len:], h["vectors"][-history_len:]
    ts, ev = [e[2] for e in known], [e[1] for e in known]
    u = await backend.encode({"version": version, "vectors": vectors, "events": ev, "ts": ts})
    c = await backend.candidates(version, u, rows, ts, ev, h["exclude_rows"], categories, max(candidates, req.k),
                                 live["covisit"])
    if len(c["rows"]) == 0:
        return api.RecommendResponse(user_id=req.user_id, items=[], model_version=version, took_ms=_ms(t0),
                                     unknown_items=unknown)
    scores = await backend.score({"version": version, "u": u, "i": c["i"], "ctx": c["ctx"], "retrieval": c["retrieval"]})
    order = np.argsort(-np.asarray(scores), kind="stable")[:req.k]
    items = [api.RecommendedItem(item_id=c["items"][j]["item_id"], title=c["items"][j]["title"], score=float(scores[j]),
                                 reason=c["reasons"][j], reason_title=c["reason_titles"][j],
                                 categories=c["items"][j]["categories"]) for j in order]
    return api.RecommendResponse(user_id=req.user_id, items=items, model_version=version, took_ms=_ms(t0),
                                 unknown_items=unknown)
