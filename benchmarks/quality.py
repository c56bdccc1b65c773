"""Recommendation quality, side by side with an outside peer, from the documented command.

    python -m benchmarks.quality [--datasets ml-latest-small,amazon-gift-cards] [--no-peer] [--no-id-only] [--text-only]
    SHARED_DATA=/other/data python -m benchmarks.quality --datasets ml-latest-small --tag other  # same kind

For every dataset in ../shared/data (or $SHARED_DATA), in one run on one machine:
  1. the contract command, as a user runs it (no --config: the source's preset applies):
     ``python -m jobs.pipeline data.source=X data.path=DIR storage.root=TMP`` (+ the dataset's
     documented extra settings, e.g. ``preprocess.kcore=5`` for Amazon Gift Cards), timed;
  2. its ``reports/<run_id>/predictions.parquet`` scored here, independently of jobs.evaluate,
     against the dataset version's test split (full ranking, history excluded, top-100 lists);
  3. an ID-only retriever with the same settings (in-process), for the hybrid vs ID-only paired
     bootstrap 95% interval over test users (and the same on valid); with --text-only also a
     retriever without item IDs, on the text embeddings the shipped retriever used;
  4. the reference SASRec-CE in ../shared/peers, run as an outside program with its documented
     flags on its own copy of the same split protocol.
Prints one table (project, peer, ItemKNN, MostPopular, ratio) and writes
``results/quality_<dataset>.json`` with the figures and the per-user test ranks behind them.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
PEERS = Path(os.environ.get("SHARED_PEERS", ROOT.parent / "shared" / "peers"))
SCI_FLAGS = ["--max-len", "50", "--dropout", "0.5", "--batch", "128", "--epochs", "300", "--patience", "20"]
# name -> (source, folder under shared/data, extra contract settings, peer dataset name, peer flags)
DATASETS = {
    "ml-latest-small": ("movielens", "ml-latest-small", [], "ml-latest-small",
                        ["--max-len", "200", "--dropout", "0.5", "--batch", "32", "--epochs", "300", "--patience", "30"]),
    "amazon-gift-cards": ("amazon", "amazon-2018-gift-cards-5core", ["preprocess.kcore=5"], "amazon-giftcards",
                          ["--max-len", "50", "--dropout", "0.5", "--batch", "32", "--epochs", "300", "--patience", "30"]),
    # Published benchmark splits, through the sources for the research formats (used as given).
    "amazon-scientific": ("recbole", "amazon-2018-scientific-unisrec", [], "amazon-scientific-unisrec", SCI_FLAGS),
    # 22k users: at most 100 epochs, patience 10 (the peer's README gives no Beauty flags)
    "amazon-beauty": ("sequences", "amazon-2014-beauty-s3rec", [], "amazon-beauty-s3rec",
                      SCI_FLAGS[:6] + ["--epochs", "100", "--patience", "10"]),
}
# Published test figures on the same split (from the dataset READMEs in ../shared/data) and how
# their protocol differs from the one scored here (full ranking, history masked, repeats = misses).
PUBLISHED = {
    "amazon-scientific": {
        "figures": {"MISSRec (ID + text + image, pretrained)": {"ndcg@10": 0.0753, "recall@10": 0.1360},
                    "MISSRec (text + image, no ID)": {"ndcg@10": 0.0659, "recall@10": 0.1269},
                    "VQ-Rec": {"ndcg@10": 0.0643, "recall@10": 0.1211}},
        "protocol": "published: history items not masked, text = title + categories + brand, history cut to 50; "
                    "here: history masked (a repeated target, 50 of 8,442, is a miss), the same text, max_len 50",
    },
    "amazon-beauty": {
        "figures": {"TIGER (paper)": {"ndcg@10": 0.0384, "recall@10": 0.0648},
                    "TIGER (outside reproduction)": {"ndcg@10": 0.0319, "recall@10": 0.0582},
                    "SASRec (same reproduction)": {"ndcg@10": 0.0272, "recall@10": 0.0516}},
        "protocol": "published: leave-one-out on each line, full ranking; masking not stated; "
                    "here: history masked, attributes (anonymised ids) as the only item text",
    },
}


HOLDOUT = "valid_ranker_holdout"  # the valid lists the ranker did not train on (jobs.evaluate)


def ranks_from_predictions(pred_users: List[str], pred_items: List[List[str]], targets: Dict[str, str]) -> np.ndarray:
    """0-based rank of each test user's target in their top-100 list (100 when absent)."""
    lists = dict(zip(pred_users, pred_items))
    out = []
    for user, target in targets.items():
        items = lists.get(user, [])
        out.append(items.index(target) if target in items else 100)
    return np.asarray(out)


