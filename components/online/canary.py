"""Canary between two model versions, judged by online metrics (no Ray: serving wraps it).

A candidate version serves a share of users chosen by a stable hash of the user id (``assign``);
the control (the promoted version) serves everyone else. ``CanaryMonitor`` records what each
version recommended to whom (``RecommendationLog``), attributes feedback events to the version
whose recommendation the user acted on, and keeps per-version online metrics (requests, errors,
latency, users served, recommendations, acted-on recommendations). ``decide`` turns a snapshot of
those metrics into promote, roll back or continue, with the figures it read.

Memory is bounded everywhere (``CanaryConfig``): recommendation lists per user and users held
for attribution, a time window past which lists are dropped, latency samples per version, and a
hash sample of users per version once there are many.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

CONTROL, CANDIDATE = "control", "candidate"
ACTIONS = ("promote", "rollback", "continue")
Interval = Tuple[float, float]


@dataclass
class CanaryConfig:
    # A feedback event is credited to a recommendation made to the same user at most this long
    # before it (the latest such recommendation). Events are best timed by the server's receive
    # time: client clocks drift, and an event stamped before the list it acted on is not credited.
    attribution_window_s: float = 3600.0
    # Recommendation lists kept per user for attribution, oldest out first (a user reloading a
    # page many times is acting on the last few lists, not the first).
    lists_per_user: int = 10
    # Users whose recent lists are held, least recently served out first (counted as evicted:
    # their later feedback goes uncredited, in either arm alike, so it costs signal, not bias).
    # Memory: ~3 KB a user at 10 lists of 10 items (measured), so ~150 MB at the default.
    attribution_users_max: int = 50_000
    # Event types that are not acting on a recommendation (they are never credited).
    negative_events: List[str] = field(default_factory=lambda: ["skip"])
    # Latency samples kept per version (the most recent), for p50 and p99.
    latency_samples: int = 2048
    # Distinct users tracked per version for users served and events per user; past it a uniform
    # hash sample of them is kept (the rate halves each time it fills) and the counts are estimates.
    users_sample_max: int = 100_000
    # Confidence of every interval (the share acted on, its difference, events per user).
    confidence: float = 0.95
    # Candidate requests (and control requests, for latency) before errors and latency are judged
    # and before any promotion.
    min_requests: int = 500
    # Roll back when the candidate's error rate exceeds control's by more than this (absolute).
    error_rate_margin: float = 0.01
    # Roll back when the candidate's p99 latency exceeds this multiple of control's; 0: not judged.
    latency_p99_ratio_max: float = 2.0
    # Recommendations per version before the acted-on share is compared either way (an interval
    # from a handful of lists is too wide to mean anything, and early looks are the noisiest).
    min_recommendations: int = 5_000
    # Candidate recommendations after which a candidate not worse than control by more than
    # noninferiority_margin is promoted (non-inferiority: the interval's lower end is above -margin).
    noninferiority_recommendations: int = 50_000
    # The non-inferiority margin, relative to control's acted-on share (0.05: 5% of it).
    noninferiority_margin: float = 0.05


def check_canary_config(cfg: Any) -> None:
    """Check values types cannot (a dataclass or its OmegaConf node); raise ValueError naming the field."""
    positive = ("attribution_window_s", "lists_per_user", "attribution_users_max", "latency_samples",
                "users_sample_max", "min_requests", "min_recommendations", "noninferiority_recommendations")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"canary.{name} must be > 0; got {getattr(cfg, name)}")
    if not 0 < cfg.confidence < 1:
        raise ValueError(f"canary.confidence must be in (0, 1); got {cfg.confidence}")
    for name in ("error_rate_margin", "latency_p99_ratio_max", "noninferiority_margin"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"canary.{name} must be >= 0; got {getattr(cfg, name)}")


@dataclass
class CanaryRule:
    """One canary's own decision thresholds, over the serving application's ``CanaryConfig``
    (``retrain.canary_rule``, the ``rule`` of ``POST /v1/admin/canary``; None: the application's
    value). The sample a comparison needs depends on the traffic and on the effect expected, which
    differ per experiment: a small shop or a demo needs fewer recommendations than the defaults,
    a subtle change more."""

    confidence: Optional[float] = None
    min_requests: Optional[int] = None
    error_rate_margin: Optional[float] = None
    latency_p99_ratio_max: Optional[float] = None
    min_recommendations: Optional[int] = None
    noninferiority_recommendations: Optional[int] = None
    noninferiority_margin: Optional[float] = None


RULE_FIELDS = tuple(f.name for f in dataclasses.fields(CanaryRule))


def rule_overrides(rule: Any) -> Dict[str, Any]:
    """The thresholds ``rule`` sets (a ``CanaryRule``, its OmegaConf node or a mapping), Nones
    left out; raises ValueError naming an unknown field."""
    if rule is None:
        return {}
    items = rule.items() if isinstance(rule, Mapping) or hasattr(rule, "items") else dataclasses.asdict(rule).items()
    out = {str(k): v for k, v in items if v is not None}
    unknown = sorted(set(out) - set(RULE_FIELDS))
    if unknown:
        raise ValueError(f"canary rule: unknown field(s) {', '.join(unknown)} (known: {', '.join(RULE_FIELDS)})")
    return out


def with_rule(cfg: CanaryConfig, rule: Any) -> CanaryConfig:
    """``cfg`` with one canary's ``rule`` applied, checked (ValueError names a bad field)."""
    out = dataclasses.replace(cfg, **rule_overrides(rule))
    check_canary_config(out)
    return out


