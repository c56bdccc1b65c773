"""The feedback loop end to end on local Ray: serve a model, post feedback that moves a group of
users towards one category, run `python -m jobs.retrain`, wait for the swap; a client runs
throughout and must see no failed request."""

import json
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import requests

from components import registry
from jobs.quick_train import build_bundle
from serve import runner
from tests.conftest import ROOT, free_port
from tests.e2e.test_cli import ENV

pytestmark = [pytest.mark.ray, pytest.mark.serve]
DEPLOYMENTS = ("encoder", "retriever", "ranker", "text")


def _share(url, users, category):
    hits = total = 0
    for u in users:
        items = requests.post(url + "/v1/recommend", json={"user_id": u, "k": 10}, timeout=30).json()["items"]
        hits += sum(category in it["categories"] for it in items)
        total += len(items)
    return hits / total


def test_feedback_retrain_swap_with_no_failed_request(ray_local, tmp_path):
    from ray import serve

    root = tmp_path / "store"
    base = build_bundle(root, run_id="loop-base", epochs=4, force_promote=True)
    url = runner.start("configs/serve.yaml", {"storage_root": str(root), "watch_interval_s": 1.0}, port=free_port())
    results, stop = [], threading.Event()

    def client():
        s = requests.Session()
        while not stop.is_set():
            try:
                r = s.post(url + "/v1/recommend", json={"user_id": "u0000003", "k": 10}, timeout=30)
                results.append(r.status_code)
            except Exception:
                results.append(0)
            time.sleep(0.05)

    t = threading.Thread(target=client)
    t.start()
    try:
        items = base["items"].to_pylist()
        by_cat = Counter(c for r in items for c in r["categories"])
        users = requests.get(url + "/v1/users?limit=60", timeout=10).json()["users"][20:50]
        before = {c: _share(url, users[:10], c) for c in list(by_cat)[:6]}
        category = min(before, key=before.get)
        pool = [r["item_id"] for r in items if r["categories"] == [category]]
        events = [{"user_id": u, "item_id": pool[(k * 5 + j) % len(pool)], "event": "click"}
                  for k, u in enumerate(users) for j in range(6)]
        for s in range(0, len(events), 50):
            assert requests.post(url + "/v1/events", json={"events": events[s:s + 50]}, timeout=30).status_code == 202
        share_before = before[category]

        p = subprocess.run([sys.executable, "-m", "jobs.retrain", f"storage.root={root}", "retrain.epochs=3",
                            "ranker.epochs=3", "ray.num_cpus=2"], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=1200)
        assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
        print(p.stdout[-1500:])
        assert "PROMOTED" in p.stdout, p.stdout[-3000:]
        pointer = registry.read_pointer(base["storage"], "recommender")
        new_run = pointer["run_id"]
        assert new_run != "loop-base" and pointer["lineage"]["parent_run"] == "loop-base"
        assert pointer["lineage"]["feedback_events"] == len(events)

        promoted = time.time()
        while time.time() - promoted < 30:
            v = requests.get(url + "/v1/version", timeout=10).json()
            if {v[d]["version"] for d in DEPLOYMENTS} == {new_run}:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"not every deployment serves {new_run}: {json.dumps(v)[:1000]}")
        assert time.time() - promoted < 10  # within the watch interval, plus loading
        assert v["retriever"]["lineage"]["feedback_watermark"] and v["retriever"]["lineage"]["parent_run"] == "loop-base"
        share_after = _share(url, users[:10], category)
        assert share_after > share_before, (category, share_before, share_after)

        # a second pass with no new feedback does nothing and keeps the pointer
        p2 = subprocess.run([sys.executable, "-m", "jobs.retrain", f"storage.root={root}"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
        assert p2.returncode == 0 and "nothing to do" in p2.stdout
        assert registry.read_pointer(base["storage"], "recommender")["run_id"] == new_run
    finally:
        stop.set()
        t.join()
        serve.shutdown()
    assert len(results) > 20 and all(c == 200 for c in results), Counter(results)
