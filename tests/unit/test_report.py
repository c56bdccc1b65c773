"""report.md shows its plots: image links relative to the report, naming the files written beside it."""

import re
from types import SimpleNamespace

import numpy as np

from components.evaluation.report import plot_report, report_markdown


def _results():
    m = {"recall@10": 0.2, "ndcg@10": 0.1, "mrr@10": 0.05, "recall@20": 0.3, "ndcg@20": 0.12, "coverage@10": 0.4}
    slices = {"all": {"recall@10": 0.2, "ndcg@10": 0.1, "n": 50},
              "short_history": {"recall@10": 0.1, "ndcg@10": 0.05, "n": 9}}
    return {"run_id": "r1", "dataset": "synthetic", "dataset_version": "v1", "main_model": "hybrid",
            "models": {"hybrid": {"test": m}, "most-popular": {"test": m}},
            "slices": {"hybrid": slices, "most-popular": slices}}


def test_report_embeds_the_plots_written_next_to_it(tmp_path):
    rng = np.random.default_rng(0)
    histories = SimpleNamespace(items=[rng.integers(1, 40, size=10) for _ in range(50)], num_items=40)
    ev = {"results": _results(), "top": rng.integers(1, 40, size=(50, 20)), "targets": rng.integers(1, 40, size=50),
          "data": SimpleNamespace(histories=histories)}
    plots = plot_report(tmp_path, ev)
    md = report_markdown(ev["results"], plots)
    (tmp_path / "report.md").write_text(md)
    links = re.findall(r"!\[([^\]]+)\]\(([^)]+)\)", md)
    assert [target for _, target in links] == plots == ["metric_by_slice.png", "popularity_bias.png"]
    for caption, target in links:
        assert caption and (tmp_path / target).is_file()  # resolves relative to report.md's folder
        assert (tmp_path / target).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![" not in report_markdown(ev["results"])  # no plots given (the console copy): no links
