"""Slow: the documented contract command on real data beats the non-neural baselines on test
(`make test-all`; about 10 minutes on 2 cores). Skipped when ../shared/data is absent."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.e2e.test_cli import ENV

DATA = ROOT.parent / "shared" / "data" / "amazon-2018-gift-cards-5core"
pytestmark = pytest.mark.slow


@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not found (shared real data absent)")
def test_contract_command_on_amazon_gift_cards_beats_itemknn_and_promotes(tmp_path):
    root = tmp_path / "store"
    p = subprocess.run([sys.executable, "-m", "jobs.pipeline", "data.source=amazon", f"data.path={DATA}",
                        f"storage.root={root}", "preprocess.kcore=5", "ray.num_cpus=2"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "data.source preset: configs/amazon.yaml" in p.stderr
    pointer = json.loads((root / "registry/recommender/latest.json").read_text())
    metrics = json.loads((root / "reports" / pointer["run_id"] / "metrics.json").read_text())
    test = {name: m["test"]["ndcg@10"] for name, m in metrics["models"].items()}
    main = metrics["main_model"]
    assert "channels" in main
    assert test[main] > test["ItemKNN"] > test["MostPopular"]
    assert metrics["fusion"]["valid_ndcg@10"] >= metrics["fusion"]["valid_ndcg@10_retriever"]
