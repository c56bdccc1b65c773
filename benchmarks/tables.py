"""The figure tables of README.md and docs/*.md, generated from results/*.json.

    python -m benchmarks.tables            # rewrite every table block from results/
    python -m benchmarks.tables --check    # rewrite nothing; exit 1 naming the blocks that are stale

A block in a markdown file is::

    <!-- table:NAME -->
    (whatever is there: replaced)
    <!-- /table:NAME -->

and NAME is a key of ``RENDERERS``: a function of the results folder that returns the markdown
table. Benchmarks write the JSON; nobody types a figure into a table, so every number in one
traces to a file in results/ and none goes stale unseen. Standard library only: it runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def load(results: Path, name: str) -> Dict[str, Any]:
    """``results/<name>.json`` as a dict."""
    return json.loads((Path(results) / f"{name}.json").read_text())


def markdown_table(header: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> str:
    """A markdown table; ``align`` has one letter per column: ``l`` left, ``r`` right."""
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


def _signed(x: float, digits: int = 4) -> str:
    return f"{'+' if x >= 0 else '−'}{abs(x):.{digits}f}"  # a real minus sign, as in the prose


def _pair(metrics: Dict[str, float]) -> str:
    return f"{metrics['recall@10']:.4f} / {metrics['ndcg@10']:.4f}"


def _interval(boot: Dict[str, Any] | None) -> str:
    if not boot:
        return "—"
    lo, hi = boot["ci95"]
    return f"{_signed(boot['diff'])} [{_signed(lo)}, {_signed(hi)}]"


# ---- quality (benchmarks/quality.py) ----------------------------------------------------------

QUALITY_LABELS = {"ml-latest-small": "ml-latest-small", "amazon-gift-cards": "Amazon Gift Cards 2018, 5-core",
                  "ml-latest-small-pre2008": "ml-latest-small, ratings before 2008"}


def _quality_rows(r: Dict[str, Any]) -> List[str]:
    ev = r["jobs_evaluate"]
    peer, fusion = r["peer_sasrec_ce"], r["fusion"]
    holdout = ev[r["main_model"]]["valid_ranker_holdout"]
    without = max(ev[m]["valid_ranker_holdout"]["ndcg@10"] for m in ("hybrid", "hybrid+channels"))
    w = fusion["weights"]
    return [
        f"**{_pair(r['project_test_scored_here'])}**",
        _pair(ev["hybrid+channels"]["test"]),
        _pair(ev["hybrid"]["test"]),
        _pair(r["id_only"]["test"]) if "id_only" in r else "— (not run)",
        f"{_pair(peer['test'])} (fit {peer['fit_s']:.0f} s)",
        _interval(r.get("project_minus_peer_test_ndcg@10")),
        _pair(ev["ItemKNN"]["test"]),
        _pair(ev["MostPopular"]["test"]),
        _interval(r.get("hybrid_minus_id_only_test_ndcg@10")),
        _interval(r.get("hybrid_retriever_minus_id_only_test_ndcg@10")),
        f"{holdout['ndcg@10']:.4f} / {without:.4f} ({holdout['n']} users)",
        _interval((r.get("shipped_minus_test_ndcg@10") or {}).get(r["main_model"].replace("+ranker", ""))),
        _halves(r),
        f"{r['pipeline_wall_s'] / 60:.1f} min",
        f"{w['retriever']:g} / {w['covisit']:g} / {w['text']:g} / {w['popularity']:g}, {fusion['decay']:.1f}",
    ]


def _halves(r: Dict[str, Any]) -> str:
    """Test NDCG@10 of the shipped model / the peer on each half of the users (a preset chosen on
    one half's valid leaves the other half's test untouched)."""
    mine, peer = r.get("project_test_by_user_half") or {}, (r.get("peer_sasrec_ce") or {}).get("test_by_user_half") or {}
    if not mine or not peer:
        return "—"
    return "; ".join(f"{h.replace('half', 'half ')}: {mine[h]['ndcg@10']:.4f} / {peer[h]['ndcg@10']:.4f} ({mine[h]['n']})"
                     for h in sorted(mine))


QUALITY_ROW_NAMES = [
    "**hybrid+channels+ranker** (shipped, contract command)",
    "hybrid+channels (fusion, no ranker)",
    "hybrid retriever alone",
    "ID-only retriever (in-process, same settings)",
    "peer SASRec-CE (outside program)",
    "shipped − peer, NDCG@10, paired BCa 95% (peer's predictions scored here)",
    "ItemKNN",
    "MostPopular",
    "shipped − ID-only, NDCG@10, paired bootstrap 95%",
    "hybrid retriever − ID-only retriever (what the LLM text adds), NDCG@10, BCa 95%",
    "valid lists the ranker did not train on but chose its epoch on (so at least the fusion by construction), NDCG@10: shipped / best without a ranker",
    "shipped − fused (the ranker's gain on test), NDCG@10, BCa 95%",
    "test NDCG@10 by user half, shipped / peer (users)",
    "contract command wall time",
    "fitted fusion (retriever / co-visit / text / popularity, decay)",
]


def quality(results: Path, datasets: Sequence[str]) -> str:
    """Test Recall@10 / NDCG@10 of every model, one column per ``results/quality_<dataset>.json``."""
    runs = [load(results, f"quality_{d}") for d in datasets]
    header = ["test, Recall@10 / NDCG@10"] + [
        f"{QUALITY_LABELS.get(d, d)} ({r['project_test_scored_here']['n']} test users)" for d, r in zip(datasets, runs)]
    columns = [_quality_rows(r) for r in runs]
    rows = [[name, *(col[i] for col in columns)] for i, name in enumerate(QUALITY_ROW_NAMES)]
    return markdown_table(header, "l" + "r" * len(runs), rows)


# ---- published benchmarks (benchmarks/quality.py on the papers' splits) ----------------------

PUBLISHED_LABELS = {"amazon-scientific": "Amazon Scientific (UniSRec split)",
                    "amazon-beauty": "Amazon Beauty (S3-Rec file)"}


def _stages(stage_s: Dict[str, float] | None) -> str:
    if not stage_s:
        return "—"
    names = ("preprocess_s", "embed_s", "train_s", "evaluate_s")
    return " / ".join(f"{stage_s[k] / 60:.1f}" for k in names if k in stage_s) + f" (total {stage_s['total_s'] / 60:.1f})"


def _published_rows(r: Dict[str, Any]) -> List[str]:
    ev, peer = r["jobs_evaluate"], r.get("peer_sasrec_ce") or {}
    main, fused = r["main_model"], r["main_model"].replace("+ranker", "")
    gains = r.get("shipped_minus_test_ndcg@10") or {}
    figures = (r.get("published") or {}).get("figures") or {}
    best = max(figures.values(), key=lambda m: m["ndcg@10"]) if figures else None
    return [
        f"**{_pair(r['project_test_scored_here'])}**",
        f"{_pair(peer['test_scored_here'])} (fit {peer['fit_s']:.0f} s)" if "test_scored_here" in peer else "—",
        _interval(r.get("project_minus_peer_test_ndcg@10")),
        "<br>".join(f"{name}: {_pair(m)}" for name, m in figures.items()) or "—",
        f"{best['ndcg@10'] * 1.05:.4f}" if best else "—",
        _pair(ev[fused]["test"]) if fused in ev and fused != main else "—",
        _interval(gains.get(fused)) if fused != main else "—",
        _pair(ev["hybrid"]["test"]) if "hybrid" in ev else "—",
        _interval(gains.get("hybrid")),
        _pair(r["id_only"]["test"]) if "id_only" in r else "—",
        _interval(r.get("hybrid_minus_id_only_test_ndcg@10")),
        _interval(r.get("hybrid_retriever_minus_id_only_test_ndcg@10")),
        _pair(r["text_only"]["test"]) if "text_only" in r else "— (not run)",
        _pair(ev["ItemKNN"]["test"]) if "ItemKNN" in ev else "—",
        _stages(r.get("stage_s")),
        f"{peer['wall_s'] / 60:.1f} min" if "wall_s" in peer else "—",
        (r.get("published") or {}).get("protocol", "—"),
    ]


PUBLISHED_ROW_NAMES = [
    "**shipped** (contract command, scored here)",
    "peer SASRec-CE, its predictions scored here",
    "shipped − peer, NDCG@10, paired BCa 95%",
    "published, Recall@10 / NDCG@10",
    "target NDCG@10 (best published + 5%)",
    "fused channels without the ranker",
    "shipped − fused (the ranker's gain on test), NDCG@10, BCa 95%",
    "hybrid retriever alone (ID + LLM text)",
    "shipped − hybrid retriever alone, NDCG@10, BCa 95%",
    "ID-only retriever (in-process, same settings)",
    "shipped − ID-only, NDCG@10, BCa 95%",
    "hybrid retriever − ID-only retriever (what the LLM text adds), NDCG@10, BCa 95%",
    "text-only retriever (no item IDs; in-process, same settings)",
    "ItemKNN (jobs.evaluate)",
    "contract command minutes: preprocess / embed / train / evaluate",
    "peer wall time",
    "protocol",
]


def published(results: Path, datasets: Sequence[str]) -> str:
    """The project and its peer beside the published figures, one column per dataset."""
    runs = [(d, load(results, f"quality_{d}")) for d in datasets if (Path(results) / f"quality_{d}.json").is_file()]
    if not runs:
        return "(no results yet: run `python -m benchmarks.quality --datasets " + ",".join(datasets) + "`)"
    header = ["test, Recall@10 / NDCG@10"] + [
        f"{PUBLISHED_LABELS.get(d, d)} ({r['project_test_scored_here']['n']:,} test users)" for d, r in runs]
    columns = [_published_rows(r) for _d, r in runs]
    rows = [[name, *(col[i] for col in columns)] for i, name in enumerate(PUBLISHED_ROW_NAMES)]
    return markdown_table(header, "l" + "r" * len(runs), rows)


# ---- preprocessing throughput (benchmarks/preprocess_throughput.py) ---------------------------

def preprocess(results: Path) -> str:
    """Events/s, wall time and peak PSS of each engine and CPU count, per input size."""
    rows = []
    for row in load(results, "preprocess_throughput")["rows"]:
        if row["engine"] == "local":
            variant, ratio = "single-process pyarrow", 1.0
        else:
            variant = f"Ray Data, {row['cpus']} CPU{'s' if row['cpus'] > 1 else ''}"
            ratio = row["ratio_vs_single_process"]
        rows.append([f"10^{round(math.log10(row['events']))}", variant, f"{row['events_per_s']:,}",
                     f"{row['wall_s']:.1f} s", f"{row['peak_pss_gb']:.2f} GB", f"{ratio:.2f}x"])
    return markdown_table(["events", "variant", "events/s", "wall", "peak PSS", "vs single process"],
                          "rlrrrr", rows)


# ---- serving (benchmarks/serving.py) ----------------------------------------------------------

SHIPPED = "fused+throughput+haproxy"
SERVING_LABELS = [  # variant key in the JSON -> row label, in the order the table shows them
    ("bare uvicorn", "bare uvicorn, no Ray"),
    ("graph", "Serve graph, Serve defaults"),
    ("fused", "Serve fused, Serve defaults"),
    ("fused+throughput", "fused + `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`"),
    (SHIPPED, "fused + throughput-optimized + HAProxy (shipped)"),
    ("graph+throughput+haproxy", "graph + throughput-optimized + HAProxy"),
    ("fused+throughput+haproxy+2shards", "shipped + `live_state_shards: 2`"),
    ("fused+throughput+haproxy+2ingress", "shipped + two ingress replicas from the start"),
]


def _serving_row(label: str, v: Dict[str, Any]) -> List[str]:
    s = v["serve"]
    return [label, f"{s['c1']['p50_ms']:.1f} / {s['c1']['p99_ms']:.1f}",
             f"{s['c8']['p50_ms']:.1f} / {s['c8']['p99_ms']:.1f}", f"{s['c8']['throughput_rps']:.0f}",
             f"{s['c32']['p99_ms']:.0f}", f"{s['c32']['throughput_rps']:.0f}",
             f"{v['event_to_effect']['effect_p99_ms']:.1f}"]


def serving(results: Path, name: str = "serving_ml-latest-small") -> str:
    """Latency, throughput and event -> effect of every serving variant measured in one run."""
    r = load(results, name)
    floor = r["in_process_floor"]
    rows = [["in-process floor (sequential)", f"{floor['p50_ms']:.1f} / {floor['p99_ms']:.1f}", "",
             f"{floor['throughput_rps']:.0f} (c=1)", "", "", ""]]
    for key, label in SERVING_LABELS:
        if key not in r["variants"]:
            continue
        row = _serving_row(label, r["variants"][key])
        rows.append([f"**{c}**" for c in row] if key == SHIPPED else row)
    header = ["path", "c=1 p50 / p99 ms", "c=8 p50 / p99 ms", "c=8 req/s", "c=32 p99 ms", "c=32 req/s",
              "event -> effect p99 ms"]
    return markdown_table(header, "lrrrrrr", rows)


# ---- feedback retraining (benchmarks/retrain.py) ----------------------------------------------

def _from_summary(lines: Sequence[str], pattern: str) -> Tuple[str, ...]:
    """The groups of ``pattern`` in the retrain pass's own summary lines (kept in the JSON)."""
    for line in lines:
        m = re.search(pattern, line)
        if m:
            return m.groups()
    raise KeyError(f"retrain_summary has no line matching {pattern!r}")


