"""Recommendation quality on real data: the whole pipeline (preprocess -> embed -> Ray Train +
DeepSpeed -> evaluate with baselines and the new-item variant), timed end to end.

    python -m benchmarks.quality [--dataset ml-latest-small|amazon-gift-cards] [key=value ...]

Reads ../shared/data (or $SHARED_DATA). Model selection uses the valid split only; the table is
on test. Writes ``results/quality_<dataset>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
DATASETS = {
    "ml-latest-small": ("movielens", "ml-latest-small", "configs/movielens.yaml"),
    "amazon-gift-cards": ("amazon", "amazon-2018-gift-cards-5core", "configs/amazon.yaml"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-latest-small", choices=sorted(DATASETS))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    source, folder, config = DATASETS[args.dataset]
    path = SHARED / folder
    if not path.is_dir():
        raise SystemExit(f"dataset not found at {path} (set SHARED_DATA)")
    from components.config import load_config
    from jobs import pipeline

    with tempfile.TemporaryDirectory(prefix="bench-quality-") as root:
        cfg = load_config([f"data.source={source}", f"data.path={path}", f"storage.root={root}",
                           "evaluate.baselines=true", "evaluate.new_item_variant=true", *args.overrides],
                          ROOT / config)
        t0 = time.perf_counter()
        out = pipeline.main(cfg)
        wall = time.perf_counter() - t0
    res = out["evaluate"]["results"]
    table = {name: splits["test"] for name, splits in res["models"].items()}
    main_name = res["main_model"]
    rare = next(k for k in res["slices"][main_name] if k.startswith("rare_items"))
    summary = {
        "benchmark": "quality", "dataset": args.dataset, "split": "loo", "machine": f"{os.cpu_count()} cpus",
        "python": platform.python_version(), "overrides": args.overrides, "pipeline_wall_s": round(wall, 1),
        "timings": out["timings"], "test": table, "main_model": main_name,
        "rare_item_recall@10": {n: s[rare]["recall@10"] for n, s in res["slices"].items()},
        "new_item_variant": res.get("new_item_variant"), "valid": {n: s["valid"] for n, s in res["models"].items()},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out_path = ROOT / "results" / f"quality_{args.dataset}.json"
    out_path.parent.mkdir(exist_ok=True)
    out_path.write_text(json.dumps(summary, indent=2, default=str))
    print(f"\n{args.dataset} (loo, test, full ranking): pipeline {wall / 60:.1f} min")
    print(f"{'model':<16}{'Recall@10':>10}{'NDCG@10':>10}{'Recall@20':>10}{'NDCG@20':>10}{'rare R@10':>10}")
    for name, m in table.items():
        print(f"{name:<16}{m['recall@10']:>10.4f}{m['ndcg@10']:>10.4f}{m['recall@20']:>10.4f}{m['ndcg@20']:>10.4f}"
              f"{summary['rare_item_recall@10'].get(name, float('nan')):>10.4f}")
    nv = res.get("new_item_variant")
    if nv:
        for name in ("hybrid", "id-only"):
            print(f"new-item variant {name}: Recall@10 all {nv[name]['all']['recall@10']:.4f}, "
                  f"new-item targets {nv[name]['new_item_targets'].get('recall@10', 0):.4f} "
                  f"(n={nv[name]['new_item_targets']['n']})")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
