"""Serving benchmark: /v1/recommend latency and throughput on a local Ray Serve deployment of an
ml-latest-small model, next to the same request flow in-process (the floor); where the time goes
(HTTP proxy and per-hop cost of Ray Serve on this machine); event -> effect latency; swap time.

    .venv/bin/python -m benchmarks.serving [--data ../shared/data/ml-latest-small] [--requests 300]

Prints a table and writes results/serving_ml-latest-small.json. The model is trained in-process
by jobs.quick_train (a few epochs: quality is not measured here, the serving path is); its shape
is the default retriever (dim 64, 2 layers, histories up to 200) over the 9.7k-item catalog.
Client and server share the machine's cores, as they would in any single-box measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from serve.auth import client_headers
from serve.runner import LOCAL_SERVE_ENV

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"graph": "configs/serve.yaml", "fused": "configs/serve-fused.yaml"}


def pct(xs: List[float], q: float) -> float:
    return round(float(np.percentile(xs, q)), 2) if xs else float("nan")


def summary(lat_ms: List[float], wall_s: float, errors: int) -> Dict[str, Any]:
    return {"n": len(lat_ms), "errors": errors, "p50_ms": pct(lat_ms, 50), "p95_ms": pct(lat_ms, 95),
            "p99_ms": pct(lat_ms, 99), "mean_ms": round(statistics.fmean(lat_ms), 2) if lat_ms else None,
            "throughput_rps": round(len(lat_ms) / wall_s, 1) if wall_s > 0 else None}


def build_model(storage_root: str, data: str, epochs: int) -> Dict[str, Any]:
    from components import registry
    from components.storage import Storage
    from jobs.quick_train import build_bundle

    storage = Storage(storage_root)
    pointer = registry.read_pointer(storage, "recommender")
    if pointer is not None:
        return {"pointer": pointer, "storage": storage, "trained_s": 0.0}
    t0 = time.perf_counter()
    out = build_bundle(storage_root, run_id="bench-1", epochs=epochs, small=False, force_promote=True,
                       overrides=["data.source=movielens", f"data.path={data}", "data.name=ml-latest-small"])
    return {"pointer": out["pointer"], "storage": storage, "trained_s": round(time.perf_counter() - t0, 1)}


def floor(storage, pointer, users: List[str], n: int) -> Dict[str, Any]:
    """The same flow (serve.flow.recommend) on in-process models: no HTTP, no Serve hops."""
    from components import layout
    from components.online.live_state import SessionState
    from serve import api
    from serve.flow import LocalBackend, recommend
    from serve.models import RankerModel, UserEncoderModel
    from serve.retrieval import RetrievalModel
    from serve.watcher import fetch_parts

    d = fetch_parts(storage, pointer, layout.RETRIEVER_PARTS + layout.RANKER_PARTS, Path(tempfile.mkdtemp()))
    v = pointer["run_id"]
    state = SessionState(200)
    lin = pointer["lineage"]
    for split in layout.SPLITS:
        state.add_table(storage.read_parquet(layout.join(layout.dataset(lin["dataset"], lin["dataset_version"]), split)))
    backend = LocalBackend(UserEncoderModel(d, v), RetrievalModel(d, v), RankerModel(d, v), state)

    async def run():
        lat = []
        for k in range(n):
            t0 = time.perf_counter()
            await recommend(api.RecommendRequest(user_id=users[k % len(users)], k=10), backend, 100, 200)
            lat.append((time.perf_counter() - t0) * 1000)
        return lat

    asyncio.run(run())  # warm-up
    t0 = time.perf_counter()
    lat = asyncio.run(run())
    return summary(lat, time.perf_counter() - t0, 0)


async def load(url: str, users: List[str], n: int, concurrency: int) -> Dict[str, Any]:
    import aiohttp

    lat: List[float] = []
    errors = 0
    queue = list(range(n))

    async def worker(session):
        nonlocal errors
        while queue:
            k = queue.pop()
            t0 = time.perf_counter()
            async with session.post(url + "/v1/recommend", json={"user_id": users[k % len(users)], "k": 10}) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    continue
            lat.append((time.perf_counter() - t0) * 1000)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     headers=client_headers()) as session:
        # warm-up: two requests per connection (the queue is shared: every worker drains it)
        queue[:] = list(range(min(2 * concurrency, n)))
        await asyncio.gather(*[worker(session) for _ in range(min(concurrency, n))])  # its errors count
        queue[:] = list(range(n))
        lat.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(session) for _ in range(concurrency)])
        return summary(lat, time.perf_counter() - t0, errors)


def hop_cost(port_url: str, n: int = 200) -> Dict[str, Any]:
    """Ray Serve's own overhead here: an empty FastAPI ingress, and the same with 1 and 5
    handle calls to an echo deployment (a separate app at /probe)."""
    import requests
    from fastapi import FastAPI
    from ray import serve

    probe = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.05})
    class Echo:
        async def f(self, x):
            return x

    @serve.deployment(ray_actor_options={"num_cpus": 0.05})
    @serve.ingress(probe)
    class Probe:
        def __init__(self, echo):
            self.echo = echo

        @probe.get("/hops/{n}")
        async def hops(self, n: int):
            for _ in range(n):
                await self.echo.f.remote(1)
            return {"n": n}

    serve.run(Probe.bind(Echo.bind()), name="probe", route_prefix="/probe",
              logging_config={"log_level": "WARNING", "enable_access_log": False})
    s = requests.Session()
    s.headers.update(client_headers())
    out = {}
    for hops in (0, 1, 5):
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            s.get(f"{port_url}/probe/hops/{hops}", timeout=30).raise_for_status()
            lat.append((time.perf_counter() - t0) * 1000)
        out[f"hops_{hops}"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
    serve.delete("probe")
    out["per_hop_p50_ms"] = round((out["hops_5"]["p50_ms"] - out["hops_0"]["p50_ms"]) / 5, 2)
    return out


def event_to_effect(url: str, users: List[str], n: int) -> Dict[str, Any]:
    """Click the user's current top item; time until a /v1/recommend no longer shows it (it is
    history now). Also the 202 latency alone (durable write included)."""
    import requests

    s = requests.Session()
    s.headers.update(client_headers())
    ack, effect, missed = [], [], 0
    for k in range(n):
        user = users[(k * 7) % len(users)]
        top = s.post(url + "/v1/recommend", json={"user_id": user, "k": 10}, timeout=30).json()["items"][0]["item_id"]
        t0 = time.perf_counter()
        r = s.post(url + "/v1/events", json={"events": [{"user_id": user, "item_id": top, "event": "click"}]}, timeout=30)
        assert r.status_code == 202, r.text
        t1 = time.perf_counter()
        items = [it["item_id"] for it in s.post(url + "/v1/recommend", json={"user_id": user, "k": 10},
                                                timeout=30).json()["items"]]
        t2 = time.perf_counter()
        if top in items:
            missed += 1
        ack.append((t1 - t0) * 1000)
        effect.append((t2 - t0) * 1000)
    return {"ack_p50_ms": pct(ack, 50), "ack_p99_ms": pct(ack, 99), "effect_p50_ms": pct(effect, 50),
            "effect_p99_ms": pct(effect, 99), "not_reflected": missed, "n": n}


def swap(url: str, storage, pointer, users: List[str], rounds: int = 2) -> Dict[str, Any]:
    """Promote a new version (the same files under a new run id) while a client runs; time until
    every deployment reports it; count failed requests."""
    import requests

    from components import registry

    results: List[int] = []
    stop = threading.Event()

    def client():
        s = requests.Session()
        s.headers.update(client_headers())
        k = 0
        while not stop.is_set():
            try:
                results.append(s.post(url + "/v1/recommend", json={"user_id": users[k % len(users)], "k": 10},
                                      timeout=30).status_code)
            except Exception:
                results.append(0)
            k += 1

    t = threading.Thread(target=client)
    t.start()
    times = []
    try:
        src = Path(storage.path(pointer["prefix"]))
        for r in range(rounds):
            run_id = f"bench-swap-{r}-{int(time.time())}"
            prefix = storage.upload_dir(src, f"checkpoints/recommender/{run_id}") and f"checkpoints/recommender/{run_id}"
            t0 = time.perf_counter()
            registry.promote(storage, "recommender", run_id, prefix, pointer.get("metrics", {}), pointer["sha256"],
                       pointer.get("lineage"))
            while True:
                v = requests.get(url + "/v1/version", timeout=30).json()
                if {v[d]["version"] for d in ("encoder", "retriever", "ranker", "text")} == {run_id}:
                    break
                if time.perf_counter() - t0 > 120:
                    raise RuntimeError(f"swap to {run_id} not seen in 120 s: {v}")
                time.sleep(0.05)
            times.append(round(time.perf_counter() - t0, 2))
            time.sleep(1.0)
    finally:
        stop.set()
        t.join()
    return {"promotion_to_all_replicas_s": times, "requests_during": len(results),
            "failed_requests": sum(1 for c in results if c != 200)}


# Serve variants measured side by side: (config, environment of the Ray processes). The
# environment must be set before Ray starts (the Serve controller, proxy and replicas read it
# at import), so each variant runs in its own process with its own local Ray.
# (+ LOCAL_SERVE_ENV: a short direct-ingress drain, or each variant's serve.shutdown() waits 30 s)
THROUGHPUT = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", **LOCAL_SERVE_ENV}
HAPROXY = {**THROUGHPUT, "RAY_SERVE_ENABLE_HA_PROXY": "1"}
VARIANTS: Dict[str, Any] = {
    "graph": (CONFIGS["graph"], {}),
    "fused": (CONFIGS["fused"], {}),
    "fused+throughput": (CONFIGS["fused"], THROUGHPUT),
    "fused+throughput+haproxy": (CONFIGS["fused"], HAPROXY),
    "graph+throughput+haproxy": (CONFIGS["graph"], HAPROXY),
    # the shipped path with the live state sharded by user over two EventStore deployments
    "fused+throughput+haproxy+2shards": (CONFIGS["fused"], HAPROXY, {"live_state_shards": 2}),
    # the shipped path at each Serve precision, named (fp16 is the default; benchmarks/precision.py)
    "fused+throughput+haproxy+fp32": (CONFIGS["fused"], HAPROXY, {"precision": "fp32"}),
    "fused+throughput+haproxy+fp16": (CONFIGS["fused"], HAPROXY, {"precision": "fp16"}),
    # the shipped path with two ingress replicas from the start (the config lets it scale to two)
    "fused+throughput+haproxy+2ingress": (CONFIGS["fused"], HAPROXY, {"deployment_options": {"Ingress": {
        "autoscaling_config": {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 8}}}}),
}


SHIPPED = "fused+throughput+haproxy"


def measure_serve(variant: str, storage_root: str, users: List[str], n: int, port: int, overhead: bool,
                  pointer, profile: bool = False) -> Dict[str, Any]:
    """One Serve variant on a fresh local Ray (run in a child process with the variant's env)."""
    import ray
    from ray import serve

    from components.storage import Storage
    from serve import runner

    config, env, *more = VARIANTS[variant]
    args = more[0] if more else {}
    storage = Storage(storage_root)
    r: Dict[str, Any] = {"config": config, "env": env, "args": args}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        t0 = time.perf_counter()
        url = runner.start(config, {"storage_root": storage_root, **args}, port=port)
        r["startup_s"] = round(time.perf_counter() - t0, 1)
        r["serve"] = {}
        for c in (1, 8, 32):
            print(f"{variant}: concurrency {c} ...", flush=True)
            r["serve"][f"c{c}"] = asyncio.run(load(url, users, n, c))
        print(f"{variant}: event -> effect ...", flush=True)
        r["event_to_effect"] = event_to_effect(url, users, 50)
        print(f"{variant}: swap ...", flush=True)
        r["swap"] = swap(url, storage, pointer, users)
        if profile:
            from benchmarks.profile_serving import run_profile

            print(f"{variant}: profile (CPU per process, py-spy in the ingress and the holder) ...", flush=True)
            try:
                r["profile"] = run_profile(url, users, load)
            except Exception as exc:  # a profiler failure must not cost the run's figures
                r["profile"] = {"error": repr(exc)}
        if overhead:
            print("hop cost ...", flush=True)
            r["ray_serve_overhead"] = hop_cost(url)
    finally:
        serve.shutdown()
        ray.shutdown()
    return r


def measure_bare(storage_root: str, users: List[str], n: int, port: int) -> Dict[str, Any]:
    """benchmarks.bare_app (one uvicorn process, no Ray) under the same load."""
    import subprocess
    import sys

    import requests

    url = f"http://127.0.0.1:{port}"
    p = subprocess.Popen([sys.executable, "-m", "benchmarks.bare_app", "--storage", storage_root,
                          "--port", str(port)], cwd=ROOT)
    try:
        t0 = time.perf_counter()
        while True:
            try:
                if requests.get(url + "/healthz", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if p.poll() is not None or time.perf_counter() - t0 > 300:
                raise RuntimeError("bare uvicorn app did not start")
            time.sleep(0.5)
        r: Dict[str, Any] = {"startup_s": round(time.perf_counter() - t0, 1), "serve": {}}
        for c in (1, 8, 32):
            print(f"bare uvicorn: concurrency {c} ...", flush=True)
            r["serve"][f"c{c}"] = asyncio.run(load(url, users, n, c))
        r["event_to_effect"] = event_to_effect(url, users, 50)
        return r
    finally:
        p.terminate()
        p.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/ml-latest-small"))
    ap.add_argument("--storage", default=str(Path(tempfile.gettempdir()) / "llmrec-serving-bench"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--variants", default="bare," + ",".join(VARIANTS),
                    help="side by side: bare (uvicorn, no Ray) and Serve variants " + ", ".join(VARIANTS))
    ap.add_argument("--profile", default=SHIPPED,
                    help="variants to profile: CPU per process and py-spy samples (benchmarks/profile_serving.py)")
    ap.add_argument("--out", default=str(ROOT / "results/serving_ml-latest-small.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one Serve variant, JSON to --out
    args = ap.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"dataset not found: {args.data} (see ../shared/data/README)")

    model = build_model(args.storage, args.data, args.epochs)
    storage, pointer = model["storage"], model["pointer"]
    lin = pointer["lineage"]
    users = storage.read_parquet(f"datasets/{lin['dataset']}/{lin['dataset_version']}/test",
                                 columns=["user_id"])["user_id"].cast("string").to_pylist()
    random.Random(0).shuffle(users)
    if args.child:
        variant, overhead, prof = args.child.split(":")
        out = measure_serve(variant, storage.root, users, args.requests, args.port, overhead == "1", pointer,
                            prof == "1")
        Path(args.out).write_text(json.dumps(out))
        return

    import subprocess
    import sys

    result: Dict[str, Any] = {"machine": f"{os.cpu_count()} CPU cores, no GPU", "model": pointer["run_id"],
                              "trained_in_process_s": model["trained_s"], "requests_per_level": args.requests}
    # Every path starts from the same live state: the model's dataset, no feedback. (The scratch
    # storage is reused across runs to skip training; feedback left by earlier runs' event tests
    # would otherwise give later runs live co-visits the in-process floor does not have.)
    storage.delete("feedback")
    print("in-process floor ...", flush=True)
    result["in_process_floor"] = floor(storage, pointer, users, args.requests)
    result["variants"] = {}
    for variant in args.variants.split(","):
        storage.delete("feedback")
        if variant == "bare":
            result["variants"]["bare uvicorn"] = measure_bare(storage.root, users, args.requests, args.port + 5)
            continue
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; known: bare, {', '.join(VARIANTS)}")
        env = {**os.environ, **VARIANTS[variant][1]}
        overhead = "1" if "ray_serve_overhead" not in result else "0"
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, "-m", "benchmarks.serving", "--data", args.data, "--storage", args.storage,
                            "--requests", str(args.requests), "--port", str(args.port), "--out", f.name,
                            "--child", f"{variant}:{overhead}:{int(variant in args.profile.split(','))}"],
                           cwd=ROOT, env=env, check=True)
            r = json.loads(Path(f.name).read_text())
        if "ray_serve_overhead" in r:
            result["ray_serve_overhead"] = r.pop("ray_serve_overhead")
        result["variants"][variant] = r

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"results: {args.out}")


def print_table(result: Dict[str, Any]) -> None:
    f = result["in_process_floor"]
    print(f"\n{'path':<36}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>9}{'errors':>8}")
    print(f"{'in-process floor':<36}{f['p50_ms']:>9}{f['p95_ms']:>9}{f['p99_ms']:>9}{f['throughput_rps']:>9}{0:>8}")
    for name, r in result["variants"].items():
        for c, x in r["serve"].items():
            print(f"{name + ' ' + c:<36}{x['p50_ms']:>9}{x['p95_ms']:>9}{x['p99_ms']:>9}{x['throughput_rps']:>9}"
                  f"{x['errors']:>8}")
    o = result.get("ray_serve_overhead")
    if o:
        print(f"\nRay Serve overhead: empty HTTP request p50 {o['hops_0']['p50_ms']} ms, "
              f"+{o['per_hop_p50_ms']} ms per handle call (graph mode makes 5 per recommendation, fused 1)")
    for name, r in result["variants"].items():
        p = r.get("profile")
        if p and "error" not in p:
            print(f"\n{name}, where the CPU goes at concurrency 8 ({p['throughput_rps']} req/s, machine "
                  f"{p['machine_busy_share']:.0%} busy), CPU ms per request: "
                  + ", ".join(f"{k} {v}" for k, v in p["cpu_ms_per_request"].items()))
            for role, cats in (p.get("py_spy_share_of_samples") or {}).items():
                print(f"  {role}, py-spy samples: " + ", ".join(f"{k} {v:.0%}" for k, v in cats.items()))
    for name, r in result["variants"].items():
        e = r["event_to_effect"]
        line = (f"{name}: event -> 202 p50 {e['ack_p50_ms']} / p99 {e['ack_p99_ms']} ms; event -> effect p50 "
                f"{e['effect_p50_ms']} / p99 {e['effect_p99_ms']} ms (not reflected {e['not_reflected']}/{e['n']})")
        if "swap" in r:
            w = r["swap"]
            line += (f"; swap {w['promotion_to_all_replicas_s']} s, {w['failed_requests']} failed of "
                     f"{w['requests_during']}")
        print(line)


if __name__ == "__main__":
    main()