def retrain(results: Path) -> str:
    """One feedback retraining pass under load: times, failed requests, parent -> retrained metrics."""
    r = load(results, "retrain_ml-latest-small")
    t, lines = r["retrain_timings"], r["retrain_summary"]
    valid = _from_summary(lines, r"valid NDCG@10 ([\d.]+) -> ([\d.]+)")
    test = _from_summary(lines, r"test NDCG@10 ([\d.]+) -> ([\d.]+), Recall@10 ([\d.]+) -> ([\d.]+)")
    pop, knn = _from_summary(lines, r"MostPopular ([\d.]+), ItemKNN ([\d.]+)")
    recall, users = _from_summary(lines, r"holdout Recall@10 ([\d.]+) \(n=(\d+)\)")
    rows = [
        [f"retrain wall time (preprocess {t['preprocess_s']:.0f} s, embed {t['embed_s']:.0f} s, retriever + ranker "
         f"warm start {t['train_s']:.0f} s, evaluate {t['evaluate_s']:.0f} s)", f"{r['retrain_wall_s']:.0f} s"],
        ["event posted -> in a dataset version (pass started at once; a cron adds up to its period)",
         f"{r['event_to_dataset_version_s']:.1f} s"],
        ["promotion -> every deployment serving the new version (`watch_interval_s: 2`)",
         f"{r['promotion_to_all_replicas_s']:.2f} s"],
        ["failed requests while retraining and swapping", f"{r['failed_requests']:,} of {r['requests_during']:,}"],
        ["valid NDCG@10 on the new split, parent -> retrained (in-sample for the ranker: see "
         "[evaluation](evaluation.md))", f"{valid[0]} -> {valid[1]}"],
        ["test NDCG@10 / Recall@10 on the new split, parent -> retrained",
         f"{test[0]} -> {test[1]} / {test[2]} -> {test[3]}"],
        ["the same split's baselines, test NDCG@10", f"MostPopular {pop}, ItemKNN {knn}"],
        [f"newest-feedback holdout Recall@10 ({users} users)", f"{float(recall):.3f}"],
    ]
    return markdown_table(["measure", "value"], "lr", rows)


