"""The live-state holder: the EventStore deployment and, with ``live_state_shards`` > 1, the
router that shards it by user.

``EventStore`` keeps every user's recent history and the live co-visits in memory
(``components.online.live_state``) and writes ``POST /v1/events`` to the durable feedback log
(``components.online.feedback_log``) before acknowledging; after a restart it rebuilds both from
the promoted model's dataset and the feedback stored since. Every event is stored and joins its
user's history; only items of the served catalog count in the live co-visits. ``ShardedEvents`` puts the
``EventStore0..N-1`` shards behind the same interface, so the ingress does not know how many there are.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Dict, List, Optional

from ray import serve

from components import layout, registry
from components.config import ServeAppConfig
from components.data import privacy
from components.models.channels.covisit import LiveCovisitation, merge_covisit
from components.online.feedback_log import GroupCommitLog, RecentIds, list_feedback_shards, read_feedback
from components.online.live_state import SessionState, shard_rows, user_shard
from serve.settings import as_settings, open_storage

log = logging.getLogger(__name__)


@serve.deployment
class EventStore:
    """Live per-user state and the durable feedback log (one holder; rebuilt from storage on start)."""

    def __init__(self, settings: ServeAppConfig, shard: int = 0):
        s = as_settings(settings)
        self.shard, self.shards = shard, s.live_state_shards
        self.storage = open_storage(s)
        # This holder keeps its own copy of the served catalog (the promoted bundle's items and the
        # upserts), so an event batch needs no lookup on its way to storage: filled at rebuild,
        # told of each ``PUT /v1/items`` by the ingress (``add_catalog``) and refreshed by a poll
        # that also catches promotions and a missed notice. An item it does not know never becomes
        # a live co-visit.
        self.model, self.poll_s = s.model, s.watch_interval_s
        self._catalog_run: Optional[str] = None  # the bundle whose items are in the catalog
        self._catalog_files: set = set()  # upsert shards read into it
        covisit = LiveCovisitation(neighbours=s.live_covisit_neighbours, max_pairs=s.live_covisit_max_pairs,
                                   catalog=set())
        self.state = SessionState(s.history_len, s.live_users_max, spill_users_max=s.live_spill_users_max,
                                  covisit=covisit)
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
        threading.Thread(target=self._poll_catalog, name="catalog", daemon=True).start()

    def _rebuild(self, model: str) -> Dict[str, Any]:
        """Live state from the promoted model's dataset, then the feedback stored after it."""
        out = {"dataset_events": 0, "feedback_events": 0, "feedback_shards": 0}
        pointer = registry.read_pointer(self.storage, model)
        lin = (pointer or {}).get("lineage", {})
        out["catalog_items"] = self._load_catalog(pointer)
        if lin.get("dataset") and lin.get("dataset_version"):
            out.update(self._rebuild_from_dataset(layout.dataset(lin["dataset"], lin["dataset_version"])))
        shards = list_feedback_shards(self.storage, after=lin.get("feedback_watermark", ""))
        out["feedback_shards"] = len(shards)
        feedback = shard_rows(read_feedback(self.storage, shards, event_ids=True), self.shard, self.shards)
        for eid in feedback["event_id"].drop_null().to_pylist():  # a retry after the restart counts once too
            self.acked_ids.seen(eid)
        out["feedback_events"] = self.state.add_table(feedback.drop_columns(["event_id"]), covisit=True)
        return out

    def _load_catalog(self, pointer: Optional[Dict[str, Any]]) -> int:
        """Add the served catalog's ids not read yet: the promoted bundle's items (once per bundle)
        and the upsert shards written since the last call. Returns how many ids were read; a part
        that cannot be read now is tried again on the next call (fail closed until then)."""
        n = 0
        run = (pointer or {}).get("run_id")
        if pointer and pointer.get("prefix") and run != self._catalog_run:
            try:
                ids = self.storage.read_parquet(layout.join(pointer["prefix"], layout.ITEMS),
                                                columns=["item_id"])["item_id"].to_pylist()
                self.state.add_catalog(ids)
                self._catalog_run, n = run, len(ids)
            except Exception as exc:
                log.warning("catalog of run %s unavailable: %s", run, exc)
        for f in sorted(set(self.storage.list_files(layout.UPSERTS, (".parquet",))) - self._catalog_files):
            try:
                ids = self.storage.read_parquet(f, columns=["item_id"])["item_id"].to_pylist()
            except Exception as exc:
                log.warning("upserted items in %s unavailable: %s", f, exc)
                continue
            self.state.add_catalog(ids)
            self._catalog_files.add(f)
            n += len(ids)
        return n

    def _poll_catalog(self) -> None:
        while True:
            time.sleep(self.poll_s)
            try:
                self._load_catalog(registry.read_pointer(self.storage, self.model))
            except Exception as exc:  # storage hiccup: try again next interval
                log.warning("catalog poll failed: %s", exc)

    async def add_catalog(self, item_ids: List[str]) -> None:
        """Items just upserted through ``PUT /v1/items``: counted from the next event on."""
        self.state.add_catalog(item_ids)

    def _rebuild_from_dataset(self, prefix: str) -> Dict[str, Any]:
        """This shard's users' histories from the dataset's splits (the users it was trained on)."""
        out: Dict[str, Any] = {"dataset_events": 0}
        try:
            out["dataset_pseudonymized"] = bool(self.storage.read_json(layout.join(prefix, layout.STATS))
                                                .get("pseudonymized_users"))
        except Exception:
            out["dataset_pseudonymized"] = None
        if out["dataset_pseudonymized"] is not None and out["dataset_pseudonymized"] != (self.pseudo is not None):
            log.error("dataset %s has %s user ids but this service has pseudonymize_users=%s: histories "
                      "will not match (set both the same)", prefix,
                      "pseudonymized" if out["dataset_pseudonymized"] else "raw", self.pseudo is not None)
        for split in layout.SPLITS:
            try:
                t = self.storage.read_parquet(layout.join(prefix, split), columns=["user_id", "item_id", "ts", "event"])
            except Exception as exc:
                log.warning("history from %s/%s unavailable: %s", prefix, split, exc)
                continue
            out["dataset_events"] += self.state.add_table(shard_rows(t, self.shard, self.shards))
        return out

    def _uid(self, user_id: str) -> str:
        return self.pseudo(user_id) if self.pseudo is not None else user_id

    async def append(self, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Store ``rows`` (returns once durable), then add them to the live state. Returns the
        feedback shard and the ids among them outside the served catalog: those are stored and
        join the user's history, but are not counted in the live co-visits."""
        if self.pseudo is not None:
            rows = [{**r, "user_id": self.pseudo(r["user_id"])} for r in rows]
        path = await self.log.append(rows)  # returns once durable
        for r in rows:
            if r.get("event_id") is not None and self.acked_ids.seen(r["event_id"]):
                continue  # a retry of an acknowledged event: stored again, counted once
            self.state.add(r["user_id"], r["item_id"], r.get("event") or "click", r["ts"])
        return {"shard": path, "unknown": self.state.unknown(r["item_id"] for r in rows)}

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
                "users_dropped": self.state.dropped, "live_covisit_events": self.state.covisit.events,
                "live_covisit_items": len(self.state.covisit.pairs), "live_covisit_pairs": self.state.covisit.size,
                "live_covisit_skipped": self.state.covisit.skipped}


