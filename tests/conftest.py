"""Shared fixtures. Expensive services (Ray, the S3 server) start once per run, on loopback."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # see FACTS.md: token auth breaks local CLI calls
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


# Every test under tests/<kind>/ carries the marker <kind>: ``-m "not e2e"`` leaves out the jobs run
# end to end (subprocesses, the whole pipeline, ``ray job submit``, the two-node cluster, the Serve
# app: minutes each), ``-m "not integration"`` the local-Ray ones; ``make test-fast`` runs tests/unit.
FOLDER_MARKERS = {"e2e": pytest.mark.e2e, "integration": pytest.mark.integration}


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection reads the markers
def pytest_collection_modifyitems(items):
    for item in items:
        kind = Path(item.path).resolve().relative_to(ROOT / "tests").parts[0]
        if kind in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[kind])


def shared_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/data, or skip the test with a message saying why."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name} not found at {path} (set SHARED_DATA or add ../shared/data)")
    return path


def _ephemeral_range() -> tuple:
    try:
        lo, hi = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A port free on 127.0.0.1 now, between Ray's worker ports and the kernel's ephemeral range.
    A port from bind(0) lies inside that range, so between the check and the server's own bind
    any outgoing connection (Ray opens hundreds while Serve starts) may take it as its local
    port, and HAProxy then fails with "Address already in use" (seen twice in one full CI run).
    Outside it only a server asking for that very port can. Below 21000 are Ray's default
    worker ports (10002-19999) and those tests/e2e/test_cluster.py gives its worker node."""
    lo, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(21_000, max(21_001, lo))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded range: fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1; yields its endpoint URL.

    Sets the AWS variables so that boto3, pyarrow and Ray workers all reach it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test; yields ``s3://<bucket>``."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole run (2 CPUs). Started after the S3 server so workers inherit
    its environment."""
    import ray

    from serve.runner import apply_serve_env

    apply_serve_env()  # what jobs ship: Serve's throughput-optimized path with HAProxy
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()
