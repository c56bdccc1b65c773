"""Feedback-loop benchmark on ml-latest-small plus 10% new feedback, with the service up:
retrain wall time, event -> dataset version, promotion -> every replica serving, and failed
requests during the swap (a client runs throughout).

    .venv/bin/python -m benchmarks.retrain [--data ../shared/data/ml-latest-small]

Writes results/retrain_ml-latest-small.json. The parent is what a user would have: the model the
documented command (`python -m jobs.pipeline data.source=movielens ...`) trains and promotes; the
retrain pass is `python -m jobs.retrain` (Ray Data + Ray Train + DeepSpeed, its own local Ray) in
a subprocess, exactly as a cron job would run it. Both print the non-neural baselines on their
split (the retrain's on the new split, next to the parent and the retrained model).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

from serve.auth import client_headers

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = ("encoder", "retriever", "ranker", "text")


def simulated_feedback(storage, pointer, frac: float, seed: int = 0) -> List[Dict[str, Any]]:
    """frac x the dataset's interactions as clicks: a trend. In every genre 20 items become
    popular; random users click 5 of the trending items of a genre they already watch. Learnable
    from the feedback, invisible to the parent model: what retraining is for."""
    lin = pointer["lineage"]
    prefix = f"datasets/{lin['dataset']}/{lin['dataset_version']}"
    train = storage.read_parquet(f"{prefix}/train", columns=["user_id", "item_id"])
    items = storage.read_parquet(f"{prefix}/items", columns=["item_id", "categories"]).to_pylist()
    cats = {it["item_id"]: it["categories"] or [] for it in items}
    by_cat: Dict[str, List[str]] = {}
    for it in items:
        for c in it["categories"] or []:
            by_cat.setdefault(c, []).append(it["item_id"])
    seen: Dict[str, List[str]] = {}
    for u, i in zip(train["user_id"].cast("string").to_pylist(), train["item_id"].cast("string").to_pylist()):
        seen.setdefault(u, []).append(i)
    rng = random.Random(seed)
    trending = {g: rng.sample(sorted(ids), min(20, len(ids))) for g, ids in sorted(by_cat.items())}
    users = sorted(seen)
    n = int(frac * train.num_rows)
    now = int(time.time() * 1000)
    out = []
    while len(out) < n:
        u = rng.choice(users)
        genres = [c for i in seen[u][-20:] for c in cats.get(i, [])] or list(by_cat)
        g = rng.choice(genres)
        for _ in range(5):
            out.append({"user_id": u, "item_id": rng.choice(trending[g]), "event": "click",
                        "ts": now - rng.randint(0, 60_000)})
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/ml-latest-small"))
    ap.add_argument("--storage", default=str(Path(tempfile.gettempdir()) / "llmrec-retrain-bench"))
    ap.add_argument("--frac", type=float, default=0.10)
    ap.add_argument("--epochs", type=int, default=6, help="retrain.epochs (warm-start fine-tune)")
    ap.add_argument("--config", default="configs/serve-fused.yaml")
    ap.add_argument("--out", default=str(ROOT / "results/retrain_ml-latest-small.json"))
    args = ap.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"dataset not found: {args.data}")

    import ray
    import requests
    from ray import serve

    from components import registry
    from components.storage import Storage
    from serve import runner

    storage = Storage(args.storage)
    if registry.read_pointer(storage, "recommender") is None:  # the pipeline's promoted model is the parent
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "jobs.pipeline", "data.source=movielens", f"data.path={args.data}",
                            f"storage.root={storage.root}"], cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0 or registry.read_pointer(storage, "recommender") is None:
            raise SystemExit(f"the pipeline did not promote a parent model:\n{(p.stdout + p.stderr)[-3000:]}")
        print(f"parent: jobs.pipeline on ml-latest-small, promoted in {time.perf_counter() - t:.0f} s")
    pointer = registry.read_pointer(storage, "recommender")
    parent_report = storage.read_json(f"reports/{pointer['run_id']}/metrics.json")
    events = simulated_feedback(storage, pointer, args.frac)
    result: Dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPU cores, no GPU", "base": pointer["run_id"],
        "base_on_its_split": {m: parent_report["models"][m]["test"] for m in
                              (parent_report["main_model"], "MostPopular", "ItemKNN")},
        "new_events": len(events), "serve_config": args.config}

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    url = runner.start(args.config, {"storage_root": storage.root, "watch_interval_s": 2.0}, port=8766)
    codes: List[int] = []
    stop = threading.Event()
    seen_versions: Dict[str, float] = {}

    def client():
        s = requests.Session()
        s.headers.update(client_headers())
        k = 0
        while not stop.is_set():
            try:
                r = s.post(url + "/v1/recommend", json={"user_id": events[k % len(events)]["user_id"], "k": 10}, timeout=30)
                codes.append(r.status_code)
            except Exception:
                codes.append(0)
            k += 1
            time.sleep(0.05)

    def watch():
        while not stop.is_set():
            p = registry.read_pointer(storage, "recommender")
            if p and p["run_id"] not in seen_versions:
                seen_versions[p["run_id"]] = time.perf_counter()
            time.sleep(0.02)

    threads = [threading.Thread(target=client), threading.Thread(target=watch)]
    for t in threads:
        t.start()
    try:
        t0 = time.perf_counter()
        for s in range(0, len(events), 500):
            r = requests.post(url + "/v1/events", json={"events": events[s:s + 500]}, headers=client_headers(),
                              timeout=60)
            assert r.status_code == 202, r.text
        t_posted = time.perf_counter()
        result["post_s"] = round(t_posted - t0, 2)
        p = subprocess.run([sys.executable, "-m", "jobs.retrain", f"storage.root={storage.root}", "ray.num_cpus=2",
                            f"retrain.epochs={args.epochs}"], cwd=ROOT, capture_output=True, text=True)
        t_done = time.perf_counter()
        print("\n".join(ln for ln in p.stdout.splitlines() if ln.startswith(("retrain", "dataset", "model", "baselines",
                                                                             "promotion", "timings"))))
        if p.returncode != 0:
            raise SystemExit(f"retrain failed: {p.stderr[-3000:]}")
        new = registry.read_pointer(storage, "recommender")
        promoted = new["run_id"] != pointer["run_id"]
        timings = json.loads(p.stdout.split("timings: ")[-1].splitlines()[0].replace("'", '"'))
        t_serving = None
        while promoted:
            v = requests.get(url + "/v1/version", timeout=30).json()
            if {v[d]["version"] for d in DEPLOYMENTS} == {new["run_id"]}:
                t_serving = time.perf_counter()
                break
            if time.perf_counter() - t_done > 120:
                raise SystemExit(f"new version not served after 120 s: {v}")
            time.sleep(0.05)
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
        serve.shutdown()
        ray.shutdown()
    t_promoted = seen_versions.get(new["run_id"], t_done)
    result.update({
        "new_run": new["run_id"], "promoted": promoted,
        "retrain_wall_s": round(t_done - t_posted, 1), "retrain_timings": timings,
        "event_to_dataset_version_s": round(t_posted - t0 + timings.get("preprocess_s", 0), 1),
        "promotion_to_all_replicas_s": round(t_serving - t_promoted, 2) if promoted else None,
        "requests_during": len(codes), "failed_requests": sum(1 for c in codes if c != 200),
        "retrain_summary": [ln for ln in p.stdout.splitlines()
                            if ln.startswith(("dataset", "model", "baselines", "promotion"))],
    })
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nnew feedback events: {len(events)} ({args.frac:.0%} of the training interactions), posted in "
          f"{result['post_s']} s\nretrain wall time: {result['retrain_wall_s']} s {timings}\n"
          f"event posted -> in a dataset version: {result['event_to_dataset_version_s']} s (retrain started at once)\n"
          f"promotion -> every deployment serving it: {result['promotion_to_all_replicas_s']} s\n"
          f"failed requests while retraining and swapping: {result['failed_requests']} of {result['requests_during']}\n"
          f"results: {args.out}")


if __name__ == "__main__":
    main()
