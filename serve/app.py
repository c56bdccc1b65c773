"""The Ray Serve application: ingress (FastAPI) -> user encoder -> retriever -> ranker, plus the
text-embedding deployment (new items) and the event store (live user state + durable feedback).

    serve run configs/serve.yaml          # or: serve deploy configs/serve.yaml (running cluster)

This module only composes the application (``import_path: serve.app:build``). Where the parts are:

- ``serve/settings.py``     loads the app args (``components.config.ServeAppConfig``; unknown ones fail)
- ``serve/ingress.py``      the HTTP routes          ``serve/guard.py``    access, rate and size checks
- ``serve/flow.py``         the /v1/recommend flow   ``serve/metrics.py``  Prometheus metrics
- ``serve/deployments.py``  encoder, retriever, ranker, text embedder (hot swap, version pinning)
- ``serve/events.py``       live state and the feedback log (sharded by user on request)
- ``serve/models.py``, ``serve/retrieval.py``   what the model deployments compute (no Ray)
- ``serve/watcher.py``      fetching verified bundles and swapping them in
- ``serve/demo.py``         the feedback-loop demo ``make run`` shows (a client of the API)

Replica counts, autoscaling and resources come from the Serve config YAML, not from decorators.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from ray import serve

from serve.deployments import Ranker, Retriever, TextEmbedder, UserEncoder
from serve.events import EventStore
from serve.ingress import Ingress
from serve.rollout import CanaryJudge
from serve.settings import load_settings


def build(args: Optional[Dict[str, Any]] = None) -> serve.Application:
    """Application builder for ``serve run``/``serve deploy`` (``import_path: serve.app:build``).

    Args:
        args: the app args (``components.config.ServeAppConfig`` fields), plus optionally
            ``deployment_options`` (name -> options): the config YAML's deployment settings
            (replicas, autoscaling, resources) when the app is started from Python
            (``serve.runner.start``: jobs.pipeline, tests).

    Returns:
        The bound application.

    Raises:
        ConfigError: an unknown or invalid app arg (the message names it).
    """
    args = dict(args or {})
    options: Dict[str, Dict[str, Any]] = args.pop("deployment_options", None) or {}
    s = load_settings(args)

    def dep(d):
        return d.options(**options[d.name]) if d.name in options else d

    text = dep(TextEmbedder).bind(s)
    if s.live_state_shards == 1:
        events = dep(EventStore).bind(s)
    else:  # one deployment per user shard, each with the EventStore options of the config
        events = [dep(EventStore).options(name=f"EventStore{k}").bind(s, k) for k in range(s.live_state_shards)]
    judge = dep(CanaryJudge).bind(s)
    if s.mode == "fused":
        return dep(Ingress).bind(None, None, None, text, events, judge, s)
    encoder = dep(UserEncoder).bind(s)
    retriever = dep(Retriever).bind(s)
    ranker = dep(Ranker).bind(s)
    return dep(Ingress).bind(encoder, retriever, ranker, text, events, judge, s)
