"""The ingress replica's Prometheus metrics (``GET /metrics``; infra/grafana-dashboard.json charts them).

A new metric goes here: declare it in ``IngressMetrics.__init__`` and update it from the route
in ``serve/ingress.py``. Ray Serve's own metrics (``ray_serve_*``) come from Ray, not from here.
"""

from __future__ import annotations

import time
from typing import Any, Dict

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
MODEL_DEPLOYMENTS = ("encoder", "retriever", "ranker", "text")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class IngressMetrics:
    """One registry per ingress replica (not the process-global one: fused replicas and tests
    create several in one process)."""

    def __init__(self) -> None:
        reg = self.registry = CollectorRegistry()
        self.latency = Histogram("llmrec_request_seconds", "request latency", ["route"], registry=reg,
                                 buckets=LATENCY_BUCKETS)
        self.served = Counter("llmrec_recommendations_served", "items recommended", registry=reg)
        self.requests = Counter("llmrec_requests", "requests by route and status", ["route", "status"], registry=reg)
        self.events = Counter("llmrec_events_ingested", "events stored durably", registry=reg)
        self.version = Gauge("llmrec_model_info", "model version served (value 1)", ["deployment", "version"],
                             registry=reg)
        self.swaps = Gauge("llmrec_model_swaps", "hot swaps since replica start", ["deployment"], registry=reg)
        self.stale = Counter("llmrec_stale_version_retries", "requests re-pinned because a replica did not hold "
                             "their model version (a swap or a new replica between two hops)", registry=reg)

    def observe(self, route: str, t0: float, status: int) -> None:
        """One answered request of ``route`` that started at ``t0`` (``time.perf_counter()``)."""
        self.latency.labels(route).observe(time.perf_counter() - t0)
        self.requests.labels(route, str(status)).inc()

    def set_versions(self, version: Dict[str, Any]) -> None:
        """The model version and swap count of each model deployment (``GET /v1/version``'s answer)."""
        for name in MODEL_DEPLOYMENTS:
            self.version.labels(name, version[name]["version"]).set(1)
            self.swaps.labels(name).set(version[name]["swaps"])

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