# ---- reliability (benchmarks/reliability.py, tests/integration/test_faults.py) -----------------

def faults(results: Path) -> str:
    """What the clients saw during each injected fault, and what storage held afterwards."""
    f = load(results, "reliability")["faults"]
    s3, kill = f["s3_outage"], f["replica_kills"]
    ev, rec = s3["event_requests"], s3["recommend"]
    failures = ", ".join(f"{k} x {v}" for k, v in kill["failures"].items()) or "none"
    rows = [
        [f"S3 unreachable for {s3['outage_s']:.0f} s (listener and every open connection cut)",
         f"events: {ev.get('202', 0)} x 202, {ev.get('503', 0)} x 503 (all with `Retry-After: 1`, slowest "
         f"{s3['slowest_503_s']:.1f} s); the {s3['answered_while_down']} answered while S3 was down were all 503; "
         f"recommend: {rec.get('200', 0)} x 200, {sum(v for k, v in rec.items() if k != '200')} failed "
         "(live state is in memory)",
         f"{s3['acknowledged']} events acknowledged, {s3['stored_copies']} stored copies; each counted once in the "
         "feedback log and in live state"],
        ["the ingress replica (models, fused) killed, 8 s later the live-state holder killed",
         f"events: {kill['acknowledged']} acknowledged, {kill['failed_event_attempts']} failed attempt(s); "
         f"recommend: {kill['recommend_ok']} ok, {kill['recommend_failed']} failed (failures: {failures}); "
         "requests to the holder wait for its replacement (events again "
         f"{kill['events_again_after_holder_kill_s']:.0f} s after the kill: a new actor plus the rebuild from S3 "
         "on 2 busy cores)",
         "stored events = acknowledged events; each of 20 users' live history equals their acknowledged events "
         "(rebuilt from the feedback log, retries counted once)"],
    ]
    return markdown_table(["fault", "what the clients saw", "after"], "lll", rows)


