"""Cost curve: each offline stage's time and peak memory on the synthetic shop at 10^5, 10^6 and
10^7 events (users and items grow with it: events/30 users, events/60 items), and the fitted
log-log slope of each against events.

    python -m benchmarks.cost_curve [--events 100000 1000000 10000000] [--eval-users 2000] [--steps 30]

Every stage runs in a fresh subprocess (its peak memory is its own: the proportional set size of
the process tree, Ray's processes included, sampled every 0.5 s) and calls the project's own code:
  preprocess  jobs.preprocess on Ray Data (2 CPUs), from synthetic shards written beforehand;
  embed       jobs.embed_items: the default LLM text encoder over the whole catalog, Ray Data actor
              pool (2 actors, one thread each); Ray's start-up is timed apart;
  train       the retriever's training step at a fixed token budget (``--steps`` steps of 32 windows,
              the preset's ``auto`` loss: a full softmax over the catalog up to 200k items), one
              process with 2 torch threads. The pipeline runs the same model and loss under
              DeepSpeed on Ray Train workers; what grows with the data here is the catalog the
              softmax spans and the histories loaded;
  evaluate    the fusion fit (co-visitation and text channels over all training histories, weights
              fitted on the bounded ``fit_rows`` sample of valid users), then full-ranking of a fixed
              sample of ``--eval-users`` test users over the whole catalog for the fused model, the
              retriever, MostPopular and ItemKNN, and a paired BCa bootstrap of two of them. At a
              fixed user sample the ranking grows with the catalog; ranking every user grows with
              users x items, which is why a large deployment evaluates on a user sample.
Serving p99 by catalog size comes from ``benchmarks.catalog_scale`` (results/catalog_scale.json);
the tables script puts both side by side. Writes ``results/cost_curve.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from benchmarks.preprocess_throughput import _overrides, generate, run_with_peak_pss

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("preprocess", "embed", "train", "evaluate")
DATASET = ("synthetic", "bench")  # name and version the preprocess overrides give
TEXT_RUN = "cost"  # indexes/<TEXT_RUN>/: the embed stage's output, read by train and evaluate


def shards_for(events: int) -> int:
    return max(8, min(40, events // 250_000))


# -- the stages (each in its own process) ------------------------------------------------------------
def stage_preprocess(ov: List[str], args: Dict[str, Any]) -> Dict[str, Any]:
    from benchmarks.preprocess_throughput import run_one

    r = run_one("ray", 2, ov)
    return {"wall_s": r["wall_s"], "startup_s": r["startup_s"], "interactions": r["interactions"],
            "users": r["users"], "items": r["items"], "events_per_s": r["events_per_s"]}


def stage_embed(ov: List[str], args: Dict[str, Any]) -> Dict[str, Any]:
    import ray

    from components.config import load_config
    from jobs import embed_items

    cfg = load_config(ov + ["train.dataset_version=bench", f"embed.run_id={TEXT_RUN}", "ray.num_cpus=2"])
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = embed_items.main(cfg)
    wall = time.perf_counter() - t1
    ray.shutdown()
    return {"wall_s": round(wall, 2), "startup_s": round(startup, 2), "items": out["rows"],
            "items_per_s": round(out["rows"] / wall, 1)}


def _data(ov: List[str]):
    from components import layout
    from components.config import load_config
    from components.data.datasets import load_training_data
    from components.storage import Storage

    cfg = load_config(ov)
    storage = Storage.from_config(cfg.storage)
    t0 = time.perf_counter()
    data = load_training_data(storage, layout.dataset(*DATASET), layout.index(TEXT_RUN))
    return cfg, data, round(time.perf_counter() - t0, 2)


def stage_train(ov: List[str], args: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from components.config import to_dict
    from components.models.retriever import RetrieverConfig
    from components.training import retriever as loop
    from components.training.stepper import LocalStepper

    torch.set_num_threads(2)
    cfg, data, load_s = _data(ov)
    t0 = time.perf_counter()
    model = loop.new_retriever(data.histories, data.text, RetrieverConfig(**to_dict(cfg.retriever)), 0)
    x = loop.retriever_inputs(data.histories, data.text, model.cfg)
    setup_s = time.perf_counter() - t0
    stepper = LocalStepper(model, lr=1e-3, weight_decay=0.0)
    stepper.train()
    rng = np.random.default_rng(0)
    times, tokens = [], 0
    warm = 3
    for k, batch in enumerate(loop.batches(x.windows, 32, rng)):
        if k == args["steps"] + warm:
            break
        t = time.perf_counter()
        loss = stepper(batch, x.text_emb, x.log_q)
        stepper.step(loss)
        if k >= warm:
            times.append(time.perf_counter() - t)
            tokens += int((batch["targets"] > 0).sum())
    step_s = float(np.sum(times))
    return {"wall_s": round(step_s, 2), "load_s": load_s, "setup_s": round(setup_s, 2), "steps": len(times),
            "ms_per_step": round(1000 * float(np.median(times)), 1), "tokens": tokens,
            "tokens_per_s": round(tokens / step_s, 1), "loss": model.cfg.loss, "items": data.histories.num_items}


def _sample(h, split: str, n: int):
    """``h`` with ``split``'s targets kept for the ``fit_rows`` sample of ``n`` users (hash-chosen)."""
    from dataclasses import replace

    from components.evaluation.ranking import fit_rows

    tgt = getattr(h, split)
    rows = fit_rows(tgt["user_idx"], 1, cells=n)
    kept = {k: (np.asarray(v)[rows] if not isinstance(v, list) else [v[r] for r in rows]) for k, v in tgt.items()}
    return replace(h, **{split: kept})


