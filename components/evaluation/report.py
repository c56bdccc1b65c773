"""The evaluation report (no Ray): report.md (tables of every model and split, slices, the
new-item variant) and two PNG plots (Recall@10 by slice, popularity bias) that it shows inline."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np

from components.evaluation.metrics import popularity_deciles
from components.models.baselines import item_counts
from components.models.channels import describe as describe_fusion

# The plots plot_report writes next to report.md, with the caption the report gives each.
PLOTS = {"metric_by_slice.png": "Recall@10 by slice (test)",
         "popularity_bias.png": "Popularity bias: recommended top-10 vs test targets"}


def plot_report(folder: Path, ev: Dict[str, Any]) -> list:
    """Write the plots of ``ev`` (evaluate_bundle's output) into ``folder``; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, data = ev["results"], ev["data"]
    names = list(res["slices"])
    slices = [s for s in next(iter(res["slices"].values())) if not s.startswith("pop_decile")]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        vals = [res["slices"][name][s].get("recall@10", 0.0) for s in slices]
        ax.bar(np.arange(len(slices)) + k * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(slices)) + 0.4 - width / 2, slices)
    ax.set_ylabel("Recall@10 (test)")
    ax.set_title("Recall@10 by slice")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "metric_by_slice.png", dpi=110)
    plt.close(fig)

    counts = item_counts(data.histories.items, data.histories.num_items)
    rec_dec = popularity_deciles(counts, ev["top"][:, :10].ravel())
    tgt_dec = popularity_deciles(counts, ev["targets"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(np.arange(10) - 0.2, np.bincount(rec_dec, minlength=10) / max(len(rec_dec), 1), 0.4,
           label=f"recommended top-10 ({res['main_model']})")
    ax.bar(np.arange(10) + 0.2, np.bincount(tgt_dec, minlength=10) / max(len(tgt_dec), 1), 0.4, label="test targets")
    ax.set_xlabel("item popularity decile (0 = least popular)")
    ax.set_ylabel("share")
    ax.set_title("Popularity bias")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "popularity_bias.png", dpi=110)
    plt.close(fig)
    return list(PLOTS)


def report_markdown(res: Dict[str, Any], plots: Sequence[str] = ()) -> str:
    """report.md for ``res`` (evaluate_bundle's results). ``plots``: names of image files in the
    report's own folder (plot_report's), shown inline by links relative to report.md, so the report
    renders with its figures wherever the folder is copied (a browser, GitHub, an S3 download)."""
    lines = [f"# Evaluation of {res['run_id']}", "",
             f"Dataset {res['dataset']} version {res['dataset_version']}; full ranking over the catalog, "
             "the user's history excluded; main model: " + res["main_model"] + ".", "",
             "| model | split | Recall@10 | NDCG@10 | MRR@10 | Recall@20 | NDCG@20 | coverage@10 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, splits in res["models"].items():
        for split, m in splits.items():
            lines.append(f"| {name} | {split} | {m.get('recall@10', 0):.4f} | {m.get('ndcg@10', 0):.4f} | "
                         f"{m.get('mrr@10', 0):.4f} | {m.get('recall@20', 0):.4f} | {m.get('ndcg@20', 0):.4f} | "
                         f"{m.get('coverage@10', 0):.3f} |")
    fusion = res.get("fusion")
    if fusion:
        lines += ["", f"Channel fusion (weights fitted on valid): {describe_fusion(fusion)}; valid NDCG@10 "
                      f"{fusion['valid_ndcg@10']:.4f} fused vs {fusion['valid_ndcg@10_retriever']:.4f} retriever alone."]
    if any("valid_ranker_holdout" in m for m in res["models"].values()):
        lines += ["", "`valid_ranker_holdout`: the valid lists the ranker did not train on (it trains on the "
                      "others): the main model's valid figure without the ranker's in-sample advantage."]
    lines += ["", "## Test slices (Recall@10 / NDCG@10, n)", "", "| slice | " + " | ".join(res["slices"]) + " |",
              "| --- |" + " ---: |" * len(res["slices"])]
    first = next(iter(res["slices"].values()))
    for s in first:
        row = [f"{res['slices'][n][s].get('recall@10', 0):.3f} / {res['slices'][n][s].get('ndcg@10', 0):.3f} "
               f"({res['slices'][n][s]['n']})" for n in res["slices"]]
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    if "new_item_variant" in res and "skipped" in res["new_item_variant"]:
        lines += ["", f"New-item variant skipped: {res['new_item_variant']['skipped']}."]
    elif "new_item_variant" in res:
        nv = res["new_item_variant"]
        lines += ["", f"## New-item variant (text embeddings of the encoder before fine-tuning: {nv['text_embeddings']})",
                  "", f"{nv['new_items']} items lose all training interactions.", "",
                  "| model | Recall@10 all | Recall@10 new-item targets (n) |", "| --- | ---: | ---: |"]
        for name in ("hybrid", "id-only"):
            lines.append(f"| {name} | {nv[name]['all']['recall@10']:.4f} | "
                         f"{nv[name]['new_item_targets'].get('recall@10', 0):.4f} ({nv[name]['new_item_targets']['n']}) |")
    lines += ["", "Predictions: predictions.parquet (top-100 item ids per test user)."]
    if plots:
        lines += ["", "## Plots"]
        for name in plots:
            lines += ["", f"![{PLOTS.get(name, name)}]({name})"]
    lines.append("")
    return "\n".join(lines)