def metrics(ranks: np.ndarray) -> Dict[str, float]:
    hit = ranks < 10
    return {"recall@10": float(hit.mean()), "ndcg@10": float(np.where(hit, 1 / np.log2(ranks + 2.0), 0).mean()),
            "n": int(len(ranks))}


def ndcg_per_user(ranks: np.ndarray) -> np.ndarray:
    return np.where(ranks < 10, 1 / np.log2(np.asarray(ranks) + 2.0), 0.0)


def user_half(user_id: str) -> int:
    """0 or 1 by a stable hash of the id: tune on one half's valid, score the other half's test."""
    return hashlib.sha256(str(user_id).encode()).digest()[0] & 1


def by_half(users: List[str], ranks: np.ndarray) -> Dict[str, Dict[str, float]]:
    half = np.asarray([user_half(u) for u in users])
    return {f"half{h}": metrics(np.asarray(ranks)[half == h]) for h in (0, 1)}


# Resample cells (resamples x users) that scipy holds at once: ~33 B each at the peak (measured
# with tracemalloc: the index, the jackknife mask and the gathered values), so ~65 MiB whatever
# the number of users; a fixed batch of 200 resamples was 630 MiB at 100k users.
BOOTSTRAP_CELLS = 2_000_000


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reps: int = 2000, seed: int = 0,
                     max_cells: int = BOOTSTRAP_CELLS) -> Dict[str, float]:
    """Mean of a - b over users with a BCa 95% interval (``scipy.stats.bootstrap`` over the
    per-user differences: users resampled with replacement, pairs kept together), computed
    ``max_cells // users`` resamples (and jackknife samples) at a time: the same result as in one
    go for the same seed, in bounded memory."""
    from scipy.stats import bootstrap

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if not d.any():  # identical scores: BCa is undefined for a constant sample
        return {"diff": 0.0, "ci95": [0.0, 0.0], "method": "BCa", "n": int(len(d))}
    res = bootstrap((d,), np.mean, n_resamples=reps, confidence_level=0.95, method="BCa",
                    random_state=np.random.default_rng(seed), batch=max(1, max_cells // len(d)), vectorized=True)
    ci = res.confidence_interval
    return {"diff": float(d.mean()), "ci95": [float(ci.low), float(ci.high)], "method": "BCa", "n": int(len(d))}


def peer_ranks(work: Path, peer_name: str, users: List[str], targets: Dict[str, str]) -> np.ndarray:
    """The peer's test top-100 lists scored with this module's scorer, after checking that the
    peer's split has exactly the project's (user, target) pairs."""
    import csv

    with open(work / "splits" / peer_name / "test.csv", newline="") as f:
        peer_targets = {row["user"]: row["item"] for row in csv.DictReader(f)}
    if peer_targets != targets:
        only_p = set(peer_targets.items()) - set(targets.items())
        only_q = set(targets.items()) - set(peer_targets.items())
        raise SystemExit(f"peer and project test pairs differ: {len(only_p)} only in the peer's "
                         f"(e.g. {sorted(only_p)[:3]}), {len(only_q)} only in the project's (e.g. {sorted(only_q)[:3]})")
    lists: Dict[str, List[tuple]] = {}
    with open(work / "out" / "predictions" / peer_name / "SASRec-CE.test.csv", newline="") as f:
        for row in csv.DictReader(f):
            lists.setdefault(row["user"], []).append((int(row["rank"]), row["item"]))
    pred_users = list(lists)
    pred_items = [[item for _r, item in sorted(lists[u])] for u in pred_users]
    return ranks_from_predictions(pred_users, pred_items, {u: targets[u] for u in users})


def run_contract(source: str, path: Path, extra: List[str], root: str, overrides: List[str]) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "jobs.pipeline", f"data.source={source}", f"data.path={path}",
           f"storage.root={root}", *extra, *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"pipeline failed ({p.returncode}):\n{p.stderr[-3000:]}")
    report = re.search(r"report: (\S+)/report.md", p.stdout)
    timings = re.search(r"^timings: (\{.*\})$", p.stdout, re.M)
    return {"wall_s": round(wall, 1), "stdout_tail": p.stdout[-4000:], "report": report.group(1) if report else None,
            "cmd": " ".join(cmd[1:]), "stage_s": ast.literal_eval(timings.group(1)) if timings else None}


def score_project(root: str) -> Dict[str, Any]:
    from components import layout, registry
    from components.storage import Storage

    storage = Storage(root)
    reports = sorted(f for f in storage.list_files("reports") if f.endswith("metrics.json"))
    run_id = reports[-1].split("/")[-2]
    res = storage.read_json(f"reports/{run_id}/metrics.json")
    pred = storage.read_parquet(f"reports/{run_id}/predictions.parquet")
    ds = f"datasets/{res['dataset']}/{res['dataset_version']}"
    targets = test_targets(root, ds)
    ranks = ranks_from_predictions(pred["user_id"].to_pylist(), pred["items"].to_pylist(), targets)
    pointer = registry.read_pointer(storage, "recommender")
    model_ranks = {}
    if storage.is_file(f"reports/{run_id}/test_ranks.parquet"):  # every model's rank per test user
        t = storage.read_parquet(f"reports/{run_id}/test_ranks.parquet")
        row = {u: k for k, u in enumerate(t["user_id"].to_pylist())}
        order = np.asarray([row[u] for u in targets])
        model_ranks = {m: t[m].to_numpy()[order] for m in t.column_names if m != "user_id"}
    lineage = storage.read_json(layout.join(layout.bundle(run_id), layout.LINEAGE))
    return {"run_id": run_id, "metrics_json": res, "ranks": ranks, "users": list(targets), "targets": targets, "dataset_prefix": ds,
            "text_prefix": lineage.get("text_embeddings"), "promoted": bool(pointer and pointer["run_id"] == run_id), "model_ranks": model_ranks}


def test_targets(root: str, dataset_prefix: str) -> Dict[str, str]:
    from components.storage import Storage

    test = Storage(root).read_parquet(f"{dataset_prefix}/test", columns=["user_id", "item_id"])
    return dict(zip(test["user_id"].to_pylist(), test["item_id"].to_pylist()))


def variant_ranks(root: str, project: Dict[str, Any], source: str, extra: List[str], overrides: List[str],
                  use_id: bool = True, use_text: bool = False):
    """A retriever variant (ID-only by default; text-only with ``use_id=False, use_text=True``)
    with the settings the contract command used (its preset + extras), fitted in-process; per-user
    ranks on valid and test (ordered as the dataset's targets)."""
    from components.config import load_config, preset_for
    from components.data.datasets import load_training_data
    from components.evaluation.evaluate import _plain, local_train_config
    from components.evaluation.ranking import final_ranking
    from components.models.retriever import RetrieverConfig
    from components.training.retriever import RetrieverTrainConfig, fit_retriever_local
    from components.storage import Storage

    overrides = [f"data.source={source}", *extra, *overrides]
    cfg = load_config(overrides, preset_for(overrides))
    # the text embeddings the shipped retriever trained on (its run's fine-tuned LLM)
    data = load_training_data(Storage(root), project["dataset_prefix"], project["text_prefix"] if use_text else None)
    rcfg = replace(RetrieverConfig(**_plain(cfg.retriever)), use_id=use_id, use_text=use_text)
    tcfg: RetrieverTrainConfig = local_train_config(cfg)
    text = data.text if use_text else None
    t0 = time.perf_counter()
    model = fit_retriever_local(data.histories, text, rcfg, tcfg)
    out = {"fit_s": round(time.perf_counter() - t0, 1), **getattr(model, "fit_progress", {})}
    for split in ("valid", "test"):
        out[split] = final_ranking(model, None, text, data.histories, split, data.categories)[0]
    return out


def run_peer(peer_name: str, flags: List[str], work: Path, threads: int = 2) -> Dict[str, Any]:
    if not (PEERS / "sasrec_ce.py").is_file():
        return {"skipped": f"no peer at {PEERS}"}
    env = {**os.environ, "SPLITS_DIR": str(work / "splits"), "PEER_OUT": str(work / "out"), "SHARED_DATA": str(SHARED)}
    if not (work / "splits" / peer_name).is_dir():
        subprocess.run([sys.executable, str(PEERS / "prep_splits.py"), peer_name], env=env, check=True,
                       capture_output=True, text=True)
    cmd = [sys.executable, str(PEERS / "sasrec_ce.py"), "--dataset", peer_name, *flags, "--threads", str(threads)]
    print("$ (peer)", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"error": p.stderr[-2000:]}
    res = json.loads((work / "out" / "results" / f"sasrec_ce_{peer_name}.json").read_text())
    return {"test": {"recall@10": res["test"]["Recall@10"], "ndcg@10": res["test"]["NDCG@10"]},
            "valid": {"recall@10": res["valid"]["Recall@10"], "ndcg@10": res["valid"]["NDCG@10"]},
            "fit_s": res.get("fit_seconds"), "wall_s": round(wall, 1), "epochs_run": res.get("epochs_run"),
            "flags": flags}


def bench(name: str, args, work: Path) -> Dict[str, Any]:
    source, folder, extra, peer_name, peer_flags = DATASETS[name]
    path = SHARED / folder
    if not path.is_dir():
        print(f"skipping {name}: {path} not found (set SHARED_DATA)")
        return {}
    root = str(work / f"store-{name}")
    run = run_contract(source, path, extra, root, args.overrides)
    proj = score_project(root)
    res = proj["metrics_json"]
    main = res["main_model"]
    out: Dict[str, Any] = {
        "benchmark": "quality", "dataset": name, "split": "loo", "machine": f"{os.cpu_count()} cpus",
        "python": platform.python_version(), "contract_command": run["cmd"], "pipeline_wall_s": run["wall_s"],
        "main_model": main, "promoted": proj["promoted"], "fusion": res.get("fusion"),
        "project_test_scored_here": metrics(proj["ranks"]),
        "jobs_evaluate": {m: {k: s[k] for k in ("test", "valid", HOLDOUT) if k in s} for m, s in res["models"].items()},
        "test_ranks": {"users": proj["users"], "project": proj["ranks"].tolist()},
        "project_test_by_user_half": by_half(proj["users"], proj["ranks"]),
        "stage_s": run["stage_s"], "published": PUBLISHED.get(name),
    }
    mr, main_name = proj["model_ranks"], res["main_model"]
    if main_name in mr:  # jobs.evaluate's ranks against the ones scored here from its predictions
        out["test_ranks_match_predictions"] = float((np.minimum(mr[main_name], 100) == proj["ranks"]).mean())
    for other in (m for m in mr if m != main_name and not m.startswith(("ItemKNN", "MostPopular"))):
        # what each stage adds on test, paired over users (the ranker's epoch and the fusion were
        # chosen on valid, so these are out-of-sample gains)
        out.setdefault("shipped_minus_test_ndcg@10", {})[other] = paired_bootstrap(
            ndcg_per_user(mr[main_name]), ndcg_per_user(mr[other]))
    if not args.no_id_only:
        ido = variant_ranks(root, proj, source, extra, args.overrides)
        # jobs.evaluate's valid ranks of the main model come from metrics.json (means only);
        # the paired interval on test uses the predictions scored here.
        out["id_only"] = {"fit_s": ido["fit_s"], "test": metrics(ido["test"]), "valid": metrics(ido["valid"])}
        out["hybrid_minus_id_only_test_ndcg@10"] = paired_bootstrap(ndcg_per_user(proj["ranks"]),
                                                                    ndcg_per_user(ido["test"]))
        out["test_ranks"]["id_only"] = np.asarray(ido["test"]).tolist()
        if "hybrid" in mr:  # the retrievers alone, same settings: what the item text adds
            out["hybrid_retriever_minus_id_only_test_ndcg@10"] = paired_bootstrap(ndcg_per_user(mr["hybrid"]),
                                                                                 ndcg_per_user(ido["test"]))
    if args.text_only:  # no item IDs at all: the item is its text (MISSRec's "no ID" setting)
        tx = variant_ranks(root, proj, source, extra, args.overrides, use_id=False, use_text=True)
        out["text_only"] = {"fit_s": tx["fit_s"], "test": metrics(tx["test"]), "valid": metrics(tx["valid"]),
                            **{k: tx[k] for k in ("epochs_run", "best_epoch") if k in tx}}
        out["test_ranks"]["text_only"] = np.asarray(tx["test"]).tolist()
    if not args.no_peer:
        peer = out["peer_sasrec_ce"] = run_peer(peer_name, peer_flags, work / "peer")
        if "test" in peer:
            pr = peer_ranks(work / "peer", peer_name, proj["users"], proj["targets"])
            peer["test_scored_here"] = metrics(pr)
            peer["test_by_user_half"] = by_half(proj["users"], pr)
            peer["same_user_target_pairs"] = True  # peer_ranks stops the run otherwise
            out["test_ranks"]["peer"] = pr.tolist()
            out["project_minus_peer_test_ndcg@10"] = paired_bootstrap(ndcg_per_user(proj["ranks"]), ndcg_per_user(pr))
            out["project_minus_peer_test_recall@10"] = paired_bootstrap(proj["ranks"] < 10, pr < 10)
    out["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out


def print_table(rows: List[Dict[str, Any]]) -> None:
    print(f"\n{'dataset':<20}{'model':<28}{'Recall@10':>10}{'NDCG@10':>10}{'vs peer':>9}")
    for r in rows:
        peer = (r.get("peer_sasrec_ce") or {}).get("test")
        lines = [(f"project: {r['main_model']}", r["project_test_scored_here"])]
        if "id_only" in r:
            lines.append(("id-only retriever", r["id_only"]["test"]))
        if "text_only" in r:
            lines.append(("text-only retriever", r["text_only"]["test"]))
        for b in ("ItemKNN", "MostPopular"):
            if b in r["jobs_evaluate"]:
                lines.append((b, r["jobs_evaluate"][b]["test"]))
        if peer:
            lines.append(("peer SASRec-CE", peer))
        if (r.get("peer_sasrec_ce") or {}).get("test_scored_here"):
            lines.append(("peer, scored here", r["peer_sasrec_ce"]["test_scored_here"]))
        for label, m in ((r.get("published") or {}).get("figures") or {}).items():
            lines.append((label[:27], m))
        for label, m in lines:
            ratio = f"{m['ndcg@10'] / peer['ndcg@10']:.2f}x" if peer else "-"
            print(f"{r['dataset']:<20}{label:<28}{m['recall@10']:>10.4f}{m['ndcg@10']:>10.4f}{ratio:>9}")
        if "hybrid_minus_id_only_test_ndcg@10" in r:
            d = r["hybrid_minus_id_only_test_ndcg@10"]
            print(f"{'':<20}project - id-only NDCG@10: {d['diff']:+.4f} (95% CI {d['ci95'][0]:+.4f} .. {d['ci95'][1]:+.4f})")
        if "hybrid_retriever_minus_id_only_test_ndcg@10" in r:
            d = r["hybrid_retriever_minus_id_only_test_ndcg@10"]
            print(f"{'':<20}hybrid retriever - id-only NDCG@10: {d['diff']:+.4f} (95% CI {d['ci95'][0]:+.4f} .. {d['ci95'][1]:+.4f})")
        if "project_minus_peer_test_ndcg@10" in r:
            d = r["project_minus_peer_test_ndcg@10"]
            print(f"{'':<20}project - peer NDCG@10: {d['diff']:+.4f} (BCa 95% CI {d['ci95'][0]:+.4f} .. {d['ci95'][1]:+.4f})")
        held = ranker_vs_channels(r["jobs_evaluate"])
        if held:
            print(f"{'':<20}held-out valid lists NDCG@10: {held}")
        print(f"{'':<20}pipeline {r['pipeline_wall_s'] / 60:.1f} min; fusion {r.get('fusion', {}) and r['fusion'].get('weights')}")


def ranker_vs_channels(models: Dict[str, Any]) -> str:
    """The ranker against the best model without it on the valid lists it did not train on."""
    held = {m: s[HOLDOUT]["ndcg@10"] for m, s in models.items() if HOLDOUT in s}
    ranked = {m: v for m, v in held.items() if "ranker" in m}
    others = {m: v for m, v in held.items() if "ranker" not in m}
    if not ranked or not others:
        return ""
    best = max(others, key=others.get)
    return ", ".join(f"{m} {v:.4f}" for m, v in ranked.items()) + f" vs best without a ranker ({best}) {others[best]:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-id-only", action="store_true")
    ap.add_argument("--text-only", action="store_true", help="also fit a retriever without item IDs (text only)")
    ap.add_argument("--tag", default="", help="results/quality_<dataset>-<tag>.json: a run on other data of the "
                    "same kind ($SHARED_DATA pointing elsewhere) does not replace the shared datasets' figures")
    ap.add_argument("overrides", nargs="*", help="extra key=value settings for the contract command")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        for name in args.datasets.split(","):
            r = bench(name, args, Path(tmp))
            if not r:
                continue
            rows.append(r)
            if args.tag:
                r["tag"], r["data_dir"] = args.tag, str(SHARED / DATASETS[name][1])
            path = ROOT / "results" / f"quality_{name}{'-' + args.tag if args.tag else ''}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(r, indent=1, default=str))
            print(f"wrote {path}", flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