def check_share(share: float) -> float:
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"canary share must be in [0, 1]; got {share}")
    return float(share)


def assign(user_id: Optional[str], share: float, salt: str) -> str:
    """The arm that serves ``user_id``: ``"candidate"`` for a ``share`` of users, else ``"control"``.

    blake2b of salt and id, not ``hash()``: every replica and restart must agree. The same id and
    salt always give the same arm; a new salt (a new canary) draws a new set of users. Raising the
    share keeps everyone already in the candidate arm. Anonymous users (no id) go to control: a
    stable arm needs a stable key, and their feedback cannot be attributed.
    """
    check_share(share)
    if not user_id or share == 0.0:
        return CONTROL
    digest = hashlib.blake2b(f"{salt}\x1f{user_id}".encode(), digest_size=8).digest()
    return CANDIDATE if int.from_bytes(digest, "big") < share * 2**64 else CONTROL


# -- intervals ---------------------------------------------------------------------------------

def z_value(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, trials: int, z: float) -> Interval:
    """Wilson score interval of a proportion; (0, 1) with no trials."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(k1: int, n1: int, k2: int, n2: int, z: float) -> Interval:
    """Interval of p1 - p2 by Newcombe's hybrid score method (his method 10, from the two Wilson
    intervals): better coverage than the normal approximation at small rates and counts."""
    p1, p2 = (k1 / n1 if n1 else 0.0), (k2 / n2 if n2 else 0.0)
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def mean_interval(values: np.ndarray, z: float) -> Optional[Interval]:
    """Normal interval of a mean over independent units (users); None below two of them."""
    if len(values) < 2:
        return None
    mean, se = float(values.mean()), float(values.std(ddof=1)) / math.sqrt(len(values))
    return max(0.0, mean - z * se), mean + z * se


# -- attribution -------------------------------------------------------------------------------

class _Shown:
    """One recommendation list: when, by which version, which items, and which were acted on."""

    __slots__ = ("ts", "version", "items", "acted")

    def __init__(self, ts: int, version: str, items: Sequence[str]):
        self.ts, self.version, self.items = ts, version, tuple(items)
        self.acted: Optional[set] = None


class RecommendationLog:
    """Who was recommended what, by which version and when, for attributing feedback. Bounded:
    ``lists_per_user`` lists per user, ``users_max`` users (least recently served out first,
    counted in ``evicted_users``), and users whose last list is older than the window are dropped
    as time moves on. Not locked: ``CanaryMonitor`` serialises its calls."""

    def __init__(self, window_ms: int, lists_per_user: int, users_max: int):
        self.window_ms, self.lists_per_user, self.users_max = window_ms, lists_per_user, users_max
        self._users: "OrderedDict[str, Deque[_Shown]]" = OrderedDict()
        self.evicted_users = 0  # dropped for room while their window was still open

    def __len__(self) -> int:
        return len(self._users)

    def lists_held(self) -> int:
        return sum(len(d) for d in self._users.values())

    def add(self, user_id: str, version: str, items: Sequence[str], ts: int) -> None:
        d = self._users.get(user_id)
        if d is None:
            d = self._users[user_id] = deque(maxlen=self.lists_per_user)
        else:
            self._users.move_to_end(user_id)
        d.append(_Shown(ts, version, items))
        self._expire(ts - self.window_ms)
        while len(self._users) > self.users_max:
            self._users.popitem(last=False)
            self.evicted_users += 1

    def _expire(self, cutoff: int) -> None:
        # Users are in order of their last list, so the stale ones are at the front.
        while self._users:
            user, d = next(iter(self._users.items()))
            if d[-1].ts >= cutoff:
                return
            del self._users[user]

    def attribute(self, user_id: str, item_id: str, ts: int) -> Optional[Tuple[str, bool]]:
        """The version of the latest list that showed ``item_id`` to ``user_id`` at most the window
        before ``ts`` (and not after it), and whether this is the first event on that list's item;
        None when no such list is held."""
        best = None
        for shown in self._users.get(user_id, ()):
            if shown.ts <= ts <= shown.ts + self.window_ms and item_id in shown.items:
                if best is None or shown.ts >= best.ts:
                    best = shown
        if best is None:
            return None
        first = best.acted is None or item_id not in best.acted
        if first:
            best.acted = best.acted or set()
            best.acted.add(item_id)
        return best.version, first


# -- per-version metrics -----------------------------------------------------------------------

def _user_hash(user_id: str) -> int:
    # Independent of the arm's hash (no salt, its own personalisation), so the sample is uniform in each arm.
    return int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=8, person=b"canary-users").digest(), "big")


class _UserSample:
    """Distinct users served and their credited events, in bounded memory: past ``max_users`` it
    keeps only users whose hash is below 2**64 / 2**level, the level rising each time it fills
    (adaptive hash sampling), so it holds a uniform sample of the users and ``estimate()`` their
    number. A sampled user is held from their first request on, so their counts are exact."""

    def __init__(self, max_users: int):
        self.max_users, self.level = max_users, 0
        self.events: Dict[str, int] = {}

    @property
    def rate(self) -> float:
        return 2.0 ** -self.level

    def _kept(self, user_id: str) -> bool:
        return self.level == 0 or _user_hash(user_id) >> (64 - self.level) == 0

    def served(self, user_id: str) -> None:
        if user_id in self.events or not self._kept(user_id):
            return
        self.events[user_id] = 0
        while len(self.events) > self.max_users:
            self.level += 1
            self.events = {u: n for u, n in self.events.items() if self._kept(u)}

    def credit(self, user_id: str) -> None:
        if user_id in self.events:
            self.events[user_id] += 1

    def estimate(self) -> int:
        return round(len(self.events) / self.rate)


class _VersionCounters:
    def __init__(self, cfg: Any):
        self.requests = self.errors = self.recommendations = self.acted_on = self.events = 0
        self.latency_ms: Deque[float] = deque(maxlen=cfg.latency_samples)
        self.users = _UserSample(cfg.users_sample_max)


@dataclass(frozen=True)
class VersionMetrics:
    """One version's online figures. ``acted_share`` is acted-on recommendations (an item the
    user then acted on, counted once per list) over recommendations to known users; its interval
    is Wilson's, which treats the recommendations as independent (lists of one user correlate, so
    it is somewhat narrow). ``events_per_user``: credited events per user served (a normal
    interval over users). With more users than ``users_sample_max`` the per-user figures come
    from a hash sample at ``user_sample_rate``."""

    version: str
    requests: int
    errors: int
    error_rate: float
    latency_p50_ms: Optional[float]
    latency_p99_ms: Optional[float]
    recommendations: int
    acted_on: int
    acted_share: float
    acted_share_ci: Interval
    events: int
    users_served: int
    users_sampled: int  # the users the per-user figures average over (all of them at rate 1)
    user_sample_rate: float
    events_per_user: float
    events_per_user_ci: Optional[Interval]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _version_metrics(version: str, c: _VersionCounters, z: float) -> VersionMetrics:
    lat = np.fromiter(c.latency_ms, float, len(c.latency_ms))
    p50, p99 = (float(v) for v in np.percentile(lat, [50, 99])) if len(lat) else (None, None)
    per_user = np.fromiter(c.users.events.values(), float, len(c.users.events))
    return VersionMetrics(
        version=version, requests=c.requests, errors=c.errors,
        error_rate=c.errors / c.requests if c.requests else 0.0, latency_p50_ms=p50, latency_p99_ms=p99,
        recommendations=c.recommendations, acted_on=c.acted_on,
        acted_share=c.acted_on / c.recommendations if c.recommendations else 0.0,
        acted_share_ci=wilson_interval(c.acted_on, c.recommendations, z), events=c.events,
        users_served=c.users.estimate(), users_sampled=len(per_user), user_sample_rate=c.users.rate,
        events_per_user=float(per_user.mean()) if len(per_user) else 0.0,
        events_per_user_ci=mean_interval(per_user, z))


@dataclass(frozen=True)
class CanaryMetrics:
    """A snapshot of both arms (what ``decide`` reads and ``GET /v1/version`` shows)."""

    control: VersionMetrics
    candidate: VersionMetrics
    share: float
    unattributed_events: int  # feedback on items not recommended to that user in the window
    evicted_users: int  # users dropped from attribution for room while their window was open

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class CanaryMonitor:
    """Assignment, attribution and per-version metrics of one canary. Thread-safe: serving
    replicas call it from concurrent requests.

    ``salt`` (default: the candidate version) picks the candidate's users, so restarting the same
    canary keeps them. ``clock``: seconds since the epoch, for calls without ``ts_ms``. Times are
    epoch milliseconds, as in the event schema.
    """

    def __init__(self, control: str, candidate: str, share: float, cfg: Optional[CanaryConfig] = None,
                 salt: Optional[str] = None, clock=time.time):
        if control == candidate:
            raise ValueError(f"canary candidate is the control version {control!r}")
        self.cfg = cfg if cfg is not None else CanaryConfig()
        check_canary_config(self.cfg)
        self.control, self.candidate, self.share = control, candidate, check_share(share)
        self.salt = salt if salt is not None else candidate
        self._clock = clock
        self._z = z_value(self.cfg.confidence)
        self._negative = frozenset(self.cfg.negative_events)
        self._lock = threading.Lock()
        self._log = RecommendationLog(int(self.cfg.attribution_window_s * 1000), self.cfg.lists_per_user,
                                      self.cfg.attribution_users_max)
        self._versions = {control: _VersionCounters(self.cfg), candidate: _VersionCounters(self.cfg)}
        self.unattributed_events = 0
        self.other_version_requests = 0  # requests recorded for neither version (not counted)

    def arm(self, user_id: Optional[str]) -> str:
        return assign(user_id, self.share, self.salt)

    def version_for(self, user_id: Optional[str]) -> str:
        """The version that serves ``user_id`` while this canary runs."""
        return self.candidate if self.arm(user_id) == CANDIDATE else self.control

    def _now_ms(self, ts_ms: Optional[int]) -> int:
        return int(ts_ms) if ts_ms is not None else int(self._clock() * 1000)

    def record_request(self, version: str, user_id: Optional[str], items: Sequence[str] = (),
                       latency_ms: Optional[float] = None, error: bool = False, ts_ms: Optional[int] = None) -> None:
        """One /v1/recommend served by ``version``: the ``items`` it returned, or ``error``.
        Anonymous requests count for requests, errors and latency only: their lists can never be
        acted on by a known user, and counting them would lower control's share (they all go there)."""
        ts = self._now_ms(ts_ms)
        with self._lock:
            c = self._versions.get(version)
            if c is None:
                self.other_version_requests += 1
                return
            c.requests += 1
            if latency_ms is not None:
                c.latency_ms.append(float(latency_ms))
            if error:
                c.errors += 1
                return
            if user_id:
                c.users.served(user_id)
                if items:
                    c.recommendations += len(items)
                    self._log.add(user_id, version, items, ts)

    def record_feedback(self, user_id: Optional[str], item_id: str, event: str = "click",
                        ts_ms: Optional[int] = None) -> Optional[str]:
        """One feedback event; returns the version it is credited to, or None (negative event,
        anonymous, or an item not recommended to that user within the window)."""
        if not user_id or event in self._negative:
            return None
        ts = self._now_ms(ts_ms)
        with self._lock:
            hit = self._log.attribute(user_id, item_id, ts)
            if hit is None:
                self.unattributed_events += 1
                return None
            version, first = hit
            c = self._versions[version]
            c.events += 1
            c.users.credit(user_id)
            if first:
                c.acted_on += 1
            return version

    def attribution_held(self) -> Tuple[int, int]:
        """(users, lists) held for attribution now: what the memory bounds cap."""
        with self._lock:
            return len(self._log), self._log.lists_held()

    def metrics(self) -> CanaryMetrics:
        with self._lock:
            return CanaryMetrics(control=_version_metrics(self.control, self._versions[self.control], self._z),
                                 candidate=_version_metrics(self.candidate, self._versions[self.candidate], self._z),
                                 share=self.share, unattributed_events=self.unattributed_events,
                                 evicted_users=self._log.evicted_users)

    def decide(self) -> "Decision":
        return decide(self.metrics(), self.cfg)


