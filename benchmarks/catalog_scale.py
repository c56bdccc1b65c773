"""Candidate generation at catalog scale: the exact path against the ANN pool (serve/ann.py).

    python -m benchmarks.catalog_scale [--sizes 10000,100000,1000000] [--queries 500]

For each catalog size, one synthetic bundle in the served format (retriever, channels, catalog,
text vectors, interactions) is loaded by the retriever replica's own class
(``serve.retrieval.RetrievalModel``), and the same requests go through ``candidates()`` (what
``/v1/recommend`` asks the retriever: fused top-100 with the ranker's features and the reasons)
in two passes on the same object: scoring every item (exact), then from the ANN pool; each size is served
at every ``--precisions`` setting (Serve arg precision: fp32, and fp16 text vectors) from the same
bundle, one replica after the other. Reported per size and setting:
the pool's recall@100 of the exact fused top-100, p50/p99 latency of each path on one core, the
ANN index build time, and the replica's resident memory with the model loaded and at the peak of
its load (each replica in a fresh process: the memory is its own, not a previous load's freed
heap); then the same
bundle with its index shipped (ann/, as jobs.train writes it past ``train.ann_index_above``) is
loaded again: the load time of a hot swap once the files are fetched, and the index's size;
on that replica 20 items are then added one at a time (``PUT /v1/items``) and timed, with the
requests after them and anonymous (cold-start) requests.

What stands in, and why: the items' LLM vectors are synthetic (a category centroid plus noise,
normalised, 384-d like all-MiniLM-L6-v2): embedding 10^6 item texts with the real encoder takes
~8 hours on 2 cores (~36 items/s, results/cost_curve.json); the catalog-scale text path itself is what is measured.
The retriever is randomly initialised (its item vectors mix its ID embeddings with a projection
of those text vectors): recall of a pool is measured against the exact answer of the same model,
so no training is needed, and untrained vectors cluster less than trained ones (a harder case
for an IVF index). Users: n/5, each with 15 interactions in one category (Zipf-like popularity), plus users
for the items nobody drew, so every catalog item has interactions (only upserts are cold).
Writes ``results/catalog_scale.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from components import bundle, layout
from components.models.channels import Channels, FusionConfig
from components.models.retriever import RetrieverConfig, SequenceRetriever

ROOT = Path(__file__).resolve().parents[1]
TEXT_DIM, CATEGORIES, EVENTS_PER_USER = 384, 50, 15
# Fusion weights of the order the shared datasets fit (retriever 1; covisit, text, popularity
# below it); fixed here: the comparison is exact vs pool under the same weights.
REQUESTS = "requests.json"  # the measured users' histories, written by measure for serve_paths
WEIGHTS = {"retriever": 1.0, "covisit": 0.5, "text": 0.35, "popularity": 0.1}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def build_bundle(n: int, folder: Path, seed: int = 0) -> Dict[str, Any]:
    """A servable synthetic bundle of ``n`` items under ``folder``; returns the users' histories."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, CATEGORIES, n)
    centroids = rng.normal(size=(CATEGORIES, TEXT_DIM)).astype(np.float32)
    text = centroids[cat] + 0.8 * rng.normal(size=(n, TEXT_DIM)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    # n/5 users with EVENTS_PER_USER items each from one category, Zipf-like popularity within
    # it; then every item nobody drew goes to one more user of its category, so the catalog has
    # interactions throughout (as a k-core-filtered one has) and only upserts are cold
    users = max(1000, n // 5)
    user_cat = rng.integers(CATEGORIES, size=users)
    hist = np.zeros((users, EVENTS_PER_USER), dtype=np.int64)
    for c in range(CATEGORIES):
        pool, who = np.flatnonzero(cat == c), np.flatnonzero(user_cat == c)
        if not len(pool) or not len(who):
            continue
        cdf = np.cumsum(1.0 / np.arange(1, len(pool) + 1) ** 0.6)
        draw = np.searchsorted(cdf / cdf[-1], rng.random((len(who), EVENTS_PER_USER)))
        hist[who] = pool[np.minimum(draw, len(pool) - 1)]
    histories: List[np.ndarray] = list(hist)
    seen = np.zeros(n, dtype=bool)
    seen[hist.ravel()] = True
    for c in range(CATEGORIES):
        left, who = np.flatnonzero((cat == c) & ~seen), np.flatnonzero(user_cat == c)
        for j in range(0, len(left), EVENTS_PER_USER):
            histories.append(left[j:j + EVENTS_PER_USER])
    ts = [np.arange(len(h), dtype=np.int64) * 60_000 + 1_700_000_000_000 for h in histories]

    cfg = RetrieverConfig(num_items=n, text_dim=TEXT_DIM, dim=64, layers=2, max_len=50, loss="softmax")
    torch.manual_seed(seed)
    model = SequenceRetriever(cfg)
    bundle.save_weights(folder, layout.RETRIEVER, model.state_dict(), cfg)
    Channels.fit_data(histories, n, torch.as_tensor(text), FusionConfig(weights=dict(WEIGHTS))).save(
        folder / layout.CHANNELS)
    ids = pa.array([f"item-{k}" for k in range(n)])
    (folder / layout.ITEMS).mkdir(parents=True)
    pq.write_table(pa.table({"item_idx": np.arange(n), "item_id": ids, "title": ids, "text": ids,
                             "categories": pa.array([[f"cat-{c}"] for c in cat])}), folder / layout.ITEMS / "part-0.parquet")
    (folder / layout.TEXT).mkdir(parents=True)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(text.reshape(-1)), TEXT_DIM)
    pq.write_table(pa.table({"item_idx": np.arange(n), "embedding": emb}), folder / layout.TEXT / layout.TEXT_EMBEDDINGS,
                   row_group_size=layout.TEXT_ROW_GROUP)  # as jobs.embed_items writes it
    bundle.save_interactions(folder, histories, ts)
    return {"histories": histories, "ts": ts, "model": model}


def pct(x: List[float], q: float) -> float:
    return round(float(np.percentile(x, q)), 2)


def measure(n: int, queries: int, k: int = 100, precisions=("fp32",)) -> Dict[str, Any]:
    """One catalog of ``n`` items, served at each of ``precisions`` in turn, each by a replica in
    a fresh process (so its memory is its own; the first one's figures at the top level, the
    others' under ``other_precisions``)."""
    folder = Path(tempfile.mkdtemp(prefix=f"scale-{n}-"))
    try:
        t0 = time.perf_counter()
        data = build_bundle(n, folder)
        built_s = time.perf_counter() - t0
        out: Dict[str, Any] = {"items": n, "users": len(data["histories"]), "synthetic_bundle_s": round(built_s, 1)}
        picks = np.random.default_rng(1).choice(len(data["histories"]), queries, replace=False)
        (folder / REQUESTS).write_text(json.dumps([[data["histories"][u].tolist(), data["ts"][u].tolist()] for u in picks]))
        del data
        gc.collect()
        for k_, precision in enumerate(precisions):
            shutil.rmtree(folder / layout.ANN, ignore_errors=True)  # each precision builds, then ships, its own
            proc = subprocess.run([sys.executable, "-m", "benchmarks.catalog_scale", "--serve", str(folder),
                                   "--precisions", precision], cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"serving {n} items at {precision} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            if k_ == 0:
                out.update(res)
            else:
                out.setdefault("other_precisions", {})[precision] = res
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def serve_paths(folder: Path, precision: str, k: int = 100) -> Dict[str, Any]:
    """Load the bundle as a retriever replica at ``precision`` (this process: a fresh one) and
    time both paths on the requests ``measure`` wrote (module doc)."""
    from serve.retrieval import RetrievalModel

    requests = json.loads((folder / REQUESTS).read_text())
    base = rss_mb()
    t0 = time.perf_counter()
    r = RetrievalModel(folder, "scale", ann_above=0, precision=precision)  # with the ANN pool
    load_s = time.perf_counter() - t0
    rss = rss_mb()
    peak = _status_mb("VmHWM")
    pool = r.pool
    out: Dict[str, Any] = {"precision": precision, "replica_load_s": round(load_s, 1),
                           "ann_build_s": round(pool.build_s, 2), "replica_rss_mb": round(rss - base, 0),
                           "replica_load_peak_mb": round(peak - base, 0),
                           "process_rss_mb": round(rss, 0), "ivf_lists": pool.index.nlist,
                           "ivf_nprobe": pool.index.nprobe, "pool_from_index": pool.size,
                           "text_table_mb": round(r.channels.text.numel() * r.channels.text.element_size() / 2**20, 1)}
    lat: Dict[str, List[float]] = {"exact": [], "ann": []}
    pool_sizes: List[int] = []
    torch.set_num_threads(1)  # one request, one core (loads and index builds use them all)
    faiss.omp_set_num_threads(1)
    users = []
    for h, ts in requests:
        h = np.asarray(h, dtype=np.int64)
        rows = (h + 1).tolist()
        with torch.no_grad():
            vec = torch.as_tensor(r.history_vectors(rows))[None]
            ev = torch.full((1, len(rows)), 2, dtype=torch.long)
            gaps = torch.zeros(1, len(rows), dtype=torch.long)
            u = r.model.encode_vectors(vec, ev, gaps, torch.ones(1, len(rows), dtype=torch.bool))[0, -1].numpy()
        users.append((h, u, rows, ts))
    # One pass over the requests per path (a replica serves one of them): alternating them per
    # request would let the exact path's scan of the whole catalog (1.5 GB of text vectors at
    # 10^6 items) evict what the pool path reads from the caches before each of its requests.
    got: Dict[str, List[set]] = {"exact": [], "ann": []}
    saved = r.pool
    for path in ("exact", "ann"):
        r.pool = None if path == "exact" else saved
        h, u, rows, ts = users[0]
        r.candidates(u, rows, ts, [1] * len(rows), [], None, k)  # untimed: the pass's first touch
        for h, u, rows, ts in users:
            t0 = time.perf_counter()
            c = r.candidates(u, rows, ts, [1] * len(rows), [], None, k)
            lat[path].append((time.perf_counter() - t0) * 1000)
            got[path].append(set(c["rows"].tolist()))
    r.pool = saved
    recall = [len(e & a) / max(1, len(e)) for e, a in zip(got["exact"], got["ann"])]
    for h, u, rows, ts in users:
        spread = float(r.vector_moments.of(torch.as_tensor(u)[None])[1][0])
        pool_sizes.append(len(r._pool(u, h, None, spread)))
    out.update({
        "recall@100_of_exact": round(float(np.mean(recall)), 4), "recall@100_min": round(float(np.min(recall)), 4),
        "pool_items_mean": round(float(np.mean(pool_sizes)), 0),
        "exact_p50_ms": pct(lat["exact"], 50), "exact_p99_ms": pct(lat["exact"], 99),
        "ann_p50_ms": pct(lat["ann"], 50), "ann_p99_ms": pct(lat["ann"], 99)})
    # A hot swap to a bundle that ships its index (jobs.train, past train.ann_index_above):
    # the replica reads it instead of building it.
    r.pool.save(folder / layout.ANN)
    out["ann_index_mb"] = round((folder / layout.ANN / "index.faiss").stat().st_size / 2**20, 1)
    del r, pool
    gc.collect()
    t0 = time.perf_counter()
    shipped = RetrievalModel(folder, "scale", ann_above=0, precision=precision)
    out["replica_load_shipped_index_s"] = round(time.perf_counter() - t0, 1)
    assert shipped.pool.loaded, "the shipped index was not used"
    out.update(upserts(shipped, [(u, rows, ts) for _, u, rows, ts in users[:20]]))
    return out


def upserts(r, users, count: int = 20) -> Dict[str, Any]:
    """Items added one at a time as ``PUT /v1/items`` adds them (a text vector each, so the
    replica places each by its text), the first request of each of ``users`` after them (it
    computes the new items' text neighbours), and anonymous requests (``cold_start``)."""
    rng = np.random.default_rng(2)
    added = []
    for j in range(count):
        e = rng.normal(size=(1, TEXT_DIM)).astype(np.float32)
        t0 = time.perf_counter()
        r.upsert([{"item_id": f"new-{j}", "title": f"new {j}", "categories": ["cat-0"]}], e / np.linalg.norm(e))
        added.append((time.perf_counter() - t0) * 1000)
    after = []
    for u, rows, ts in users:
        t0 = time.perf_counter()
        r.candidates(u, rows, ts, [1] * len(rows), [], None, 100)
        after.append((time.perf_counter() - t0) * 1000)
    cold = []
    for _ in range(20):
        t0 = time.perf_counter()
        r.cold_start(100)
        cold.append((time.perf_counter() - t0) * 1000)
    return {"upsert_ms_mean": round(float(np.mean(added)), 2), "upsert_ms_max": round(float(np.max(added)), 2),
            "first_request_after_upserts_ms": round(after[0], 1), "requests_after_upserts_p50_ms": pct(after, 50),
            "cold_start_p50_ms": pct(cold, 50)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--precisions", default="fp32,fp16",
                    help="Serve precision settings, each served from the same bundle (the first at the top level)")
    ap.add_argument("--out", default=str(ROOT / "results/catalog_scale.json"))
    ap.add_argument("--serve", help=argparse.SUPPRESS)  # internal: one replica of a built bundle (measure)
    args = ap.parse_args()
    if args.serve:
        print(json.dumps(serve_paths(Path(args.serve), args.precisions)), flush=True)
        return
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        print(f"catalog of {n} items ...", flush=True)
        rows.append(measure(n, args.queries, precisions=args.precisions.split(",")))
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "catalog_scale", "machine": f"{os.cpu_count()} CPU cores, no GPU, one thread per request",
              "stand_ins": "synthetic 384-d text vectors and a randomly initialised retriever (module doc)",
              "weights": WEIGHTS, "sizes": rows,
              "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
