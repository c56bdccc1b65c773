"""Serving precision (issue 25 item 4): what each Serve ``precision`` setting keeps and saves, side by side.

    python -m benchmarks.precision [--datasets ml-latest-small,amazon-gift-cards] [--serving ml-latest-small]

For each dataset the contract command trains and promotes its model (as ``benchmarks.quality``
runs it; no peer here). Then, for every setting in ``serve.retrieval.PRECISIONS``:

- **quality**: the shipped model's valid and test rankings as a replica serves it (its channels'
  LLM text table in that precision; ``components.evaluation.ranking.final_ranking``, full
  ranking), with the paired BCa 95% interval of NDCG@10 against fp32 over the same users. A
  setting is made the default on the valid figures; test is reported;
- **memory**: a fresh process loads the retriever replica's model (``RetrievalModel``, with the
  encoder and ranker of the fused ingress) and reports its RSS growth and the text table's bytes;
- **bundle size** on disk (the same for every setting: the bundle stores float32 and a replica
  converts when it loads).

Then ``benchmarks.serving`` runs the shipped Serve path on the ``--serving`` dataset's model at
fp32 and at each other setting in one run: throughput and p50/p99 at concurrency 1, 8 and 32, and
the ingress replica's CPU per request (its profile). Beside it, the text encoder (new items'
text at serving) is measured in float32 and with torch's int8 dynamic quantisation of its linear
layers: items/s on two threads and agreement with float32 (cosine, shared top-10 neighbours);
that one is not offered as a setting (see docs/serving.md "Precision").

Writes ``results/precision.json`` and ``results/serving_precision_<dataset>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from benchmarks.quality import DATASETS, ROOT, SHARED, metrics, ndcg_per_user, paired_bootstrap, run_contract

SERVING = "fused+throughput+haproxy"


def fetch_shipped(root: str, into: Path) -> Dict[str, Any]:
    """The promoted bundle of the store at ``root``, fetched as a replica does."""
    from components import layout, registry
    from components.storage import Storage
    from serve.watcher import fetch_parts

    storage = Storage(root)
    pointer = registry.read_pointer(storage, "recommender")
    folder = fetch_parts(storage, pointer, sorted(set(layout.RETRIEVER_PARTS + layout.RANKER_PARTS)), into)
    return {"storage": storage, "pointer": pointer, "folder": Path(folder)}


def served_ranks(shipped: Dict[str, Any], precision: str) -> Dict[str, Any]:
    """Valid and test ranks of the shipped model with its channels' text table in ``precision``."""
    from components import bundle, layout
    from components.data.datasets import load_training_data
    from components.evaluation.ranking import final_ranking
    from serve.retrieval import PRECISIONS

    folder, storage = shipped["folder"], shipped["storage"]
    lineage = bundle.read_lineage(folder)
    data = load_training_data(storage, layout.dataset(lineage["dataset"], lineage["dataset_version"]),
                              lineage.get("text_embeddings"))
    channels = bundle.load_channels(folder, data.text)
    if channels is not None:
        channels.store_text(PRECISIONS[precision])
    retriever, ranker = bundle.load_retriever(folder, verify=False), bundle.load_ranker(folder, verify=False)
    out: Dict[str, Any] = {"text_table_dtype": None if channels is None or channels.text is None
                           else str(channels.text.dtype)}
    t0 = time.perf_counter()
    for split in ("valid", "test"):
        ranks, _top, _targets, users = final_ranking(retriever, ranker, data.text, data.histories, split,
                                                     data.categories, channels=channels)
        out[split] = {"ranks": np.asarray(ranks), "users": np.asarray(users)}
    out["score_s"] = round(time.perf_counter() - t0, 1)
    return out


def replica_memory(folder: str, precision: str) -> Dict[str, Any]:
    """(child process) RSS growth of loading the fused ingress's models at ``precision``."""
    import psutil
    import torch  # noqa: F401  (imports are not the model's memory)

    from serve.models import RankerModel, UserEncoderModel
    from serve.retrieval import RetrievalModel

    proc = psutil.Process()
    before = proc.memory_info().rss
    r = RetrievalModel(Path(folder), "bench", precision=precision)
    models = (r, UserEncoderModel(Path(folder), "bench"), RankerModel(Path(folder), "bench"))
    text = r.channels.text if r.channels is not None else None
    return {"rss_growth_mb": round((proc.memory_info().rss - before) / 2**20, 1), "items": r.size,
            "text_table_mb": 0.0 if text is None else round(text.numel() * text.element_size() / 2**20, 2),
            "models": len(models)}


def bundle_mb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20, 2)


def encoder_precision(items_table, n: int = 1000) -> Dict[str, Any]:
    """The base text encoder in float32 and with int8 dynamic quantisation of its linear layers
    (per-channel weights): items/s on this process's threads, and how far its vectors move."""
    import torch
    import torch.nn.functional as F

    from components.models.text_encoder import TextEncoder, TextEncoderConfig, item_text

    t = items_table.slice(0, n)
    texts = [item_text(a or "", b or "", c or []) for a, b, c in zip(
        t["title"].to_pylist(), t["text"].to_pylist() if "text" in t.column_names else [""] * t.num_rows,
        t["categories"].to_pylist())]
    out: Dict[str, Any] = {"items": len(texts), "threads": torch.get_num_threads()}
    base = TextEncoder(TextEncoderConfig()).eval()
    base.encode(texts[:64])  # warm-up
    t0 = time.perf_counter()
    ref = base.encode(texts)
    out["fp32_items_per_s"] = round(len(texts) / (time.perf_counter() - t0), 1)
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        q = TextEncoder(TextEncoderConfig()).eval()
        q.model = quantize_dynamic(q.model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        q.encode(texts[:64])
        t0 = time.perf_counter()
        v = q.encode(texts)
        out["int8_items_per_s"] = round(len(texts) / (time.perf_counter() - t0), 1)
    except Exception as exc:  # torch.ao is deprecated; record why it did not run
        out["int8_error"] = repr(exc)
        return out
    cos = F.cosine_similarity(ref, v)
    k = min(10, len(texts) - 1)
    a = (ref @ ref.T).topk(k + 1).indices[:, 1:].tolist()
    b = (v @ v.T).topk(k + 1).indices[:, 1:].tolist()
    out["int8_cosine_to_fp32"] = {"mean": round(float(cos.mean()), 4), "min": round(float(cos.min()), 4)}
    out["int8_top10_neighbours_shared"] = round(float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)])), 3)
    return out


