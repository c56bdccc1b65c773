"""The feedback loop, shown once against a running service (``serve.demo_feedback=true``): new
items added through the API, clicks that change recommendations at once, a retraining pass over
them, a canary of the retrained model judged by online metrics (simulated visitors' clicks), and
the hot swap when it wins. A client of the HTTP API and of jobs.retrain."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import requests

from components import layout, registry
from components.storage import Storage
from serve.auth import client_headers


WATCHED = 4  # each user watches 4 of the 6 parts in order, starting at a different part
# The retrained model is served as a canary to this share of users beside the served one; the
# judge promotes it when the share of its recommendations acted on is higher with the 95%
# interval excluding 0. The demo's own rule (retrain.canary_rule) asks for a smaller sample than
# the service's defaults (500 requests, 5000 recommendations per arm), sized to ~1 minute of
# simulated traffic on 2 cores; a real canary keeps the defaults or its own.
CANARY_SHARE = 0.5
CANARY_RULE = {"min_requests": 100, "min_recommendations": 1000}
CANARY_VISITORS_S = 240.0  # the simulated traffic stops after this long, decided or not


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
    canary = registry.read_canary(storage)
    if canary is not None and canary["control"] == pointer["run_id"]:
        visitors = [u for u in http.get(url + "/v1/users?limit=1000", timeout=30).json()["users"] if u not in users]
        _canary(http, url, storage, canary, visitors, series)
    new = registry.read_pointer(storage)
    if new["run_id"] == pointer["run_id"]:
        why = ("the canary did not win" if canary is not None else
               "the gate kept it: the retrained model was not better on the same split")
        print(f"  {pointer['run_id']} goes on serving: {why} ({time.perf_counter() - t0:.0f}s for the whole "
              "loop)\n", flush=True)
        return
    t1 = time.perf_counter()
    while time.perf_counter() - t1 < 60:
        v = requests.get(url + "/v1/version", timeout=30).json()
        if {v[d]["version"] for d in ("encoder", "retriever", "ranker", "text")} == {new["run_id"]}:
            break
        time.sleep(0.2)
    print(f"  hot swap: serving {v['model_version']} to everyone (was {pointer['run_id']}), "
          f"{time.perf_counter() - t1:.1f}s after the promotion ({time.perf_counter() - t0:.0f}s for retrain, "
          f"canary and swap); users whose top-10 holds the next part: "
          f"{_next_part_found(http, url, users, series):.0%}\n", flush=True)


def _canary(http: requests.Session, url: str, storage: Storage, canary: Dict[str, Any], visitors: List[str],
            series: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Simulated visitors while the canary runs, until the judge decides (or CANARY_VISITORS_S):
    each has watched one to three parts of the series and asks for recommendations; it examines
    the item at rank r with probability 1/r (a position-based click model) and clicks it when it
    is the next part it has not watched, then asks again, until it does not click or the series
    ends. Each request is served by the visitor's arm (the stable hash), each click is credited by
    the judge to the arm whose list showed it. Returns the judge's decision record, or None."""
    wait = time.perf_counter()
    while time.perf_counter() - wait < 60:  # every replica loads the candidate before traffic starts
        v = http.get(url + "/v1/version", timeout=30).json()
        if all(v[d].get("candidate") == canary["run_id"] for d in ("encoder", "retriever", "ranker")):
            break
        time.sleep(0.5)
    print(f"  canary: {canary['run_id']} serves {canary['share']:.0%} of users (a stable hash of the id) beside "
          f"{canary['control']}; simulated visitors follow the series and click the next part when they see it",
          flush=True)
    rng, t0, lists, decision = random.Random(0), time.perf_counter(), Counter(), None
    for k, u in enumerate(visitors):
        start, watched = k % len(series), 1 + k % 3
        now = int(time.time() * 1000)
        http.post(url + "/v1/events", timeout=60, json={"events": [
            {"user_id": u, "item_id": series[(start + j) % len(series)]["item_id"], "event": "click",
             "ts": now - 60_000 * (watched - j)} for j in range(watched)]}).raise_for_status()
        while watched < len(series):
            out = http.post(url + "/v1/recommend", json={"user_id": u, "k": 10}, timeout=30).json()
            lists[out["model_version"]] += 1
            shown = [it["item_id"] for it in out["items"]]
            nxt = series[(start + watched) % len(series)]["item_id"]
            if nxt not in shown or rng.random() >= 1.0 / (shown.index(nxt) + 1):
                break
            http.post(url + "/v1/events", json={"events": [{"user_id": u, "item_id": nxt, "event": "click"}]},
                      timeout=60).raise_for_status()
            watched += 1
        if k % 10 == 9:
            decision = _decision(storage, canary["run_id"])
            if decision is not None or time.perf_counter() - t0 > CANARY_VISITORS_S:
                break
    for _ in range(30):  # the judge decides every canary_check_s: give it the traffic's last look
        decision = decision or _decision(storage, canary["run_id"])
        if decision is not None:
            break
        time.sleep(1)
    print(f"  {k + 1} visitors, {sum(lists.values())} lists in {time.perf_counter() - t0:.0f}s "
          f"({', '.join(f'{n} from {ver}' for ver, n in sorted(lists.items()))})", flush=True)
    if decision is None:
        print("  no decision yet: the canary goes on, judged by the service (GET /v1/version shows it)", flush=True)
        return None
    f = decision["figures"]
    for arm in ("control", "candidate"):
        m = f[arm]
        lo, hi = m["acted_share_ci"]
        print(f"    {arm:9s} {m['version']}: {m['recommendations']} recommendations to {m['users_served']} users, "
              f"{m['acted_share']:.2%} acted on [{lo:.2%}, {hi:.2%}], p99 {m['latency_p99_ms'] or 0:.0f} ms, "
              f"{m['errors']} errors", flush=True)
    print(f"  the judge: {decision['action'].upper()} ({decision['reason']})", flush=True)
    return decision


def _decision(storage: Storage, run_id: str) -> Optional[Dict[str, Any]]:
    """The judge's promote / rollback / abandon record of the canary of ``run_id``, once it has one."""
    for rel in reversed(storage.list_files(layout.canary_log(layout.MODEL), (".json",))):
        rec = storage.read_json(rel)
        if rec.get("candidate") == run_id and rec.get("action") in ("promote", "rollback", "abandon"):
            return rec
        if rec.get("candidate") == run_id and rec.get("action") == "start":
            return None
    return None


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
            f"ray.num_cpus={cfg.ray.num_cpus or 2}", f"retrain.epochs={cfg.retrain.epochs}",
            "retrain.rollout=canary", f"retrain.canary_share={CANARY_SHARE}",
            *(f"retrain.canary_rule.{k}={v}" for k, v in CANARY_RULE.items())]
    if cfg.storage.endpoint_url:
        args.append(f"storage.endpoint_url={cfg.storage.endpoint_url}")
    p = subprocess.run(args, capture_output=True, text=True)
    summary = [ln for ln in p.stdout.splitlines()
               if ln.startswith(("model ", "promotion:")) or (ln.startswith("dataset ") and "from feedback" in ln)]
    print("\n".join("  " + ln for ln in summary), flush=True)
    if p.returncode != 0:
        print(f"  retrain failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}", flush=True)
    return p.returncode == 0
