"""Reliability figures: the fault scenarios of tests/integration/test_faults.py (S3 unreachable for
10 s; the ingress replica and the live-state holder killed), each with a posting and a
recommending client running throughout, written to results/reliability.json.

    .venv/bin/python -m benchmarks.reliability [--out results/reliability.json]

The scenarios are the tests themselves (one code path, and their assertions must hold); this runs
them and keeps the counts they measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results/reliability.json"))
    args = ap.parse_args()
    out = Path(args.out)
    tmp = out.with_suffix(".partial.json")
    tmp.unlink(missing_ok=True)
    env = {**os.environ, "LLMREC_RELIABILITY_OUT": str(tmp), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    t0 = time.time()
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                          "tests/integration/test_faults.py"], cwd=ROOT, env=env)
    scenarios = json.loads(tmp.read_text()) if tmp.exists() else {}
    tmp.unlink(missing_ok=True)
    result = {"benchmark": "reliability", "machine": f"{os.cpu_count()} cpus", "python": platform.python_version(),
              "tests_passed": rc == 0, "wall_s": round(time.time() - t0, 1), "scenarios": scenarios,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"written to {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