def reliability_load(results: Path) -> str:
    """The sustained-load run: throughput, latency, errors per minute, autoscaling, lost events."""
    run = load(results, "reliability")["load"]
    rec, ev = run["recommend"], run["event"]
    ingress = [p["Ingress"] for p in run["replicas"]]
    scaled = next((p["t_s"] for p in run["replicas"] if p["Ingress"] > ingress[0]), None)
    others = {k: max(p[k] for p in run["replicas"]) for k in run["replicas"][0] if k not in ("t_s", "Ingress")}
    rows = [
        ["concurrency, duration", f"{run['concurrency']}, {run['seconds'] / 60:.0f} min"],
        ["recommendations/s (p50 / p95 / p99 ms)",
         f"{rec['throughput_rps']:.1f} ({rec['p50_ms']:.0f} / {rec['p95_ms']:.0f} / {rec['p99_ms']:.0f})"],
        ["events/s (p99 ms)", f"{ev['throughput_rps']:.1f} ({ev['p99_ms']:.0f})"],
        ["errors in each minute", ", ".join(str(m["errors"]) for m in run["per_minute"])],
        ["ingress replicas (Serve autoscaling)",
         f"{ingress[0]} -> {max(ingress)}" + (f" (first seen at {scaled:.0f} s)" if scaled is not None else "")],
        ["other deployments, most replicas", ", ".join(f"{k} {v}" for k, v in others.items())],
        ["events acknowledged / lost", f"{run['events_acknowledged']:,} / {run['acknowledged_events_lost']}"],
    ]
    return markdown_table(["measure", "value"], "lr", rows)


