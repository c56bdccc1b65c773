"""The main job: preprocess -> embed -> train -> evaluate -> promote (-> serve), on any source.

    python -m jobs.pipeline data.source=<synthetic|movielens|amazon|mind|files> data.path=<dir> \
        storage.root=<uri> [serve.enabled=true serve.port=8000]

With ``serve.enabled=true`` it then serves the promoted model on serve.host:serve.port (default
127.0.0.1:8000) with Ray Serve until SIGTERM or Ctrl-C, and shuts Serve and Ray down cleanly.

Every stage is the same code its own job runs (jobs.preprocess, jobs.embed_items, jobs.train,
jobs.evaluate); this file only chains them in one Ray session and prints what happened.
"""

from __future__ import annotations

import time
from typing import Any, Dict

from components import checkpoints as ck
from components import registry
from components.data.datasets import resolve_dataset
from components.storage import Storage
from jobs import evaluate, preprocess, telemetry, train
from jobs.embed_items import embed_items
from jobs.runtime import ray_session, run_cli


def main(cfg: Any) -> Dict[str, Any]:
    t0 = time.perf_counter()
    storage = Storage.from_config(cfg.storage)
    run_id = cfg.train.run_id or ck.new_run_id()
    timings: Dict[str, float] = {}
    with ray_session(cfg.ray):
        pre = preprocess.run(cfg, engine="ray")
        print(preprocess.format_stats(pre["stats"]), flush=True)
        timings["preprocess_s"] = round(time.perf_counter() - t0, 1)
        ds = resolve_dataset(storage, _with_version(cfg, pre["version"]))
        text_prefix = None
        if cfg.retriever.use_text:
            t = time.perf_counter()
            emb = embed_items(cfg, storage, ds, f"{run_id}-base")
            text_prefix = emb["prefix"]
            timings["embed_s"] = round(time.perf_counter() - t, 1)
            print(f"embedded {emb['rows']} items with the LLM (dim {emb['dim']}) in {emb['seconds']}s", flush=True)
        t = time.perf_counter()
        trained = train.train(cfg, storage, ds, run_id, text_prefix, parent=registry.read_pointer(storage, train.BUNDLE))
        timings["train_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        out = evaluate.run(cfg, storage, trained)  # in the Ray session: its metrics go out with the others
        timings["evaluate_s"] = round(time.perf_counter() - t, 1)
        timings["total_s"] = round(time.perf_counter() - t0, 1)
        telemetry.record_many("llmrec_stage_seconds", timings, "stage", job="pipeline", run=run_id)
    print(evaluate.report_markdown(out["results"]))
    p = out["promotion"]
    print(f"promotion: {'PROMOTED' if p['promoted'] else 'not promoted'} ({p['reason']})")
    print(f"report: {storage.uri(out['report_prefix'])}/report.md")
    print(f"model:  {storage.uri(trained['prefix'])}" + ("  (promoted: registry/recommender/latest.json)"
                                                         if p["promoted"] else ""))
    print(f"timings: {timings}", flush=True)
    if not cfg.serve.enabled:
        print(f"serve it: llmrec serve storage.root={storage.root}   (then open http://127.0.0.1:8000)", flush=True)
    result = {"preprocess": pre, "train": trained, "evaluate": out, "timings": timings}
    if cfg.serve.enabled:
        serve_promoted(cfg, storage)
    return result


def serve_promoted(cfg: Any, storage: Storage) -> None:
    """Serve registry/recommender/latest.json until interrupted (jobs.pipeline serve.enabled=true)."""
    from serve import runner

    if registry.read_pointer(storage, train.BUNDLE) is None:
        raise FileNotFoundError(f"nothing to serve: no promoted model under {storage.uri('registry')}")
    overrides = {"storage_root": storage.root, "storage_endpoint": cfg.storage.endpoint_url}
    if cfg.preprocess.pseudonymize_users:  # the service must store feedback under the dataset's pseudonyms
        overrides["pseudonymize_users"] = True
    if cfg.serve.watch_interval_s:
        overrides["watch_interval_s"] = cfg.serve.watch_interval_s
    with ray_session(cfg.ray):
        url = runner.start(cfg.serve.config, overrides, host=cfg.serve.host, port=cfg.serve.port)
        if cfg.serve.demo_feedback:
            feedback_demo(cfg, storage, url)
        runner.serve_until_signal(url)


def feedback_demo(cfg: Any, storage: Storage, url: str) -> None:
    """The loop the system exists for, shown once, with something only feedback can teach: a new
    series of items (added through ``PUT /v1/items``) that users watch part after part. Their
    clicks change recommendations at once (live history and live co-visits), are stored, and
    retrain a model that has learnt the series from them; the gate compares it with the serving
    model on the same split and the replicas swap to the winner."""
    import subprocess
    import sys
    from collections import Counter

    import requests

    from serve.auth import client_headers

    http = requests.Session()
    http.headers.update(client_headers())  # the admin key when the service has keys

    def recs(user):
        return http.post(url + "/v1/recommend", json={"user_id": user, "k": 10}, timeout=30).json()["items"]

    def next_part_found(users, series):
        """Share of users whose top-10 holds the one part of the series they have not watched yet."""
        hits = 0
        for k, u in enumerate(users):
            unseen = series[(k + WATCHED) % len(series)]["item_id"]
            hits += unseen in {it["item_id"] for it in recs(u)}
        return hits / max(1, len(users))

    WATCHED = 4  # each user watches 4 of the 6 parts in order, starting at a different part
    print(f"service up on {url}; first, the feedback loop demo (serve.demo_feedback=true)", flush=True)
    users = http.get(url + f"/v1/users?limit={cfg.serve.demo_users}", timeout=30).json()["users"]
    pointer = registry.read_pointer(storage, train.BUNDLE)
    items = storage.read_parquet(f"{pointer['prefix']}/items", columns=["item_id", "title", "text", "categories"]
                                 ).to_pylist()
    category = Counter(c for it in items for c in it["categories"] or []).most_common(1)[0][0]
    templates = [it for it in items if category in (it["categories"] or [])][:6]
    series = [{"item_id": f"demo-series-{k + 1}", "title": f"{t['title']}: the series, part {k + 1}",
               "text": f"{t['text'] or t['title']} (series, part {k + 1})", "categories": t["categories"] or []}
              for k, t in enumerate(templates)]
    r = http.put(url + "/v1/items", json={"items": series}, timeout=120)
    r.raise_for_status()
    before = next_part_found(users, series)
    now = int(time.time() * 1000) - 3_600_000
    events = [{"user_id": u, "item_id": series[(k + j) % len(series)]["item_id"], "event": "click",
               "ts": now + 60_000 * j} for k, u in enumerate(users) for j in range(WATCHED)]
    for s in range(0, len(events), 100):
        http.post(url + "/v1/events", json={"events": events[s:s + 100]}, timeout=60).raise_for_status()
    live = next_part_found(users, series)
    print(f"\nfeedback loop demo: {len(series)} new items added through PUT /v1/items (a '{category}' series, "
          f"'{series[0]['title']}', ...);\n  {len(users)} users watched {WATCHED} parts each in order "
          f"({len(events)} clicks through POST /v1/events, stored under {storage.uri('feedback')})\n"
          f"  users whose top-10 holds the next part they have not watched: {before:.0%} before the clicks -> "
          f"{live:.0%} at once (live history and live co-visits)", flush=True)
    print("  retraining on the new feedback (python -m jobs.retrain) ...", flush=True)
    t0 = time.perf_counter()
    args = [sys.executable, "-m", "jobs.retrain", f"storage.root={storage.root}",
            f"ray.num_cpus={cfg.ray.num_cpus or 2}", f"retrain.epochs={cfg.retrain.epochs}"]
    if cfg.storage.endpoint_url:
        args.append(f"storage.endpoint_url={cfg.storage.endpoint_url}")
    p = subprocess.run(args, capture_output=True, text=True)
    summary = [ln for ln in p.stdout.splitlines() if ln.startswith(("model ", "promotion:", "dataset "))]
    print("\n".join("  " + ln for ln in summary), flush=True)
    if p.returncode != 0:
        print(f"  retrain failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}", flush=True)
        return
    new = registry.read_pointer(storage, train.BUNDLE)
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
          f"holds the next part: {next_part_found(users, series):.0%}\n", flush=True)


def _with_version(cfg: Any, version: str) -> Any:
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(cfg, {"train": {"dataset_version": version}})
    return cfg


if __name__ == "__main__":
    run_cli(main)
