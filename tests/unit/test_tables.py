"""The figure tables of README.md and docs/ are generated from results/*.json (benchmarks/tables.py)."""

import json

import pytest

from benchmarks import tables
from tests.conftest import ROOT


def test_the_committed_docs_are_current_with_results():
    blocks = [m.group("name") for doc in tables.documents(ROOT) for m in tables.BLOCK.finditer(doc.read_text())]
    assert {"quality", "serving", "retrain", "faults", "preprocess"} <= set(blocks)  # the tables moved to docs/
    stale = tables.update(ROOT, write=False)
    assert stale == [], f"run `python -m benchmarks.tables`: stale {stale}"


def _throughput(events_per_s):
    return {"rows": [{"events": 10**6, "engine": "local", "cpus": 1, "wall_s": 1.31, "events_per_s": events_per_s,
                      "peak_pss_gb": 0.34},
                     {"events": 10**7, "engine": "ray", "cpus": 2, "wall_s": 22.54, "events_per_s": 443746,
                      "peak_pss_gb": 3.0, "ratio_vs_single_process": 0.68}]}


def test_a_block_renders_the_figures_of_its_json_and_check_names_it_when_stale(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results/preprocess_throughput.json").write_text(json.dumps(_throughput(123456)))
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs/bench.md"
    doc.write_text("# Bench\n\n<!-- table:preprocess -->\n| typed | by hand |\n<!-- /table:preprocess -->\n\nafter\n")

    assert tables.main(["--root", str(tmp_path), "--check"]) == 1  # hand-typed: stale, nothing written
    assert "typed | by hand" in doc.read_text()
    assert tables.main(["--root", str(tmp_path)]) == 0
    text = doc.read_text()
    assert "| 10^6 | single-process pyarrow | 123,456 | 1.3 s | 0.34 GB | 1.00x |" in text
    assert "| 10^7 | Ray Data, 2 CPUs | 443,746 | 22.5 s | 3.00 GB | 0.68x |" in text
    assert "by hand" not in text and text.startswith("# Bench\n") and text.endswith("\n\nafter\n")
    assert tables.main(["--root", str(tmp_path), "--check"]) == 0

    # a new benchmark run changes the JSON: the committed table is stale until regenerated
    (tmp_path / "results/preprocess_throughput.json").write_text(json.dumps(_throughput(654321)))
    assert tables.update(tmp_path, write=False) == ["docs/bench.md: preprocess"]


def test_an_unknown_block_name_is_refused_with_its_name(tmp_path):
    with pytest.raises(KeyError, match="no-such-table"):
        tables.render_blocks("<!-- table:no-such-table -->\n<!-- /table:no-such-table -->\n", tmp_path)


def test_no_document_or_source_holds_merge_conflict_markers():
    """A merge once left <<<<<<< / ======= / >>>>>>> lines in docs/models.md; every tracked text
    file (README, docs, code, configs) is checked."""
    import re
    import subprocess

    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    marker = re.compile(r"^(<{7}|>{7})( |$)|^={7}$", re.M)
    bad = [f for f in files if f.endswith((".md", ".py", ".yaml", ".yml", ".toml", ".cfg", ".sh", ".txt"))
           and (ROOT / f).is_file() and marker.search((ROOT / f).read_text(errors="replace"))]
    assert bad == [], f"merge conflict markers in {bad}"
