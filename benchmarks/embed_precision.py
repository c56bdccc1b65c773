"""The catalog embedding pass at fp32 and bf16: items/s, how far the vectors move, and what that does
to the retriever's valid figures, side by side in one run. What ``embed.precision`` is chosen on.

    python -m benchmarks.embed_precision [--datasets amazon-gift-cards ...] [--synthetic 1000]

For each precision (fp32 first, then bf16 from the same weights, the encoder cast as
jobs.embed_items casts it):
  throughput  ``--synthetic`` texts of ~50 tokens, and each dataset's catalog, embedded in this
              process with 1 torch thread (what one Ray Data actor of the pipeline uses) and with
              all threads;
  vectors     cosine of each item's bf16 vector to its fp32 vector, and the overlap of each item's
              10 nearest text neighbours;
  quality     the preset's in-process retriever (benchmarks.tune's trial: same seed, same
              settings) fitted on each table and scored on **valid**; the test split is not read.
Writes ``results/embed_precision.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from typing import Any, Dict, List

import numpy as np
import torch

from benchmarks.quality import DATASETS, ROOT, SHARED

PRECISIONS = ("fp32", "bf16")


def synthetic_texts(n: int, seed: int = 0) -> List[str]:
    rng = np.random.default_rng(seed)
    words = [f"w{k}" for k in range(5000)]
    return [" ".join(rng.choice(words, 40)) for _ in range(n)]


def encoder_at(cfg, precision: str):
    from components.evaluation.evaluate import _plain
    from components.models.text_encoder import TextEncoder, TextEncoderConfig, inference_dtype

    return TextEncoder(TextEncoderConfig(**_plain(cfg.text))).eval().to(inference_dtype(precision))


def timed_encode(encoder, texts: List[str], threads: int) -> tuple[torch.Tensor, float]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        encoder.encode(texts[:64])  # warm-up: first-call allocations and kernel selection
        t0 = time.perf_counter()
        emb = encoder.encode(texts)
        return emb.float(), len(texts) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def neighbour_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean share of each item's k nearest neighbours (inner product, itself excluded) that the two
    tables agree on."""
    def top(x):
        s = x @ x.T
        s.fill_diagonal_(-float("inf"))
        return s.topk(k, dim=1).indices

    ta, tb = top(a), top(b)
    return float(np.mean([len(set(ra.tolist()) & set(rb.tolist())) / k for ra, rb in zip(ta, tb)]))


def run_dataset(name: str, threads: int) -> Dict[str, Any]:
    from benchmarks.tune import _trial, load_without_test
    from components.config import load_config, preset_for
    from components.models.text_encoder import item_text
    from components.storage import Storage
    from jobs.preprocess import run as preprocess

    source, folder, extra, _peer, _flags = DATASETS[name]
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        base = [f"data.source={source}", f"data.path={SHARED / folder}", f"storage.root={tmp}",
                "preprocess.engine=local", *extra]
        cfg = load_config(base, preset_for(base))
        out = preprocess(cfg, engine="local")
        data = load_without_test(Storage(tmp), out["prefix"])
    items = data["items"]
    texts = [item_text(t, x, c) for t, x, c in zip(items["title"].to_pylist(), items["text"].to_pylist(),
                                                     items["categories"].to_pylist())]
    row: Dict[str, Any] = {"dataset": name, "items": len(texts), "dataset_version": out["version"]}
    tables = {}
    for p in PRECISIONS:
        enc = encoder_at(cfg, p)
        tables[p], row[f"{p}_items_per_s"] = timed_encode(enc, texts, threads)
        print(f"  {name} {p}: {row[f'{p}_items_per_s']:.0f} items/s ({threads} threads)", flush=True)
    cos = torch.nn.functional.cosine_similarity(tables["fp32"], tables["bf16"], dim=1)
    row["cosine_mean"], row["cosine_min"] = float(cos.mean()), float(cos.min())
    row["top10_neighbour_overlap"] = neighbour_overlap(tables["fp32"], tables["bf16"])
    if cfg.retriever.use_text:
        for p in PRECISIONS:
            res = _trial(base, data, tables[p])
            row[f"{p}_valid"], row[f"{p}_fit_s"] = res["valid"], res["fit_s"]
            print(f"  {name} {p}: valid NDCG@10 {res['valid']['ndcg@10']:.4f} Recall@10 "
                  f"{res['valid']['recall@10']:.4f} (fit {res['fit_s']}s)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="*", default=["amazon-gift-cards"], choices=sorted(DATASETS))
    ap.add_argument("--synthetic", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "results" / "embed_precision.json"))
    args = ap.parse_args()
    from components.config import load_config
    from components.models.text_encoder import native_bf16

    cfg = load_config([])
    threads = os.cpu_count() or 1
    texts = synthetic_texts(args.synthetic)
    synth: Dict[str, Any] = {"texts": len(texts)}
    embs = {}
    for p in PRECISIONS:
        enc = encoder_at(cfg, p)
        for t in sorted({1, threads}):
            embs[p], synth[f"{p}_items_per_s_{t}_threads"] = timed_encode(enc, texts, t)
            print(f"synthetic {p}, {t} thread(s): {synth[f'{p}_items_per_s_{t}_threads']:.0f} items/s", flush=True)
    cos = torch.nn.functional.cosine_similarity(embs["fp32"], embs["bf16"], dim=1)
    synth["cosine_mean"], synth["cosine_min"] = float(cos.mean()), float(cos.min())
    rows = [run_dataset(d, threads) for d in args.datasets if (SHARED / DATASETS[d][1]).exists()]
    result = {"benchmark": "embed_precision", "machine": f"{platform.node()} {threads} cpus",
              "cpu_native_bf16": native_bf16("cpu"), "python": platform.python_version(),
              "torch": torch.__version__, "encoder": cfg.text.model or "all-MiniLM-L6-v2 (bundled)", "synthetic": synth, "datasets": rows,
              "selection": "valid only; the test split is not read",
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