class ShardedEvents:
    """The EventStore shards behind the one interface the ingress calls (``h.method.remote``):
    per-user calls go to the shard that owns the user, event batches are split by owner and
    acknowledged once every part is stored, co-visits of the requester's items are summed over
    all shards (``merge_covisit``), listings and status gather every shard."""

    def __init__(self, handles: List[Any], pseudonymize: bool):
        self.handles = list(handles)
        self.pseudo = privacy.Pseudonymizer.from_env() if pseudonymize else None
        for name in ("append", "add_catalog", "context", "history", "users", "forget", "status"):
            setattr(self, name, _Remote(getattr(self, "_" + name)))

    def _index(self, user_id: str) -> int:
        return user_shard(self.pseudo(user_id) if self.pseudo is not None else user_id, len(self.handles))

    def owner(self, user_id: str):
        return self.handles[self._index(user_id)]

    async def _append(self, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Stored (every part durable) before it returns; a failed part fails the call, and the
        client's retry with the same event_ids counts the parts already stored once."""
        parts: Dict[int, List[Dict[str, Any]]] = {}
        for r in rows:
            parts.setdefault(self._index(r["user_id"]), []).append(r)
        done = await asyncio.gather(*[self.handles[k].append.remote(p) for k, p in parts.items()])
        return {"shard": ",".join(d["shard"] for d in done),
                "unknown": sorted({i for d in done for i in d["unknown"]})}

    async def _add_catalog(self, item_ids: List[str]) -> None:
        await asyncio.gather(*[h.add_catalog.remote(item_ids) for h in self.handles])

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
            "users", "users_spilled", "users_reloaded", "users_dropped", "shards_written", "events_written",
            "write_failures", "live_covisit_events", "live_covisit_items", "live_covisit_pairs",
            "live_covisit_skipped")}
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