# ---- LLM bundle part size (benchmarks/bundle_size.py) ----------------------------------------

def bundle_size(results: Path) -> str:
    rows = load(results, "bundle_size")["rows"]
    return markdown_table(
        ["`llm/` part", "LoRA rank", "dtype", "parameters", "tensors saved", "weights file", "whole part (+ hf/)"],
        "lllrrrr",
        [[r["model"], r["lora_r"] or "— (full)", r["dtype"], f"{r['parameters'] / 1e6:.1f} M",
          f"{r['saved_tensors'] / 1e6:.2f} M", f"{r['weights_bytes'] / 2**20:,.1f} MiB",
          f"{r['part_bytes'] / 2**20:,.1f} MiB"] for r in rows])


def catalog_scale(results: Path) -> str:
    """One row per catalog size and Serve precision (results/catalog_scale.json)."""
    rows = []
    for size in load(results, "catalog_scale")["sizes"]:
        for r in [size, *size.get("other_precisions", {}).values()]:
            rows.append([f"{size['items']:,}", r.get("precision", "fp32"), f"{r['exact_p50_ms']:.1f} / {r['exact_p99_ms']:.1f}",
                         f"{r['ann_p50_ms']:.1f} / {r['ann_p99_ms']:.1f}",
                         f"{r['recall@100_of_exact']:.4f} ({r['recall@100_min']:.2f})", f"{r['pool_items_mean']:,.0f}",
                         f"{r['ivf_lists']:,} / {r['ivf_nprobe']}", f"{r['ann_build_s']:.1f}",
                         f"{r['replica_load_shipped_index_s']:.1f}" if "replica_load_shipped_index_s" in r else "—",
                         f"{r['replica_rss_mb'] / 1024:.1f} GB"
                         + (f" ({r['replica_load_peak_mb'] / 1024:.1f})" if "replica_load_peak_mb" in r else ""),
                         f"{r['upsert_ms_mean']:.1f} / {r['upsert_ms_max']:.0f}" if "upsert_ms_mean" in r else "—",
                         f"{r['cold_start_p50_ms']:.2f}" if "cold_start_p50_ms" in r else "—"])
    return markdown_table(
        ["catalog items", "precision", "exact p50 / p99 ms", "ANN pool p50 / p99 ms", "pool recall@100 of exact (min)",
         "pool items", "IVF lists / probed", "index build s", "load with shipped index s",
         "replica memory (load peak)", "item upsert ms, mean / max", "anonymous request ms"],
        "rlrrrrrrrrrr", rows)


