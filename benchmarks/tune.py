"""Choose a preset's retriever settings on valid only, and keep the record of the search.

    python -m benchmarks.tune --dataset amazon-scientific \\
        --grid retriever.dropout=0.2,0.5 --grid train.retriever.max_tokens=1500000,6000000

Preprocesses the dataset as the contract command does (its source preset), embeds the catalog
with the pre-fine-tuning encoder, then fits one in-process retriever per combination of the
``--grid`` values (the preset's other settings unchanged) and scores it on **valid**. The test
split is never read: the histories are built from the train sequences and the valid targets
only. Writes ``results/tuning_<dataset>.json``: every combination tried, its valid figures and
fit time, and the one chosen (best valid NDCG@10). Copying the chosen values into
``configs/<source>.yaml`` is a reviewed change that cites this file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from typing import Any, Dict, List

from benchmarks.quality import DATASETS, ROOT, SHARED


def _trial(overrides: List[str], data, text) -> Dict[str, Any]:
    from components.config import load_config, preset_for
    from components.evaluation.evaluate import _plain, local_train_config
    from components.evaluation.metrics import ranking_metrics
    from components.evaluation.ranking import final_ranking
    from components.models.retriever import RetrieverConfig
    from components.training.retriever import fit_retriever_local

    cfg = load_config(overrides, preset_for(overrides))
    rcfg, tcfg = RetrieverConfig(**_plain(cfg.retriever)), local_train_config(cfg)
    t0 = time.perf_counter()
    model = fit_retriever_local(data["histories"], text if rcfg.use_text else None, rcfg, tcfg)
    fit_s = time.perf_counter() - t0
    ranks = final_ranking(model, None, text if rcfg.use_text else None, data["histories"], "valid",
                          data["categories"])[0]
    m = ranking_metrics(ranks, (10,))
    return {"valid": {"ndcg@10": m["ndcg@10"], "recall@10": m["recall@10"], "n": int(len(ranks))},
            "fit_s": round(fit_s, 1), **getattr(model, "fit_progress", {})}


def load_without_test(storage, prefix: str, half: int | None = None) -> Dict[str, Any]:
    """Train histories and valid targets; the test split is replaced by an empty table, unread.
    ``half``: only the valid targets of that half of the users (benchmarks.quality.user_half),
    so the other half's test is data no selection came near."""
    import numpy as np

    from benchmarks.quality import user_half
    from components import layout
    from components.data.sequences import histories_from_tables

    items = storage.read_parquet(layout.join(prefix, layout.ITEMS))
    valid = storage.read_parquet(layout.join(prefix, "valid"))
    if half is not None:
        keep = np.asarray([user_half(u) == half for u in valid["user_id"].to_pylist()])
        valid = valid.filter(keep)
    h = histories_from_tables(storage.read_parquet(layout.join(prefix, layout.SEQUENCES)), valid,
                              valid.slice(0, 0), items.num_rows)
    return {"histories": h, "items": items, "categories": items["categories"].to_pylist()}


def embed(cfg, items):
    from components.bundle import embeddings_tensor
    from components.evaluation.evaluate import _plain
    from components.models.text_encoder import TextEncoder, TextEncoderConfig, embed_catalog

    table = embed_catalog(TextEncoder(TextEncoderConfig(**_plain(cfg.text))).eval(), items)
    return embeddings_tensor(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    ap.add_argument("--grid", action="append", default=[], help="key=v1,v2,...: values to try (repeatable)")
    ap.add_argument("--half", type=int, choices=(0, 1), help="select on this half of the users' valid only")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    from components.config import load_config, preset_for
    from components.storage import Storage
    from jobs.preprocess import run as preprocess

    source, folder, extra, _peer, _flags = DATASETS[args.dataset]
    axes = [(g.split("=", 1)[0], g.split("=", 1)[1].split(",")) for g in args.grid]
    with tempfile.TemporaryDirectory(prefix="tune-") as tmp:
        base = [f"data.source={source}", f"data.path={SHARED / folder}", f"storage.root={tmp}",
                "preprocess.engine=local", *extra]
        cfg = load_config(base, preset_for(base))
        out = preprocess(cfg, engine="local")
        data = load_without_test(Storage(tmp), out["prefix"], args.half)
        t0 = time.perf_counter()
        text = embed(cfg, data["items"]) if cfg.retriever.use_text else None
        trials = []
        for values in itertools.product(*(v for _k, v in axes)):
            settings = {k: v for (k, _), v in zip(axes, values)}
            res = _trial(base + [f"{k}={v}" for k, v in settings.items()], data, text)
            trials.append({"settings": settings, **res})
            print(json.dumps(trials[-1]), flush=True)
    best = max(trials, key=lambda t: t["valid"]["ndcg@10"])
    record = {
        "benchmark": "tuning", "dataset": args.dataset, "source": source, "preset": f"configs/{source}.yaml",
        "extra": extra, "dataset_version": out["version"], "selection": "valid NDCG@10, in-process retriever",
        "test_split_read": False, "valid_users": "all" if args.half is None else f"half {args.half}", "embed_s": round(time.perf_counter() - t0 - sum(t["fit_s"] for t in trials), 1),
        "grid": dict(axes), "trials": trials, "chosen": best["settings"], "chosen_valid": best["valid"],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = ROOT / "results" / f"tuning_{args.dataset}{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"chosen on valid: {best['settings']} (NDCG@10 {best['valid']['ndcg@10']:.4f}); wrote {path}")


if __name__ == "__main__":
    main()