def stage_evaluate(ov: List[str], args: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from benchmarks.quality import ndcg_per_user, paired_bootstrap
    from components.config import to_dict
    from components.evaluation.ranking import baseline_rankings, final_ranking, fit_channels
    from components.models.retriever import RetrieverConfig
    from components.training import retriever as loop

    torch.set_num_threads(2)
    cfg, data, load_s = _data(ov)
    h = data.histories
    # A fresh retriever: ranking costs the same whatever its weights.
    model = loop.new_retriever(h, data.text, RetrieverConfig(**to_dict(cfg.retriever)), 0).eval()
    t0 = time.perf_counter()
    channels, _ = fit_channels(model, data.text, h)
    fit_s = time.perf_counter() - t0
    hs = _sample(h, "test", args["eval_users"])
    t1 = time.perf_counter()
    fused = final_ranking(model, None, data.text, hs, "test", data.categories, channels=channels)
    alone = final_ranking(model, None, data.text, hs, "test", data.categories)
    rank_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    base = baseline_rankings(hs, "test")
    base_s = time.perf_counter() - t2
    t3 = time.perf_counter()
    paired_bootstrap(ndcg_per_user(fused[0]), ndcg_per_user(base["ItemKNN"][0]))
    boot_s = time.perf_counter() - t3
    return {"wall_s": round(time.perf_counter() - t0, 2), "load_s": load_s, "fit_s": round(fit_s, 2),
            "rank_s": round(rank_s, 2), "baselines_s": round(base_s, 2), "bootstrap_s": round(boot_s, 2),
            "users_ranked": int(len(fused[0])), "items": h.num_items,
            "ms_per_user_per_model": round(1000 * rank_s / max(len(fused[0]), 1) / 2, 2),
            "retriever_users_ranked": int(len(alone[0]))}


CHILD = {"preprocess": stage_preprocess, "embed": stage_embed, "train": stage_train, "evaluate": stage_evaluate}


# -- the driver --------------------------------------------------------------------------------------
def measured(stage: str, ov: List[str], args: Dict[str, Any]) -> Dict[str, Any]:
    """Run one stage in a fresh process; its result plus the peak PSS of its process tree."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "LLMREC_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "benchmarks.cost_curve", "--child", stage, json.dumps(args), "--", *ov]
    t0 = time.perf_counter()
    out, peak = run_with_peak_pss(cmd, env, f"stage {stage}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_pss_gb"] = round(peak / 1e9, 2)
    result["process_s"] = round(time.perf_counter() - t0, 1)
    return result


def slope(xs: List[float], ys: List[float]) -> float:
    """Least-squares slope of log y on log x (1: linear growth)."""
    if len(xs) < 2 or min(ys) <= 0:
        return float("nan")
    return round(float(np.polyfit(np.log10(xs), np.log10(ys), 1)[0]), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--eval-users", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--out", default=str(ROOT / "results" / "cost_curve.json"))
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "ARGS"), help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILD[args.child[0]](args.overrides, json.loads(args.child[1]))))
        return
    knobs = {"eval_users": args.eval_users, "steps": args.steps}
    rows = []
    for n in args.events:
        with tempfile.TemporaryDirectory(prefix="bench-cost-") as root:
            shards = shards_for(n)
            gen_s = generate(root, n, shards)
            ov = _overrides(root, n, shards)
            row: Dict[str, Any] = {"events": n, "generate_s": round(gen_s, 1)}
            print(f"\n{n:,} events ({shards} shards, generated in {gen_s:.1f}s)", flush=True)
            for stage in args.stages:
                r = measured(stage, ov, knobs)
                row[stage] = r
                print(f"  {stage:<10} {r['wall_s']:>8.1f}s  peak PSS {r['peak_pss_gb']:.2f} GB  "
                      + "  ".join(f"{k}={v}" for k, v in r.items() if k not in ("wall_s", "peak_pss_gb")),
                      flush=True)
            rows.append(row)
    events = [r["events"] for r in rows]
    slopes = {stage: {"time": slope(events, [r[stage]["wall_s"] for r in rows]),
                      "memory": slope(events, [r[stage]["peak_pss_gb"] for r in rows])}
              for stage in args.stages}
    print("\nlog-log slope against events (1 = linear):", json.dumps(slopes), flush=True)
    result = {"benchmark": "cost_curve", "machine": f"{platform.node()} {os.cpu_count()} cpus",
              "python": platform.python_version(), "knobs": knobs, "rows": rows, "slopes": slopes,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