def cost_curve(results: Path) -> str:
    """Each offline stage's time and peak memory per data size, then the fitted log-log slopes
    (results/cost_curve.json)."""
    data = load(results, "cost_curve")
    stages = list(data["slopes"])
    detail = {"preprocess": lambda r: f"{r['events_per_s']:,.0f} events/s",
              "embed": lambda r: f"{r['items_per_s']:.1f} items/s",
              "train": lambda r: f"{r['ms_per_step']:.0f} ms/step, {r['loss']}",
              "evaluate": lambda r: f"fit {r['fit_s']:.0f} s, rank {r['ms_per_user_per_model']:.2f} ms/user/model"}
    rows = []
    for r in data["rows"]:
        first = r[stages[0]]
        size = f"{r['events']:,} ({first.get('users', 0):,} users, {first.get('items', 0):,} items)"
        for st in stages:
            x = r[st]
            rows.append([size, st, f"{x['wall_s']:.1f}", f"{x['peak_pss_gb']:.2f}", detail.get(st, lambda _: "")(x)])
    sizes = " → ".join(f"{r['events']:,}" for r in data["rows"])
    for st in stages:
        rows.append([f"slope over {sizes}", st, f"{data['slopes'][st]['time']:.2f}",
                     f"{data['slopes'][st]['memory']:.2f}", ""])
    return markdown_table(["events", "stage", "wall s", "peak PSS GB", "rate"], "llrrl", rows)


