"""Canary rollout in serving: the judge deployment and each ingress replica's view of the canary.

A canary is the file ``registry/<model>/canary.json`` (``components.registry.start_canary``): the
candidate bundle, its share of users and the control (the version promoted when it started).
Every model replica loads the candidate beside the promoted version (``serve.watcher``), verified
the same way. Each ingress replica reads the file (``CanaryView``), asks the retriever for the
candidate for the users whose stable hash falls in the share (``components.online.canary.assign``;
a user outside it is never served the candidate) and tells the judge what each version served
and what users did after. The judge (``CanaryJudge``, one replica) keeps the per-version online
metrics (``CanaryMonitor``) and applies the rule (``decide``) every ``canary_check_s``: promote
the candidate for everyone (a compare-and-swap on the registry pointer, the same hot swap as a
retrain's promotion), roll it back (the file is removed; replicas drop the candidate on their
next poll) or go on. Every start, decision and end is a JSON record under
``registry/<model>/canary-log/`` with the figures it read.

The metrics live in the judge's memory: a restarted judge starts them again from zero (the
canary itself, being a file, carries on).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence

from ray import serve

from components import registry
from components.config import ServeAppConfig
from components.data import privacy
from components.online.canary import CANDIDATE, CanaryMonitor, assign, with_rule
from serve.metrics import CanaryGauges
from serve.settings import as_settings, open_storage

log = logging.getLogger(__name__)

FLUSH_S = 0.25  # how often an ingress replica sends its records to the judge
BUFFER_MAX = 20_000  # records an ingress replica holds when the judge is unreachable (oldest dropped)


@serve.deployment(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.05})
class CanaryJudge:
    """The one holder of the running canary's online metrics and of its decision."""

    def __init__(self, settings: ServeAppConfig):
        s = as_settings(settings)
        self.storage, self.model = open_storage(s), s.model
        self.cfg, self.check_s = s.canary, s.canary_check_s
        self.canary: Optional[Dict[str, Any]] = None
        self.monitor: Optional[CanaryMonitor] = None
        self.last_decision: Optional[Dict[str, Any]] = None
        self.decisions = 0
        self.gauges = CanaryGauges()
        # Every change of the state above (the loop's judgement, start, end, records) runs on
        # this replica's event loop under this lock, with only storage calls in threads: a
        # decision is taken on the canary it read, never on one started or ended meanwhile.
        self._lock = asyncio.Lock()
        self._follow(registry.read_canary(self.storage, self.model))
        try:
            self._task = asyncio.get_running_loop().create_task(self._loop())
        except RuntimeError:  # constructed by hand (unit tests): ``judge()`` is called directly
            self._task = None

    def _follow(self, canary: Optional[Dict[str, Any]]) -> None:
        """Follow the canary file: a new candidate starts fresh metrics; no file, no canary."""
        if canary is None:
            self.canary = self.monitor = None
            return
        if self.canary is None or canary["run_id"] != self.canary["run_id"]:
            self.canary = canary
            # Its own thresholds (canary.json "rule", checked when it was written) over the app's.
            self.monitor = CanaryMonitor(canary["control"], canary["run_id"], canary["share"],
                                         with_rule(self.cfg, canary.get("rule")), salt=canary.get("salt"))
            self.last_decision = None
            log.warning("canary %s (%.0f%% of users) against %s: judging every %.1fs", canary["run_id"],
                        100 * canary["share"], canary["control"], self.check_s)

    async def _sync(self) -> None:
        self._follow(await asyncio.to_thread(registry.read_canary, self.storage, self.model))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            try:
                await self.judge()
            except Exception as exc:  # storage hiccup: the next round tries again
                log.warning("canary judgement failed: %s", exc)

    async def judge(self) -> Optional[Dict[str, Any]]:
        """Apply the rule once; promote, roll back or abandon when it says so. Returns the decision."""
        async with self._lock:
            await self._sync()
            canary, m = self.canary, self.monitor
            if m is None or canary is None:
                return None
            current = await asyncio.to_thread(registry.read_pointer, self.storage, self.model)
            if current is None or current["run_id"] != canary["control"]:
                # a retrain (or an operator) promoted another version: the control the
                # candidate is compared with no longer serves, so the comparison is void
                d = {"action": "abandon", "reason": f"the promoted version is now "
                     f"{current and current['run_id']!r}, not the control {canary['control']!r}",
                     "figures": m.metrics().to_dict()}
            else:
                d = m.decide().to_dict()
            self.last_decision, self.decisions = d, self.decisions + 1
            if d["action"] == "continue":
                self.gauges.set({"control": d["figures"]["control"], "candidate": d["figures"]["candidate"]})
                return d
            record = {"candidate": canary["run_id"], "control": canary["control"], "share": canary["share"],
                      "reason": d["reason"], "figures": d["figures"]}
            if d["action"] == "promote":
                try:
                    await asyncio.to_thread(registry.promote_canary, self.storage, canary, self.model)
                except registry.PromotionConflict as exc:  # the pointer moved: the comparison is void
                    d = {**d, "action": "abandon", "reason": f"{d['reason']}; not promoted: {exc}"}
                    record.update(reason=d["reason"])
            if d["action"] != "promote":  # rollback or abandon: the candidate goes
                await asyncio.to_thread(registry.end_canary, self.storage, self.model, canary["run_id"])
            await asyncio.to_thread(registry.log_canary, self.storage, {"action": d["action"], **record}, self.model)
            log.warning("canary %s: %s (%s)", canary["run_id"], d["action"], d["reason"])
            self.gauges.set(None)
            self.last_decision = d
            self.canary = self.monitor = None
            return d

    async def record(self, served: Sequence[Dict[str, Any]], feedback: Sequence[Dict[str, Any]]) -> None:
        """What the ingress replicas saw since their last flush (``CanaryView``)."""
        async with self._lock:
            if any(self.canary is None or r["canary"] != self.canary["run_id"] for r in (*served, *feedback)):
                await self._sync()  # a canary started since the last poll (or one ended: dropped below)
            m, canary = self.monitor, self.canary
            if m is None or canary is None:
                return
            for r in served:
                if r["canary"] == canary["run_id"]:
                    m.record_request(r["version"], r["user_id"], r["items"], r["latency_ms"], r["error"], r["ts_ms"])
            for e in feedback:
                if e["canary"] == canary["run_id"]:
                    m.record_feedback(e["user_id"], e["item_id"], e["event"], e["ts_ms"])

    async def status(self) -> Optional[Dict[str, Any]]:
        """The running canary with its metrics (None: none runs), and the last decision."""
        canary, m, last = self.canary, self.monitor, self.last_decision  # one consistent read
        if canary is None or m is None:
            return None if last is None else {"running": False, "last_decision": _brief(last)}
        return {"running": True, "version": canary["run_id"], "control": canary["control"],
                "share": canary["share"], "rule": canary.get("rule") or {}, "started_at": canary.get("created_at"),
                "metrics": m.metrics().to_dict(), "decisions": self.decisions, "last_decision": _brief(last)}

    async def start(self, run_id: str, share: float, rule: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Start a canary (``registry.start_canary`` checks it; ``rule``: its own thresholds).
        Returns ``{"canary": ...}``, or ``{"error": why, "status": 404|409|422}`` (no such bundle or
        no control; one runs already, or the candidate is the promoted version; a bad rule): errors
        as values, so the ingress's answer carries the message and not a remote traceback."""
        async with self._lock:
            if await asyncio.to_thread(registry.read_canary, self.storage, self.model) is not None:
                return {"error": "a canary is running: end it first (DELETE /v1/admin/canary)", "status": 409}
            try:
                with_rule(self.cfg, rule)
            except ValueError as exc:
                return {"error": str(exc), "status": 422}
            try:
                canary = await asyncio.to_thread(registry.start_canary, self.storage, run_id, share, self.model, rule)
            except LookupError as exc:
                return {"error": str(exc).strip("'\""), "status": 404}
            except ValueError as exc:
                return {"error": str(exc), "status": 409}
            self._follow(canary)
            return {"canary": canary}

    async def end(self, reason: str) -> Optional[Dict[str, Any]]:
        """End the canary without promoting it (roll back), logging its figures; None: none ran."""
        async with self._lock:
            await self._sync()
            canary, m = self.canary, self.monitor
            if canary is None:
                return None
            figures = m.metrics().to_dict() if m is not None else None
            await asyncio.to_thread(registry.end_canary, self.storage, self.model, canary["run_id"])
            await asyncio.to_thread(registry.log_canary, self.storage, {
                "action": "rollback", "candidate": canary["run_id"], "control": canary["control"],
                "share": canary["share"], "reason": reason, "figures": figures}, self.model)
            self.canary = self.monitor = None
            self.gauges.set(None)
            self.last_decision = {"action": "rollback", "reason": reason}
            return {"ended": canary["run_id"], "metrics": figures}


def _brief(d: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    return None if d is None else {"action": d["action"], "reason": d["reason"]}


class CanaryView:
    """One ingress replica's view of the running canary: which users it serves, and a buffer of
    what was served and acted on, flushed to the judge every ``FLUSH_S`` (off the request path;
    records are dropped, oldest first, past ``BUFFER_MAX`` while the judge is unreachable)."""

    def __init__(self, settings: ServeAppConfig, judge: Any):
        s = as_settings(settings)
        self.storage, self.model, self.poll_s, self.judge = open_storage(s), s.model, s.watch_interval_s, judge
        self.pseudo = privacy.Pseudonymizer.from_env() if s.pseudonymize_users else None
        self.canary: Optional[Dict[str, Any]] = None
        self._served: Deque[Dict[str, Any]] = deque(maxlen=BUFFER_MAX)
        self._feedback: Deque[Dict[str, Any]] = deque(maxlen=BUFFER_MAX)
        self._tasks: List[asyncio.Task] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._tasks = [loop.create_task(self._poll()), loop.create_task(self._flush())]

    def set(self, canary: Optional[Dict[str, Any]]) -> None:
        self.canary = canary

    async def _poll(self) -> None:
        while True:
            try:
                self.canary = await asyncio.to_thread(registry.read_canary, self.storage, self.model)
            except Exception as exc:  # keep the last view until storage answers again
                log.warning("canary poll failed: %s", exc)
            await asyncio.sleep(self.poll_s)

    async def _flush(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            if not self._served and not self._feedback:
                continue
            served, feedback = list(self._served), list(self._feedback)
            self._served.clear()
            self._feedback.clear()
            try:
                await self.judge.record.remote(served, feedback)
            except Exception as exc:  # put them back before the newer ones; the newest BUFFER_MAX stay
                log.warning("canary records not sent (%d served, %d events): %s", len(served), len(feedback), exc)
                self._served = deque([*served, *self._served], maxlen=BUFFER_MAX)
                self._feedback = deque([*feedback, *self._feedback], maxlen=BUFFER_MAX)

    def prefer(self, user_id: Optional[str]) -> Optional[str]:
        """The candidate's version for a user in the canary's share, else None (the promoted one)."""
        c = self.canary
        if c is None or assign(user_id, c["share"], c.get("salt") or c["run_id"]) != CANDIDATE:
            return None
        return c["run_id"]

    def _uid(self, user_id: Optional[str]) -> Optional[str]:
        return self.pseudo(user_id) if self.pseudo is not None and user_id else user_id

    def served(self, version: str, user_id: Optional[str], items: List[str], latency_ms: float,
               error: bool = False) -> None:
        c = self.canary
        if c is not None:
            self._served.append({"canary": c["run_id"], "version": version, "user_id": self._uid(user_id),
                                 "items": items, "latency_ms": latency_ms, "error": error,
                                 "ts_ms": int(time.time() * 1000)})

    def acted(self, rows: List[Dict[str, Any]]) -> None:
        c = self.canary
        if c is not None:
            now = int(time.time() * 1000)  # the server's receive time: client clocks drift
            self._feedback.extend({"canary": c["run_id"], "user_id": self._uid(r["user_id"]), "item_id": r["item_id"],
                                   "event": r.get("event") or "click", "ts_ms": now} for r in rows)
