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
    from components import checkpoints as ck
    from components.storage import Storage
    from jobs.quick_train import build_bundle

    storage = Storage(storage_root)
    pointer = ck.read_pointer(storage, "recommender")
    if pointer is not None:
        return {"pointer": pointer, "storage": storage, "trained_s": 0.0}
    t0 = time.perf_counter()
    out = build_bundle(storage_root, run_id="bench-1", epochs=epochs, small=False,
                       overrides=["data.source=movielens", f"data.path={data}", "data.name=ml-latest-small"])
    return {"pointer": out["pointer"], "storage": storage, "trained_s": round(time.perf_counter() - t0, 1)}


def floor(storage, pointer, users: List[str], n: int) -> Dict[str, Any]:
    """The same flow (serve.flow.recommend) on in-process models: no HTTP, no Serve hops."""
    from serve import api
    from serve.bundle import fetch_parts
    from serve.feedback import SessionState
    from serve.flow import LocalBackend, recommend
    from serve.models import RANKER_PARTS, RETRIEVER_PARTS, RankerModel, RetrievalModel, UserEncoderModel

    d = fetch_parts(storage, pointer, RETRIEVER_PARTS + RANKER_PARTS, Path(tempfile.mkdtemp()))
    v = pointer["run_id"]
    state = SessionState(200)
    lin = pointer["lineage"]
    for split in ("train", "valid", "test"):
        state.add_table(storage.read_parquet(f"datasets/{lin['dataset']}/{lin['dataset_version']}/{split}"))
    backend = LocalBackend(UserEncoderModel(d, v), RetrievalModel(d, storage, v), RankerModel(d, v), state)

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
        await asyncio.gather(*[worker(session) for _ in range(min(concurrency, n))])  # warm-up
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

    from components import checkpoints as ck

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
            ck.promote(storage, "recommender", run_id, prefix, pointer.get("metrics", {}), pointer["sha256"],
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/ml-latest-small"))
    ap.add_argument("--storage", default=str(Path(tempfile.gettempdir()) / "llmrec-serving-bench"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--modes", default="graph,fused", help="serving modes to measure, side by side")
    ap.add_argument("--out", default=str(ROOT / "results/serving_ml-latest-small.json"))
    args = ap.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"dataset not found: {args.data} (see ../shared/data/README)")

    import ray

    from serve import runner

    model = build_model(args.storage, args.data, args.epochs)
    storage, pointer = model["storage"], model["pointer"]
    lin = pointer["lineage"]
    users = storage.read_parquet(f"datasets/{lin['dataset']}/{lin['dataset_version']}/test",
                                 columns=["user_id"])["user_id"].cast("string").to_pylist()
    random.Random(0).shuffle(users)
    result: Dict[str, Any] = {"machine": f"{os.cpu_count()} CPU cores, no GPU", "model": pointer["run_id"],
                              "trained_in_process_s": model["trained_s"], "requests_per_level": args.requests}
    print("in-process floor ...", flush=True)
    result["in_process_floor"] = floor(storage, pointer, users, args.requests)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    from ray import serve

    result["modes"] = {}
    try:
        for mode in args.modes.split(","):
            r: Dict[str, Any] = {"config": CONFIGS[mode]}
            t0 = time.perf_counter()
            url = runner.start(CONFIGS[mode], {"storage_root": storage.root}, port=args.port)
            r["startup_s"] = round(time.perf_counter() - t0, 1)
            r["serve"] = {}
            for c in (1, 8, 32):
                print(f"{mode}: concurrency {c} ...", flush=True)
                r["serve"][f"c{c}"] = asyncio.run(load(url, users, args.requests, c))
            r["ratio_p50_c1_vs_floor"] = round(r["serve"]["c1"]["p50_ms"] / result["in_process_floor"]["p50_ms"], 1)
            print(f"{mode}: event -> effect ...", flush=True)
            r["event_to_effect"] = event_to_effect(url, users, 50)
            print(f"{mode}: swap ...", flush=True)
            r["swap"] = swap(url, storage, pointer, users)
            if "ray_serve_overhead" not in result:
                print("hop cost ...", flush=True)
                result["ray_serve_overhead"] = hop_cost(url)
            result["modes"][mode] = r
            serve.shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    f = result["in_process_floor"]
    print(f"\n{'path':<26}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>9}{'errors':>8}")
    print(f"{'in-process floor':<26}{f['p50_ms']:>9}{f['p95_ms']:>9}{f['p99_ms']:>9}{f['throughput_rps']:>9}{0:>8}")
    for mode, r in result["modes"].items():
        for c, x in r["serve"].items():
            print(f"{mode + ' HTTP ' + c:<26}{x['p50_ms']:>9}{x['p95_ms']:>9}{x['p99_ms']:>9}{x['throughput_rps']:>9}"
                  f"{x['errors']:>8}")
    o = result["ray_serve_overhead"]
    print(f"\nRay Serve overhead: empty HTTP request p50 {o['hops_0']['p50_ms']} ms, "
          f"+{o['per_hop_p50_ms']} ms per handle call (graph mode makes 5 per recommendation, fused 1)")
    for mode, r in result["modes"].items():
        e, w = r["event_to_effect"], r["swap"]
        print(f"{mode}: event -> 202 p50 {e['ack_p50_ms']} / p99 {e['ack_p99_ms']} ms; event -> effect p50 "
              f"{e['effect_p50_ms']} / p99 {e['effect_p99_ms']} ms (not reflected {e['not_reflected']}/{e['n']}); "
              f"swap {w['promotion_to_all_replicas_s']} s, {w['failed_requests']} failed of {w['requests_during']}")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