def embed_precision(results: Path) -> str:
    """The catalog embedding pass at fp32 and bf16 (results/embed_precision.json): speed on
    synthetic texts and each catalog, how far the vectors move, the retriever's valid figures."""
    data = load(results, "embed_precision")
    syn = data["synthetic"]
    threads = sorted({int(k.split("_")[-2]) for k in syn if k.endswith("_threads")})
    rows = [[f"synthetic ({syn['texts']:,} texts)", f"{t} thread{'s' if t > 1 else ''}",
             f"{syn[f'fp32_items_per_s_{t}_threads']:.0f}", f"{syn[f'bf16_items_per_s_{t}_threads']:.0f}",
             f"{syn[f'bf16_items_per_s_{t}_threads'] / syn[f'fp32_items_per_s_{t}_threads']:.2f}x",
             f"{syn['cosine_mean']:.5f} (min {syn['cosine_min']:.5f})", "—", "—", "—"] for t in threads]
    for d in data["datasets"]:
        valid = (lambda p: f"{d[f'{p}_valid']['ndcg@10']:.4f} / {d[f'{p}_valid']['recall@10']:.4f}"
                 if f"{p}_valid" in d else "—")
        rows.append([f"{d['dataset']} ({d['items']:,} items)", "all", f"{d['fp32_items_per_s']:.0f}",
                     f"{d['bf16_items_per_s']:.0f}", f"{d['bf16_items_per_s'] / d['fp32_items_per_s']:.2f}x",
                     f"{d['cosine_mean']:.5f} (min {d['cosine_min']:.5f})", f"{d['top10_neighbour_overlap']:.3f}",
                     valid("fp32"), valid("bf16")])
    return markdown_table(["texts", "torch threads", "fp32 items/s", "bf16 items/s", "bf16 / fp32", "cosine bf16 to fp32",
                           "top-10 text neighbours shared", "valid NDCG@10 / Recall@10, fp32", "same, bf16"],
                          "llrrrrrrr", rows)


# ---- retriever training layout (benchmarks/train_layout.py) ---------------------------------

def train_layout(results: Path) -> str:
    data = load(results, "train_layout")
    rows = []
    for name, d in data["datasets"].items():
        for r in d["layouts"]:
            rows.append([name, f"{r['workers']} x {r['threads_each']}", r["batch_each"], f"{r['ms_per_step']:.0f}",
                         f"{r['windows_per_s']:.0f}", f"{r['cores_busy_per_worker']:.2f} ({r['cores_busy']:.2f})"])
    return markdown_table(["data", "workers x threads", "batch each", "ms a step", "windows/s",
                           "cores busy per worker (all)"], "llrrrr", rows)


