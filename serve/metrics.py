"""The ingress's Prometheus metrics, recorded through Ray Serve's metrics API.

Every ingress replica records its own series with ``ray.serve.metrics`` (which adds the
``deployment``, ``replica`` and ``application`` tags); the node's Ray metrics agent exports them
in Prometheus format under Ray's namespace (``ray_llmrec_*``, next to Serve's own ``ray_serve_*``)
on ``http://<node>:<MetricsExportPort>/metrics``. Prometheus scrapes every node's agent (Ray's
service discovery file, or KubeRay's pod annotations) and sums over replicas and nodes, so the
totals hold while Serve adds and removes replicas: a per-replica registry behind one endpoint did
not (each scrape reached one replica at random and the counters seemed to jump and reset).
``GET /metrics`` answers the same series gathered from every alive node's agent
(``cluster_exposition``). infra/grafana-dashboard.json charts them.

Outside a Serve replica (unit tests, a hand-built ingress) ``IngressMetrics`` records nothing:
there is no replica tag to keep series apart and no agent to export them.

A new metric goes here: declare it in ``METRICS`` and record it from the route in
``serve/ingress.py``.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
MODEL_DEPLOYMENTS = ("encoder", "retriever", "ranker", "text")
# What GET /metrics answers: the text format the agents export (our names need nothing newer).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
EXPORTED_PREFIX = "ray_llmrec_"  # Ray exports every metric under its ray_ namespace
AGENT_TIMEOUT_S = 2.0  # per node: one slow or lost node must not hold the scrape

# name -> (kind, description, tag keys). Ray Serve adds deployment, replica and application (so
# those names are reserved: the model deployment is tagged `model`). Counters are exported with
# a _total suffix, histograms as _bucket/_sum/_count.
METRICS: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "llmrec_request_seconds": ("histogram", "Request latency by route", ("route",)),
    "llmrec_requests": ("counter", "Requests by route, status and the model version that answered (empty: "
                                   "none, e.g. events or a failed request)", ("route", "status", "model_version")),
    "llmrec_recommendations_served": ("counter", "Items recommended", ()),
    "llmrec_events_ingested": ("counter", "Events stored durably", ()),
    "llmrec_stale_version_retries": ("counter", "Requests re-pinned because a replica did not hold their model "
                                                "version (a swap or a new replica between two hops)", ()),
    "llmrec_model_info": ("gauge", "Model version each model deployment serves, as this ingress replica sees it "
                                   "(1; 0 once swapped out)", ("model", "model_version")),
    "llmrec_model_swaps": ("gauge", "Hot swaps of a model deployment since its replica started", ("model",)),
    # Set by the canary judge (serve/rollout.py) at each check while a canary runs; arm is control
    # or candidate.
    "llmrec_canary_acted_share": ("gauge", "Share of recommended items acted on, per arm of the running canary",
                                  ("arm", "model_version")),
    "llmrec_canary_requests": ("gauge", "Recommend requests per arm of the running canary", ("arm", "model_version")),
    "llmrec_canary_error_rate": ("gauge", "Error rate per arm of the running canary", ("arm", "model_version")),
    "llmrec_canary_latency_p99_seconds": ("gauge", "p99 recommend latency per arm of the running canary",
                                          ("arm", "model_version")),
}
CANARY_METRICS = tuple(n for n in METRICS if n.startswith("llmrec_canary_"))

MetricFactory = Callable[[str, str, str, Tuple[str, ...]], Any]


def serve_metric(name: str, kind: str, description: str, tag_keys: Tuple[str, ...]) -> Any:
    """A ``ray.serve.metrics`` Counter, Gauge or Histogram (tagged with the replica it runs in)."""
    from ray.serve import metrics

    if kind == "histogram":
        return metrics.Histogram(name, description, boundaries=list(LATENCY_BUCKETS), tag_keys=tag_keys)
    return {"counter": metrics.Counter, "gauge": metrics.Gauge}[kind](name, description, tag_keys=tag_keys)


class _NotRecorded:
    """Stands in for a metric outside a Serve replica."""

    def inc(self, value: float = 1.0, tags: Optional[Dict[str, str]] = None) -> None:
        pass

    def observe(self, value: float, tags: Optional[Dict[str, str]] = None) -> None:
        pass

    def set(self, value: float, tags: Optional[Dict[str, str]] = None) -> None:
        pass


def not_recorded(name: str, kind: str, description: str, tag_keys: Tuple[str, ...]) -> Any:
    return _NotRecorded()


def in_serve_replica() -> bool:
    try:
        from ray import serve

        serve.get_replica_context()  # raises outside a replica
        return True
    except Exception:
        return False


class IngressMetrics:
    """What the ingress routes record. Each call is an in-process update of Ray's metric (the agent
    pulls the values on its own interval): nothing on the request path touches the network.

    Args:
        metric: builds each metric of ``METRICS``; default ``serve_metric`` inside a Serve replica,
            else ``not_recorded`` (every call a no-op).
    """

    def __init__(self, metric: Optional[MetricFactory] = None) -> None:
        if metric is None:
            metric = serve_metric if in_serve_replica() else not_recorded
        m = {name: metric(name, kind, desc, tags) for name, (kind, desc, tags) in METRICS.items()
             if name not in CANARY_METRICS}
        self._latency, self._requests = m["llmrec_request_seconds"], m["llmrec_requests"]
        self._served, self._events = m["llmrec_recommendations_served"], m["llmrec_events_ingested"]
        self._stale = m["llmrec_stale_version_retries"]
        self._info, self._swaps = m["llmrec_model_info"], m["llmrec_model_swaps"]
        self._versions: Dict[str, str] = {}  # model deployment -> the version last set to 1

    def observe(self, route: str, t0: float, status: int, model_version: Optional[str] = None) -> None:
        """One answered request of ``route`` that started at ``t0`` (``time.perf_counter()``),
        answered by ``model_version`` (None where no model answered)."""
        self._latency.observe(time.perf_counter() - t0, tags={"route": route})
        self._requests.inc(tags={"route": route, "status": str(status), "model_version": str(model_version or "")})

    def recommended(self, items: int) -> None:
        if items > 0:  # Ray's counters refuse increments <= 0
            self._served.inc(items)

    def ingested(self, events: int) -> None:
        if events > 0:
            self._events.inc(events)

    def stale_retry(self) -> None:
        self._stale.inc()

    def set_versions(self, version: Dict[str, Any]) -> None:
        """The model version and swap count of each model deployment (``GET /v1/version``'s answer).
        A version swapped out drops to 0, so summing the gauge counts the replicas on each version."""
        for name in MODEL_DEPLOYMENTS:
            new, old = version[name]["version"], self._versions.get(name)
            if new is not None:
                new = str(new)
                if old is not None and old != new:
                    self._info.set(0, tags={"model": name, "model_version": old})
                self._info.set(1, tags={"model": name, "model_version": new})
                self._versions[name] = new
            self._swaps.set(version[name]["swaps"], tags={"model": name})


# --- GET /metrics: the llmrec series of every node's Ray metrics agent -----------------------------
def agent_urls() -> List[str]:
    """The Prometheus endpoint of every alive node's Ray metrics agent (Ray must be initialised)."""
    import ray

    urls = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if node.get("Alive") and port and port > 0:  # -1: the node's metrics collection is off
            host = node["NodeManagerAddress"]
            urls.append(f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics")
    return urls


def fetch_exposition(url: str, timeout: float = AGENT_TIMEOUT_S) -> Optional[str]:
    """One agent's exposition, or None (logged) when it does not answer in ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode("utf-8", "replace")
    except Exception as exc:  # a node going away must not fail the scrape of the others
        log.warning("metrics: %s did not answer: %s", url, exc)
        return None


def cluster_exposition(timeout: float = AGENT_TIMEOUT_S) -> str:
    """The ``ray_llmrec_*`` families of every alive node's agent, merged (``merge_families``).
    Blocking: the ingress runs it in a thread."""
    urls = agent_urls()
    if not urls:
        return ""
    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        texts = list(pool.map(lambda u: fetch_exposition(u, timeout), urls))
    return merge_families((t for t in texts if t), EXPORTED_PREFIX)


_SAMPLE_NAME = re.compile(r"[^{\s]+")


def merge_families(expositions: Iterable[str], prefix: str) -> str:
    """The metric families named ``prefix...`` of several Prometheus text expositions as one: each
    family's HELP and TYPE lines once (the first seen), then its samples from every exposition in
    order. A series (name and labels) already taken from an earlier exposition is left out, since
    one exposition may not repeat a series; replicas never collide (their ``replica`` tag differs).

    Args:
        expositions: Prometheus text format, e.g. each node agent's ``/metrics``.
        prefix: the family names to keep.

    Returns:
        The merged text ("" when no family has samples).
    """
    headers: Dict[str, List[str]] = {}
    samples: Dict[str, Dict[str, str]] = {}
    for text in expositions:
        family = None  # the family the last HELP/TYPE line declared
        for line in text.splitlines():
            line = line.strip()
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(" ", 3)[2]
                if family.startswith(prefix):
                    seen = headers.setdefault(family, [])
                    if not any(h.startswith(line[:7]) for h in seen):
                        seen.append(line)
                continue
            if not line or line.startswith("#"):
                continue
            name = _SAMPLE_NAME.match(line).group(0)
            fam = family if family and name.startswith(family) else name  # _bucket, _total... of a family
            if fam.startswith(prefix):
                # the series is the line up to its value (labels end at the last "}": values have none)
                key = line[:line.rindex("}") + 1] if "{" in line else name
                samples.setdefault(fam, {}).setdefault(key, line)
    out = []
    for fam, lines in samples.items():
        out += headers.get(fam, [])
        out += lines.values()
    return "\n".join(out) + "\n" if out else ""


class CanaryGauges:
    """The running canary's per-arm figures as gauges (set by the judge at each check; an ended
    canary's arms are set to 0 so a dashboard does not show it as still running)."""

    def __init__(self, metric: Optional[MetricFactory] = None) -> None:
        if metric is None:
            metric = serve_metric if in_serve_replica() else not_recorded
        self._m = {name: metric(name, *METRICS[name]) for name in CANARY_METRICS}
        self._shown: List[Dict[str, str]] = []

    def set(self, metrics: Optional[Dict[str, Any]]) -> None:
        """``metrics``: ``CanaryMetrics.to_dict()``, or None when no canary runs."""
        for tags in self._shown:
            for g in self._m.values():
                g.set(0.0, tags=tags)
        self._shown = []
        if metrics is None:
            return
        for arm in ("control", "candidate"):
            v = metrics[arm]
            tags = {"arm": arm, "model_version": v["version"]}
            self._m["llmrec_canary_acted_share"].set(v["acted_share"], tags=tags)
            self._m["llmrec_canary_requests"].set(v["requests"], tags=tags)
            self._m["llmrec_canary_error_rate"].set(v["error_rate"], tags=tags)
            self._m["llmrec_canary_latency_p99_seconds"].set((v["latency_p99_ms"] or 0.0) / 1000.0, tags=tags)
            self._shown.append(tags)