# -- the decision ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    action: str  # promote | rollback | continue
    reason: str
    figures: Dict[str, Any]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def decide(metrics: CanaryMetrics, cfg: CanaryConfig) -> Decision:
    """Promote, roll back or continue a canary from a snapshot of its metrics. In order:

    1. roll back when the candidate's error rate exceeds control's by more than
       ``error_rate_margin`` (after ``min_requests`` candidate requests), or its p99 latency
       exceeds ``latency_p99_ratio_max`` x control's (after ``min_requests`` in each arm);
    2. with ``min_recommendations`` in each arm, compare the acted-on share: the interval of
       candidate minus control is Newcombe's hybrid score interval (from the two Wilson
       intervals) at ``confidence``; roll back when it lies below 0;
    3. promote (after ``min_requests``) when it lies above 0, or, after
       ``noninferiority_recommendations`` candidate recommendations, when its lower end is above
       ``-noninferiority_margin`` x control's share (not worse by more than the margin);
    4. otherwise continue.

    The rule looks at a running experiment repeatedly, which inflates the chance of a false
    "better" or "worse" above 1 - confidence; the minimum samples keep the earliest, noisiest
    looks out. Returns the action, a reason with its figures, and every figure it read.
    """
    t, c = metrics.candidate, metrics.control
    z = z_value(cfg.confidence)
    lo, hi = newcombe_interval(t.acted_on, t.recommendations, c.acted_on, c.recommendations, z)
    margin = cfg.noninferiority_margin * c.acted_share
    figures: Dict[str, Any] = {
        "control": c.to_dict(), "candidate": t.to_dict(), "share": metrics.share,
        "acted_share_diff": t.acted_share - c.acted_share, "acted_share_diff_ci": (lo, hi),
        "interval": f"Newcombe hybrid score, {cfg.confidence:.0%}", "noninferiority_margin_abs": margin,
        "error_rate_diff": t.error_rate - c.error_rate,
        "thresholds": {name: getattr(cfg, name) for name in RULE_FIELDS},
    }
    diff = f"acted-on share {t.acted_share:.4f} vs control {c.acted_share:.4f}, difference [{lo:+.4f}, {hi:+.4f}]"

    def verdict(action: str, reason: str) -> Decision:
        return Decision(action, reason, figures)

    if t.requests >= cfg.min_requests and t.error_rate - c.error_rate > cfg.error_rate_margin:
        return verdict("rollback", f"error rate {t.error_rate:.2%} vs control {c.error_rate:.2%} over "
                                   f"{t.requests} requests: more than {cfg.error_rate_margin:.2%} higher")
    if (cfg.latency_p99_ratio_max > 0 and min(t.requests, c.requests) >= cfg.min_requests
            and t.latency_p99_ms is not None and c.latency_p99_ms is not None
            and t.latency_p99_ms > cfg.latency_p99_ratio_max * c.latency_p99_ms):
        return verdict("rollback", f"p99 latency {t.latency_p99_ms:.1f} ms vs control {c.latency_p99_ms:.1f} ms: "
                                   f"more than {cfg.latency_p99_ratio_max}x")
    compared = min(t.recommendations, c.recommendations) >= cfg.min_recommendations
    if compared and hi < 0:
        return verdict("rollback", f"worse: {diff}")
    if t.requests < cfg.min_requests:
        return verdict("continue", f"{t.requests} of {cfg.min_requests} candidate requests")
    if compared and lo > 0:
        return verdict("promote", f"better: {diff}")
    if (t.recommendations >= cfg.noninferiority_recommendations and c.recommendations >= cfg.min_recommendations
            and lo > -margin):
        return verdict("promote", f"not worse by more than {margin:.4f} ({cfg.noninferiority_margin:.0%} of "
                                  f"control) after {t.recommendations} recommendations: {diff}")
    if not compared:
        return verdict("continue", f"{min(t.recommendations, c.recommendations)} of {cfg.min_recommendations} "
                                   "recommendations per version")
    return verdict("continue", f"inconclusive: {diff}")
