"""The main job end to end on a small synthetic shop where item text carries the signal."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import requests

from tests.conftest import ROOT, free_port
from tests.e2e.test_cli import ENV


def _wait_for_serving(p, log_path, timeout_s):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text = log_path.read_text()
        m = re.search(r"serving on (http://\S+)", text)
        if m:
            return m.group(1)
        if p.poll() is not None:
            pytest.fail(f"pipeline exited with {p.returncode} before serving:\n{text[-5000:]}")
        time.sleep(1)
    pytest.fail("pipeline did not start serving in time")


def test_pipeline_trains_evaluates_promotes_and_serves(tmp_path):
    """The command-line contract: ... serve.enabled=true serve.port=N trains, promotes, serves on
    127.0.0.1:N until SIGTERM, then stops cleanly."""
    root = tmp_path / "store"
    port = free_port()
    args = [sys.executable, "-m", "jobs.pipeline", f"storage.root={root}", "--preset", "tiny",
            "ray.num_cpus=2", "evaluate.baselines=true", "evaluate.new_item_variant=true",
            "serve.enabled=true", f"serve.port={port}"]
    log = open(tmp_path / "pipeline.log", "w+")
    p = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        url = _wait_for_serving(p, tmp_path / "pipeline.log", timeout_s=1200)
        assert url == f"http://127.0.0.1:{port}"
        assert requests.get(url + "/healthz", timeout=30).json()["status"] == "ok"
        out = requests.post(url + "/v1/recommend", json={"user_id": "u0000001", "k": 5}, timeout=30).json()
        assert len(out["items"]) == 5
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 0
    finally:
        if p.poll() is None:
            p.kill()
    stdout = (tmp_path / "pipeline.log").read_text()
    assert "PROMOTED" in stdout and "stopping: shutting down Serve and Ray" in stdout
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/healthz", timeout=5)

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
    # The shipped model (retriever + co-visitation/text/popularity channels + ranker) beats the
    # ID-only retriever it would otherwise be, item-to-item co-occurrence and popularity.
    main = test[metrics["main_model"]]
    for other in ("id-only", "ItemKNN", "MostPopular"):
        assert main["recall@10"] > test[other]["recall@10"], other
    assert metrics["promotion"]["promoted"] is True
    # The new-item variant uses the encoder before fine-tuning: the fine-tuned LLM saw the "new"
    # items in its (item, next item) pairs, so its embeddings would leak them.
    variant = metrics["new_item_variant"]
    assert variant["text_embeddings"] == lineage["text_embeddings_base"] and variant["text_embeddings"].endswith("-base")
    assert variant["hybrid"]["new_item_targets"]["n"] > 0

    # evaluate.max_users: the same bundle scored on a fixed sample of the users (a catalog of
    # millions of users bounds its evaluation so); every figure then covers the sample only.
    every = metrics["users"]["with_targets"]
    assert metrics["users"]["evaluated"] == every == preds.num_rows
    half = every // 2
    out = subprocess.run([sys.executable, "-m", "jobs.evaluate", f"storage.root={root}", f"evaluate.run_id={run_id}",
                          f"evaluate.max_users={half}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    sampled = json.loads((report / "metrics.json").read_text())
    assert sampled["users"] == {"evaluated": half, "with_targets": every}
    assert sampled["models"][sampled["main_model"]]["test"]["n"] == half == pq.read_table(report / "predictions.parquet").num_rows
    assert 0 < sampled["models"][sampled["main_model"]]["valid_ranker_holdout"]["n"] < metrics["models"][metrics["main_model"]]["valid_ranker_holdout"]["n"]
