"""Reliability figures, written to results/reliability.json:

1. faults: the scenarios of tests/integration/test_faults.py (S3 unreachable for 10 s; the ingress
   replica and the live-state holder killed), each with a posting and a recommending client
   running throughout. The scenarios are the tests themselves (one code path, and their
   assertions must hold); this runs them and keeps the counts they measure.
2. load: the shipped Serve config (fused, throughput-optimized, HAProxy, autoscaling on) with the
   ml-latest-small model of benchmarks/serving.py, an async client at concurrency 32 for
   ``--load-s`` seconds (9 recommendations to 1 event, every event with an event_id), loopback
   only; latency percentiles, throughput, errors per minute, the replica counts Serve chose, and
   whether every acknowledged event is in storage.

    .venv/bin/python -m benchmarks.reliability [--load-s 240] [--skip-faults] [--out results/reliability.json]

``--skip-faults`` or ``--load-s 0`` keep the previous run's figures for the part skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]


async def timed_load(url: str, users: List[str], concurrency: int, seconds: float, event_every: int = 10):
    """Closed-loop clients for ``seconds``: every ``event_every``-th request posts an event."""
    import aiohttp

    from serve.auth import client_headers

    samples: List[Tuple[float, str, Any, float]] = []  # (t, kind, status, ms)
    acked: List[str] = []
    counter = iter(range(10**9))
    run = uuid.uuid4().hex[:8]  # event ids unique to this run (the storage may hold earlier runs')
    t_end = time.perf_counter() + seconds

    async def worker(session):
        while time.perf_counter() < t_end:
            k = next(counter)
            user = users[k % len(users)]
            t0 = time.perf_counter()
            try:
                if k % event_every == 0:
                    eid = f"load-{run}-{k}"
                    body = {"events": [{"user_id": user, "item_id": "1", "event": "click", "event_id": eid}]}
                    async with session.post(url + "/v1/events", json=body) as r:
                        await r.read()
                        status, kind = r.status, "event"
                    if status == 202:
                        acked.append(eid)
                else:
                    async with session.post(url + "/v1/recommend", json={"user_id": user, "k": 10}) as r:
                        await r.read()
                        status, kind = r.status, "recommend"
            except aiohttp.ClientError as exc:
                status, kind = type(exc).__name__, "event" if k % event_every == 0 else "recommend"
            samples.append((t0, kind, status, (time.perf_counter() - t0) * 1000))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=60), headers=client_headers()) as session:
        await asyncio.gather(*[worker(session) for _ in range(concurrency)])
    return samples, acked


def load_test(seconds: float, concurrency: int, port: int) -> Dict[str, Any]:
    import ray
    from ray import serve

    from benchmarks.serving import build_model, pct
    from serve import runner
    from components.online.feedback_log import list_feedback_shards, read_feedback

    storage_root = str(Path(tempfile.gettempdir()) / "llmrec-serving-bench")
    model = build_model(storage_root, str(ROOT.parent / "shared/data/ml-latest-small"), 4)
    storage, lin = model["storage"], model["pointer"]["lineage"]
    users = storage.read_parquet(f"datasets/{lin['dataset']}/{lin['dataset_version']}/test",
                                 columns=["user_id"])["user_id"].cast("string").to_pylist()
    runner.apply_serve_env()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    replicas: List[Dict[str, Any]] = []
    stop = threading.Event()

    def watch(t_start: float) -> None:
        while not stop.wait(2.0):
            try:
                app = serve.status().applications["recommender"]
                replicas.append({"t_s": round(time.perf_counter() - t_start, 1), **{
                    name: sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))
                    for name, d in app.deployments.items()}})
            except Exception as exc:  # a status call failing must not end the test
                replicas.append({"t_s": round(time.perf_counter() - t_start, 1), "error": str(exc)})

    try:
        url = runner.start("configs/serve-fused.yaml", {"storage_root": storage_root}, port=port)
        t0 = time.perf_counter()
        watcher = threading.Thread(target=watch, args=(t0,), daemon=True)
        watcher.start()
        samples, acked = asyncio.run(timed_load(url, users, concurrency, seconds))
        stop.set()
        watcher.join(timeout=10)
        ids = read_feedback(storage, list_feedback_shards(storage), event_ids=True)["event_id"].drop_null()
        stored = {eid for eid in ids.to_pylist() if eid.startswith("load-")}
    finally:
        stop.set()
        serve.shutdown()
        ray.shutdown()
    out: Dict[str, Any] = {"config": "configs/serve-fused.yaml", "env": runner.serve_env(), "concurrency": concurrency,
                           "seconds": seconds, "events_acknowledged": len(acked),
                           "acknowledged_events_lost": len(set(acked) - stored)}
    for kind in ("recommend", "event"):
        ok = [ms for _, k, s, ms in samples if k == kind and s in (200, 202)]
        bad = Counter(str(s) for _, k, s, _ in samples if k == kind and s not in (200, 202))
        out[kind] = {"n": len(ok), "errors": dict(bad), "p50_ms": pct(ok, 50), "p95_ms": pct(ok, 95),
                     "p99_ms": pct(ok, 99), "throughput_rps": round(len(ok) / seconds, 1)}
    t_first = min(t for t, _, _, _ in samples)
    minutes = Counter(int((t - t_first) // 60) for t, _, _, _ in samples)
    out["per_minute"] = [{"minute": m, "requests": minutes[m],
                          "errors": sum(1 for t, _, s, _ in samples
                                        if int((t - t_first) // 60) == m and s not in (200, 202)),
                          "p99_ms": pct([ms for t, _, s, ms in samples if int((t - t_first) // 60) == m], 99)}
                         for m in sorted(minutes)]
    out["replicas"] = replicas
    out["replicas_max"] = {name: max(r.get(name, 0) for r in replicas) for name in
                           sorted({k for r in replicas for k in r if k not in ("t_s", "error")})}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results/reliability.json"))
    ap.add_argument("--load-s", type=float, default=240.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--skip-faults", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    tmp = out.with_suffix(".partial.json")
    tmp.unlink(missing_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.time()
    rc, scenarios = 0, {}
    if not args.skip_faults:
        env = {**os.environ, "LLMREC_RELIABILITY_OUT": str(tmp)}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                              "tests/integration/test_faults.py"], cwd=ROOT, env=env)
        scenarios = json.loads(tmp.read_text()) if tmp.exists() else {}
        tmp.unlink(missing_ok=True)
    load = load_test(args.load_s, args.concurrency, args.port) if args.load_s > 0 else None
    previous = json.loads(out.read_text()) if out.exists() else {}
    if args.skip_faults:  # keep what an earlier run measured for the part skipped now
        scenarios, rc = previous.get("faults", {}), 0 if previous.get("fault_tests_passed") else 1
    if load is None:
        load = previous.get("load")
    result = {"benchmark": "reliability", "machine": f"{os.cpu_count()} cpus", "python": platform.python_version(),
              "fault_tests_passed": rc == 0, "wall_s": round(time.time() - t0, 1),
              "faults": scenarios, "load": load, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "load"}, indent=1))
    if load:
        print(json.dumps({k: v for k, v in load.items() if k != "replicas"}, indent=1))
    print(f"written to {out}")
    return rc if not load or load["acknowledged_events_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
