"""Where a recommendation's time goes on a running Serve app (used by benchmarks/serving.py).

Two measurements over the same load (concurrency 8):
- CPU seconds per process (psutil, before/after): the ingress replicas, the live-state
  holders, the other replicas, Serve's controller and proxies, HAProxy, Ray's own daemons
  (raylet, GCS, dashboard/agents) and the load generator, per request;
- inside the ingress replica(s) and the holder(s), py-spy samples (``py-spy record --format raw
  --nonblocking``) sorted into categories by the innermost frame that names one: model work,
  live state, the request flow, (de)serialisation, HTTP (uvicorn/starlette/FastAPI), Serve's
  router/handles/replica wrapper, Ray core, asyncio.

py-spy is a `bench` extra (``pip install -e '.[bench]'``); without it (or without permission to
read other processes' memory) only the CPU split is reported.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

# innermost match wins; each entry: (category, substrings of a py-spy frame "function (file:line)")
CATEGORIES = [
    # live state before model work: its frames are under components/ too
    ("live state (components/online/, serve/events.py)", ("components/online/", "serve/events.py")),
    ("model work (torch, faiss, numpy)", ("serve/models.py", "serve/retrieval.py", "/torch/", "faiss", "/numpy/",
                                          "components/")),
    ("(de)serialisation", ("pickle", "serialization", "msgpack", "pydantic", "json", "encoders.py",
                           "_serialize", "_deserialize")),
    ("request flow (serve/flow.py, serve/ingress.py)", ("serve/flow.py", "serve/ingress.py", "serve/guard.py",
                                                         "serve/auth.py", "serve/deployments.py", "serve/metrics.py")),
    ("HTTP (uvicorn, starlette, FastAPI)", ("uvicorn", "starlette", "fastapi", "h11", "httptools")),
    ("Serve router, handles, replica wrapper", ("ray/serve/",)),
    ("gRPC", ("grpc",)),
    ("Ray core", ("ray/_private", "ray/_raylet", "ray/util", "_raylet")),
    ("asyncio", ("asyncio",)),
]


def classify(stack: List[str]) -> str:
    for frame in reversed(stack):
        for name, keys in CATEGORIES:
            if any(k in frame for k in keys):
                return name
    return "other"


def _role(name: str, cmdline: str) -> Optional[str]:
    if "haproxy" in name:
        return "HAProxy"
    if "ServeReplica" in cmdline or "ServeReplica" in name:
        if "Ingress" in cmdline or "Ingress" in name:
            return "ingress replica(s)"
        if "EventStore" in cmdline or "EventStore" in name:
            return "live-state holder(s)"
        return "other replicas"
    if "ServeController" in cmdline or "ServeController" in name:
        return "Serve controller"
    if "ProxyActor" in cmdline or "ProxyActor" in name:
        return "Serve proxies"
    if any(k in name or k in cmdline for k in ("raylet", "gcs_server", "dashboard", "agent", "log_monitor",
                                                "monitor.py")):
        return "Ray daemons"
    return None


def _processes() -> Dict[int, str]:
    """pid -> role for the Ray and Serve processes of this machine (titles like ray::ServeReplica:...)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            role = _role(p.info["name"] or "", cmd)
        except Exception:
            continue
        if role and p.info["pid"] != os.getpid():
            out[p.info["pid"]] = role
    return out


def _cpu(pids: Dict[int, str]) -> Dict[int, float]:
    import psutil

    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except Exception:
            pass
    return out


def _read_raw(path: Path, unclassified: Optional[Counter] = None) -> Counter:
    """py-spy raw (collapsed) output -> category -> samples (``unclassified``: innermost frames
    of the stacks no category names, to see what "other" is)."""
    cats: Counter = Counter()
    if not path.is_file():
        return cats
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        frames = frames[1:] if frames and frames[0].startswith(("process", "thread")) else frames
        cat = classify(frames)
        cats[cat] += int(count)
        if cat == "other" and unclassified is not None and frames:
            unclassified[frames[-1]] += int(count)
    return cats


def cpu_split(run_load: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """One load with CPU seconds per process role read before and after (psutil)."""
    import psutil

    pids = _processes()
    me = psutil.Process(os.getpid())
    before, me0 = _cpu(pids), me.cpu_times()
    t0 = time.perf_counter()
    load = run_load()
    wall = time.perf_counter() - t0
    after, me1 = _cpu(pids), me.cpu_times()
    cpu: Counter = Counter()
    for pid, role in pids.items():
        if pid in before and pid in after:
            cpu[role] += after[pid] - before[pid]
    cpu["load generator (this process)"] = (me1.user + me1.system) - (me0.user + me0.system)
    n = max(load["n"], 1)  # + a warm-up of 2 requests per connection, inside the CPU window
    cores = os.cpu_count() or 1
    # CPU is read around the whole call (client start-up and warm-up included), so a long load
    # keeps that share small; throughput and latency are the load's own (timed part only).
    return {"requests": load["n"], "wall_s": round(wall, 2), "throughput_rps": load["throughput_rps"],
            "p50_ms": load["p50_ms"], "p99_ms": load["p99_ms"],
            "cpu_ms_per_request": {k: round(1000 * v / n, 2) for k, v in cpu.most_common()},
            "machine_busy_share": round(sum(cpu.values()) / (wall * cores), 3)}


def profile(run_load: Callable[[], Dict[str, Any]], seconds: float = 12.0) -> Dict[str, Any]:
    """The CPU split of one load (no profiler attached), then py-spy samples of the ingress and
    holder processes over ``seconds`` of the same load (sampling slows them: shares, not times)."""
    out = cpu_split(run_load)
    pids = _processes()
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if not spy:
        out["py_spy"] = "not installed (pip install -e '.[bench]')"
        return out
    targets = [pid for pid, role in pids.items() if role in ("ingress replica(s)", "live-state holder(s)")]
    tmp = Path(tempfile.mkdtemp(prefix="pyspy-"))
    procs = [(pid, tmp / f"{pid}.txt", subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--format", "raw", "--nonblocking", "--rate", "100",
         "--duration", str(int(seconds)), "--output", str(tmp / f"{pid}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)) for pid in targets]
    time.sleep(1.0)  # py-spy attaches
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:  # keep the load on for as long as py-spy samples
        run_load()
    samples: Dict[str, Counter] = {}
    other: Counter = Counter()
    for pid, path, p in procs:
        _, err = p.communicate(timeout=seconds + 60)
        cats = _read_raw(path, other)
        if not cats:
            out.setdefault("py_spy_errors", []).append(err.decode(errors="replace")[-300:])
            continue
        samples.setdefault(pids[pid], Counter()).update(cats)
    out["py_spy_share_of_samples"] = {
        role: {k: round(v / sum(c.values()), 3) for k, v in c.most_common()} for role, c in samples.items()}
    out["py_spy_other_top_frames"] = dict(other.most_common(8))
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_profile(url: str, users: List[str], load) -> Dict[str, Any]:
    """benchmarks.serving's load generator at concurrency 8, profiled."""
    return profile(lambda: asyncio.run(load(url, users, 1200, 8)))
