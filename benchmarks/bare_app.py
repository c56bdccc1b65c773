"""What a user would run without Ray: one uvicorn process, FastAPI, the same request flow
(``serve/flow.py``) over the same model objects, the same live state and durable feedback log.
The serving benchmark's reference for what Ray Serve costs; not a product mode (no hot swap,
no autoscaling, no access control).

    python -m benchmarks.bare_app --storage <root> --port 8770
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from components import layout, registry
from components.online.feedback_log import GroupCommitLog, list_feedback_shards, read_feedback
from components.online.live_state import SessionState
from components.storage import Storage
from serve import api
from serve.flow import LocalBackend, recommend
from serve.models import RankerModel, UserEncoderModel
from serve.retrieval import RetrievalModel
from serve.watcher import fetch_parts


def build(storage_root: str, candidates: int = 100, history_len: int = 200) -> FastAPI:
    storage = Storage(storage_root)
    pointer = registry.read_pointer(storage, layout.MODEL)
    if pointer is None:
        raise SystemExit(f"no promoted model under {storage_root}")
    d = fetch_parts(storage, pointer, layout.RETRIEVER_PARTS + layout.RANKER_PARTS, Path(tempfile.mkdtemp()))
    v = pointer["run_id"]
    state = SessionState(history_len)
    lin = pointer["lineage"]
    for split in layout.SPLITS:
        state.add_table(storage.read_parquet(layout.join(layout.dataset(lin["dataset"], lin["dataset_version"]), split),
                                             columns=["user_id", "item_id", "ts", "event"]))
    state.add_table(read_feedback(storage, list_feedback_shards(storage, after=lin.get("feedback_watermark", ""))),
                    covisit=True)
    backend = LocalBackend(UserEncoderModel(d, v), RetrievalModel(d, v), RankerModel(d, v), state)
    feedback = GroupCommitLog(storage)
    app = FastAPI(title="llmrec (bare uvicorn reference)")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model_version": v}

    @app.post("/v1/recommend", response_model=api.RecommendResponse)
    async def rec(req: api.RecommendRequest) -> api.RecommendResponse:
        return await recommend(req, backend, candidates, history_len, time.perf_counter())

    @app.post("/v1/events", status_code=202, response_model=api.EventsResponse)
    async def events(req: api.EventsRequest) -> api.EventsResponse:
        rows = [e.model_dump() for e in req.events]
        shard = await feedback.append(rows)
        for r in rows:
            state.add(r["user_id"], r["item_id"], r.get("event") or "click", r["ts"])
        return api.EventsResponse(accepted=len(rows), shard=shard, unknown_items=[])

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--storage", required=True)
    ap.add_argument("--port", type=int, default=8770)
    args = ap.parse_args()
    uvicorn.run(build(args.storage), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
