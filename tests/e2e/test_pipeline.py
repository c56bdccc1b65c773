"""The main job end to end on a small synthetic shop where item text carries the signal."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

from tests.conftest import ROOT
from tests.e2e.test_cli import ENV


def test_pipeline_trains_evaluates_promotes_and_text_pays_off(tmp_path):
    root = tmp_path / "store"
    args = [sys.executable, "-m", "jobs.pipeline", f"storage.root={root}",
            "data.synthetic.num_events=12000", "data.synthetic.num_items=1500", "data.synthetic.num_shards=3",
            "retriever.dim=32", "retriever.max_len=50", "train.retriever.epochs=12", "train.retriever.eval_every=4",
            "train.llm.steps=2", "train.llm.batch_size=8", "ranker.epochs=5", "ray.num_cpus=2"]
    p = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    assert "PROMOTED" in p.stdout

    pointer = json.loads((root / "registry/recommender/latest.json").read_text())
    run_id = pointer["run_id"]
    bundle = root / "checkpoints/recommender" / run_id
    for part in ("llm/model.safetensors", "retriever/model.safetensors", "ranker/model.safetensors",
                 "text/text_embeddings.parquet", "lineage.json", "manifest.json"):
        assert (bundle / part).is_file(), part
    lineage = json.loads((bundle / "lineage.json").read_text())
    assert lineage["text_embeddings"].endswith("-llm")  # re-embedded with the fine-tuned encoder

    report = root / "reports" / run_id
    metrics = json.loads((report / "metrics.json").read_text())
    assert {"report.md", "metric_by_slice.png", "popularity_bias.png"} <= set(os.listdir(report))
    preds = pq.read_table(report / "predictions.parquet")
    assert preds.column_names == ["user_id", "items"]
    assert preds.num_rows == metrics["models"]["hybrid"]["test"]["n"]
    assert {len(x) for x in preds["items"].to_pylist()} == {100}

    test = {name: m["test"] for name, m in metrics["models"].items()}
    # The LLM pays for itself where text carries the signal, and everything beats popularity.
    assert test["hybrid"]["recall@10"] > test["id-only"]["recall@10"]
    assert test["hybrid"]["recall@10"] > test["MostPopular"]["recall@10"]
    assert metrics["promotion"]["promoted"] is True