def precision(results: Path) -> str:
    """Serve precision settings side by side (results/precision.json): quality per dataset,
    memory, then serving speed on the served dataset and the text encoder's int8 figures."""
    data = load(results, "precision")
    rows = []
    for name, d in data["datasets"].items():
        for setting, r in d["settings"].items():
            rep = r.get("replica", {})
            diff = (lambda split: _interval(r.get(f"minus_fp32_{split}_ndcg@10")) if setting != "fp32" else "—")
            rows.append([name, setting, f"{r['valid']['ndcg@10']:.4f}", diff("valid"), _pair(r["test"]), diff("test"),
                         f"{r['test_ranks_equal_to_fp32']:.2f}" if "test_ranks_equal_to_fp32" in r else "—",
                         f"{rep.get('text_table_mb', float('nan')):.1f}", f"{rep.get('rss_growth_mb', float('nan')):.0f}",
                         f"{d['bundle_mb']:.1f}"])
    out = markdown_table(["data", "precision", "valid NDCG@10", "valid − fp32, BCa 95%", "test Recall@10 / NDCG@10",
                          "test − fp32, BCa 95%", "test users whose target rank is unchanged", "text table MB",
                          "replica RSS growth MB", "bundle MB"], "llrrrrrrrr", rows)
    speed = []
    for name, d in data["datasets"].items():
        for v, r in d.get("serving", {}).get("variants", {}).items():
            v = f"{v} (fp32, the default then)" if v == SHIPPED else v  # runs before fp16 became the default
            speed.append([name, v, f"{r['c1']['p99_ms']:.1f}", f"{r['c8']['throughput_rps']:.0f}", f"{r['c8']['p99_ms']:.0f}",
                          f"{r['c32']['throughput_rps']:.0f}", f"{r['ingress_cpu_ms_per_request']:.2f}"
                          if r.get("ingress_cpu_ms_per_request") is not None else "—",
                          str(sum(r[f"c{c}"]["errors"] for c in (1, 8, 32)))])
    if speed:
        out += "\n\n" + markdown_table(["data", "Serve path", "c1 p99 ms", "c8 req/s", "c8 p99 ms", "c32 req/s",
                                         "ingress CPU ms a request", "errors"], "llrrrrrr", speed)
    enc = [[name, str(e["items"]), f"{e['fp32_items_per_s']:.0f}", f"{e.get('int8_items_per_s', float('nan')):.0f}",
            f"{e['int8_cosine_to_fp32']['mean']:.3f} (min {e['int8_cosine_to_fp32']['min']:.3f})"
            if "int8_cosine_to_fp32" in e else e.get("int8_error", "—"),
            f"{e['int8_top10_neighbours_shared']:.2f}" if "int8_top10_neighbours_shared" in e else "—"]
           for name, d in data["datasets"].items() if (e := d.get("text_encoder"))]
    if enc:
        out += "\n\n" + markdown_table(["data", "items embedded", "fp32 items/s", "int8 items/s",
                                         "int8 cosine to fp32", "top-10 neighbours shared with fp32"], "lrrrrr", enc)
    return out


RENDERERS: Dict[str, Callable[[Path], str]] = {
    "precision": precision,
    "catalog-scale": catalog_scale,
    "cost-curve": cost_curve,
    "embed-precision": embed_precision,
    "bundle-size": bundle_size,
    "train-layout": train_layout,
    "quality": lambda res: quality(res, ["ml-latest-small", "amazon-gift-cards"]),
    "published": lambda res: published(res, ["amazon-scientific", "amazon-beauty"]),
    "preprocess": preprocess,
    "serving": serving,
    "retrain": retrain,
    "faults": faults,
    "reliability-load": reliability_load,
}


# ---- rewriting the documents ------------------------------------------------------------------

def render_blocks(text: str, results: Path, renderers: Dict[str, Callable[[Path], str]] = RENDERERS
                  ) -> Tuple[str, List[str]]:
    """``text`` with every table block regenerated, and the names of the blocks that changed.

    Raises:
        KeyError: a block names no renderer.
    """
    changed: List[str] = []

    def one(m: re.Match) -> str:
        name = m.group("name")
        if name not in renderers:
            raise KeyError(f"unknown table block {name!r}; known: {', '.join(sorted(renderers))}")
        body = renderers[name](results).rstrip("\n") + "\n"
        if body != m.group("body"):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(one, text), changed


def documents(root: Path = ROOT) -> List[Path]:
    """README.md and every docs/*.md under ``root``."""
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def update(root: Path = ROOT, results: Path | None = None, write: bool = True) -> List[str]:
    """Regenerate the blocks of every document; returns ``path: block`` for each stale block
    (rewritten when ``write``)."""
    results = results or root / "results"
    stale: List[str] = []
    for path in documents(root):
        text = path.read_text()
        new, changed = render_blocks(text, results)
        stale += [f"{path.relative_to(root)}: {name}" for name in changed]
        if write and new != text:
            path.write_text(new)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tables", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is not current")
    ap.add_argument("--root", type=Path, default=ROOT, help="folder with README.md, docs/ and results/")
    args = ap.parse_args(argv)
    stale = update(args.root, write=not args.check)
    for s in stale:
        print(f"{'stale' if args.check else 'rewrote'} {s}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
