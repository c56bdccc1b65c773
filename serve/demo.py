"""The feedback loop, shown once against a running service (``serve.demo_feedback=true``): new
items added through the API, clicks that change recommendations at once, a retraining pass over
them, and the hot swap to the retrained model. A client of the HTTP API and of jobs.retrain."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from typing import Any, Dict, List, Tuple

import requests

from components import layout, registry
from components.storage import Storage
from serve.auth import client_headers


WATCHED = 4  # each user watches 4 of the 6 parts in order, starting at a different part


def run(cfg: Any, storage: Storage, url: str) -> None:
    """The loop the system exists for, shown once, with something only feedback can teach: a new
    series of items (added through ``PUT /v1/items``) that users watch part after part. Their
    clicks change recommendations at once (live history and live co-visits), are stored, and
    retrain a model that has learnt the series from them; the gate compares it with the serving
    model on the same split and the replicas swap to the winner."""
    http = requests.Session()
    http.headers.update(client_headers())  # the admin key when the service has keys
    print(f"service up on {url}; first, the feedback loop demo (serve.demo_feedback=true)", flush=True)
    users = http.get(url + f"/v1/users?limit={cfg.serve.demo_users}", timeout=30).json()["users"]
    pointer = registry.read_pointer(storage)
    category, series = _series(storage, pointer)
    http.put(url + "/v1/items", json={"items": series}, timeout=120).raise_for_status()
    before = _next_part_found(http, url, users, series)
    now = int(time.time() * 1000) - 3_600_000
    events = [{"user_id": u, "item_id": series[(k + j) % len(series)]["item_id"], "event": "click",
               "ts": now + 60_000 * j} for k, u in enumerate(users) for j in range(WATCHED)]
    for s in range(0, len(events), 100):
        http.post(url + "/v1/events", json={"events": events[s:s + 100]}, timeout=60).raise_for_status()
    live = _next_part_found(http, url, users, series)
    print(f"\nfeedback loop demo: {len(series)} new items added through PUT /v1/items (a '{category}' series, "
          f"'{series[0]['title']}', ...);\n  {len(users)} users watched {WATCHED} parts each in order "
          f"({len(events)} clicks through POST /v1/events, stored under {storage.uri(layout.FEEDBACK)})\n"
          f"  users whose top-10 holds the next part they have not watched: {before:.0%} before the clicks -> "
          f"{live:.0%} at once (live history and live co-visits)", flush=True)
    t0 = time.perf_counter()
    if not _retrain(cfg, storage):
        return
    new = registry.read_pointer(storage)
    if new["run_id"] == pointer["run_id"]:
        print(f"  the gate kept {pointer['run_id']} serving: the retrained model was not better on the same split "
              f"({time.perf_counter() - t0:.0f}s for the whole loop)\n", flush=True)
        return
    t1 = time.perf_counter()
    while time.perf_counter() - t1 < 60:
        v = requests.get(url + "/v1/version", timeout=30).json()
        if {v[d]["version"] for d in ("encoder", "retriever", "ranker", "text")} == {new["run_id"]}:
            break
        time.sleep(0.2)
    print(f"  hot swap: serving {v['model_version']} (was {pointer['run_id']}), {time.perf_counter() - t1:.1f}s "
          f"after the retrain ended ({time.perf_counter() - t0:.0f}s for retrain + swap); users whose top-10 "
          f"holds the next part: {_next_part_found(http, url, users, series):.0%}\n", flush=True)


def _series(storage: Storage, pointer: Dict[str, Any]) -> Tuple[str, List[Dict[str, Any]]]:
    """(the catalog's commonest category, six new items: a series made from its first items)."""
    items = storage.read_parquet(layout.join(pointer["prefix"], layout.ITEMS),
                                 columns=["item_id", "title", "text", "categories"]).to_pylist()
    category = Counter(c for it in items for c in it["categories"] or []).most_common(1)[0][0]
    templates = [it for it in items if category in (it["categories"] or [])][:6]
    return category, [{"item_id": f"demo-series-{k + 1}", "title": f"{t['title']}: the series, part {k + 1}",
                       "text": f"{t['text'] or t['title']} (series, part {k + 1})",
                       "categories": t["categories"] or []} for k, t in enumerate(templates)]


def _next_part_found(http: requests.Session, url: str, users: List[str], series: List[Dict[str, Any]]) -> float:
    """Share of users whose top-10 holds the one part of the series they have not watched yet."""
    hits = 0
    for k, u in enumerate(users):
        unseen = series[(k + WATCHED) % len(series)]["item_id"]
        top = http.post(url + "/v1/recommend", json={"user_id": u, "k": 10}, timeout=30).json()["items"]
        hits += unseen in {it["item_id"] for it in top}
    return hits / max(1, len(users))


def _retrain(cfg: Any, storage: Storage) -> bool:
    """One ``python -m jobs.retrain`` pass, its summary lines printed; False when it failed."""
    print("  retraining on the new feedback (python -m jobs.retrain) ...", flush=True)
    args = [sys.executable, "-m", "jobs.retrain", f"storage.root={storage.root}",
            f"ray.num_cpus={cfg.ray.num_cpus or 2}", f"retrain.epochs={cfg.retrain.epochs}"]
    if cfg.storage.endpoint_url:
        args.append(f"storage.endpoint_url={cfg.storage.endpoint_url}")
    p = subprocess.run(args, capture_output=True, text=True)
    summary = [ln for ln in p.stdout.splitlines()
               if ln.startswith(("model ", "promotion:")) or (ln.startswith("dataset ") and "from feedback" in ln)]
    print("\n".join("  " + ln for ln in summary), flush=True)
    if p.returncode != 0:
        print(f"  retrain failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}", flush=True)
    return p.returncode == 0