def bench_dataset(name: str, work: Path, overrides: List[str], serving: bool, requests: int) -> Dict[str, Any]:
    from components import layout
    from serve.retrieval import PRECISIONS

    source, folder, extra, _peer, _flags = DATASETS[name]
    path = SHARED / folder
    if not path.is_dir():
        print(f"skipping {name}: {path} not found (set SHARED_DATA)")
        return {}
    root = str(work / f"store-{name}")
    run = run_contract(source, path, extra, root, overrides)
    shipped = fetch_shipped(root, work / f"bundle-{name}")
    out: Dict[str, Any] = {"contract_command": run["cmd"], "pipeline_wall_s": run["wall_s"],
                           "run_id": shipped["pointer"]["run_id"], "bundle_mb": bundle_mb(shipped["folder"]),
                           "fusion_weights": json.loads((shipped["folder"] / layout.CHANNELS / "fusion.json").read_text())
                           .get("weights"), "settings": {}}
    ref = None
    for precision in PRECISIONS:
        r = served_ranks(shipped, precision)
        row: Dict[str, Any] = {"score_s": r["score_s"], "text_table": r["text_table_dtype"]}
        for split in ("valid", "test"):  # the default is chosen on valid; test is reported
            row[split] = metrics(r[split]["ranks"])
            if ref is not None:
                a, b = r[split], ref[split]
                assert (a["users"] == b["users"]).all()
                row[f"minus_fp32_{split}_ndcg@10"] = paired_bootstrap(ndcg_per_user(a["ranks"]), ndcg_per_user(b["ranks"]))
                row[f"{split}_ranks_equal_to_fp32"] = float((a["ranks"] == b["ranks"]).mean())
                base = metrics(b["ranks"])["ndcg@10"]
                row[f"relative_{split}_ndcg@10_change"] = row[split]["ndcg@10"] / base - 1 if base else None
        ref = ref or r  # fp32, the first: what the others are compared with
        child = subprocess.run([sys.executable, "-m", "benchmarks.precision", "--child-memory",
                                f"{shipped['folder']}::{precision}"], cwd=ROOT, capture_output=True, text=True)
        row["replica"] = json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0 else {
            "error": child.stderr[-1500:]}
        out["settings"][precision] = row
        print(name, precision, json.dumps({k: v for k, v in row.items() if k != "score_s"}), flush=True)
    from components.storage import Storage

    lin = shipped["pointer"]["lineage"]
    items = Storage(root).read_parquet(layout.join(layout.dataset(lin["dataset"], lin["dataset_version"]), layout.ITEMS))
    out["text_encoder"] = encoder_precision(items)
    print(name, "text encoder", json.dumps(out["text_encoder"]), flush=True)
    if serving:
        dest = ROOT / "results" / f"serving_precision_{name}.json"
        variants = [f"{SERVING}+{p}" for p in PRECISIONS]  # each named: the default is not fp32
        subprocess.run([sys.executable, "-m", "benchmarks.serving", "--data", str(path), "--storage", root,
                        "--variants", ",".join(variants), "--profile", ",".join(variants),
                        "--requests", str(requests), "--out", str(dest)], cwd=ROOT, check=True)
        res = json.loads(dest.read_text())
        out["serving"] = {"results": str(dest.relative_to(ROOT)), "variants": {}}
        for v in variants:
            x = res["variants"][v]
            prof = x.get("profile", {})
            out["serving"]["variants"][v] = {
                **{f"c{c}": {k: x["serve"][f"c{c}"][k] for k in ("throughput_rps", "p50_ms", "p99_ms", "errors")}
                   for c in (1, 8, 32)},
                "ingress_cpu_ms_per_request": prof.get("cpu_ms_per_request", {}).get("ingress replica(s)")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="ml-latest-small,amazon-gift-cards")
    ap.add_argument("--serving", default="ml-latest-small", help="the dataset whose model is served at each setting")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "results" / "precision.json"))
    ap.add_argument("--child-memory", help=argparse.SUPPRESS)  # internal: FOLDER::PRECISION
    ap.add_argument("overrides", nargs="*", help="extra key=value settings for the contract command")
    args = ap.parse_args()
    if args.child_memory:
        folder, precision = args.child_memory.split("::")
        print(json.dumps(replica_memory(folder, precision)))
        return
    result: Dict[str, Any] = {"benchmark": "precision", "machine": f"{os.cpu_count()} cpus", "datasets": {}}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        for name in args.datasets.split(","):
            result["datasets"][name] = bench_dataset(name, Path(tmp), args.overrides, name == args.serving,
                                                     args.requests)
    result["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
