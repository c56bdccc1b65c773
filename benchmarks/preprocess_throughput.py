"""Preprocessing throughput: the Ray Data job vs a single-process pyarrow run of the same steps.

    python -m benchmarks.preprocess_throughput [--events 1000000 10000000] [--shards 40] [--cpus 1 2]

For each size it generates synthetic shards once, then runs each variant in a fresh subprocess
(so peak memory is that run's alone) and samples the proportional set size (PSS) of the whole
process tree: the driver plus every Ray process it started. Events/s counts raw events over the
preprocessing wall time (Ray's start-up is reported separately). Writes
``results/preprocess_throughput.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _overrides(root: str, events: int, shards: int) -> List[str]:
    return [f"storage.root={root}", f"data.synthetic.num_events={events}", f"data.synthetic.num_shards={shards}",
            "preprocess.version=bench"]


def run_one(engine: str, cpus: int, overrides: List[str]) -> Dict:
    """Inside the child process: one preprocessing run, timed."""
    from components.config import load_config
    from jobs import preprocess

    cfg = load_config(overrides + [f"ray.num_cpus={cpus}"])
    t0 = time.perf_counter()
    if engine == "ray":
        import ray

        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = preprocess.run(cfg, engine=engine)
    wall = time.perf_counter() - t1
    if engine == "ray":
        import ray

        ray.shutdown()
    s = out["stats"]
    return {"engine": engine, "cpus": cpus, "wall_s": round(wall, 2), "startup_s": round(startup, 2),
            "raw_events": s["raw_rows"], "events_per_s": round(s["raw_rows"] / wall),
            "read_validate_s": s["read_validate_s"], "global_steps_s": s["global_steps_s"],
            "interactions": s["interactions"], "users": s["users"], "items": s["items"]}


def _pss(pid: int) -> int:
    """Proportional set size from /proc/<pid>/smaps_rollup (cheap; shared pages split fairly)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_pss(proc: psutil.Process) -> int:
    return sum(_pss(p.pid) for p in [proc] + proc.children(recursive=True))


def run_with_peak_pss(cmd: List[str], env: Dict[str, str], what: str) -> tuple:
    """Run ``cmd`` (from the project root) to its end: (stdout, peak PSS of its process tree in
    bytes, sampled every 0.5 s). Raises with the tail of stderr when it fails."""
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        proc = psutil.Process(child.pid)
        while not done.is_set():
            try:
                peak[0] = max(peak[0], _tree_pss(proc))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = child.communicate()
    done.set()
    th.join()
    if child.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{err[-3000:]}")
    return out, peak[0]


def measure(engine: str, cpus: int, overrides: List[str]) -> Dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    cmd = [sys.executable, "-m", "benchmarks.preprocess_throughput", "--child", engine, str(cpus), "--", *overrides]
    out, peak = run_with_peak_pss(cmd, env, f"{engine} run")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_pss_gb"] = round(peak / 1e9, 2)
    return result


def generate(root: str, events: int, shards: int) -> float:
    from components.config import load_config
    from components.data.sources import prepare_source
    from components.storage import Storage

    cfg = load_config(_overrides(root, events, shards))
    t0 = time.perf_counter()
    prepare_source(cfg, Storage(root))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--shards", type=int, default=40)
    ap.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="local Ray CPU counts to compare")
    ap.add_argument("--out", default=str(ROOT / "results" / "preprocess_throughput.json"))
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "CPUS"), help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]), args.overrides)))
        return

    rows = []
    for n in args.events:
        with tempfile.TemporaryDirectory(prefix="bench-pre-") as root:
            gen_s = generate(root, n, args.shards)
            print(f"\n{n:,} events in {args.shards} shards (generated in {gen_s:.1f}s)", flush=True)
            ov = _overrides(root, n, args.shards)
            local = measure("local", 1, ov)
            rows.append({"events": n, **local})
            print(_fmt(local, local), flush=True)
            for cpus in args.cpus:
                r = measure("ray", cpus, ov)
                r["ratio_vs_single_process"] = round(r["events_per_s"] / local["events_per_s"], 2)
                rows.append({"events": n, **r})
                print(_fmt(r, local), flush=True)
    result = {"benchmark": "preprocess_throughput", "machine": f"{platform.node()} {os.cpu_count()} cpus",
              "python": platform.python_version(), "shards": args.shards, "rows": rows,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


def _fmt(r: Dict, base: Dict) -> str:
    name = "single-process pyarrow" if r["engine"] == "local" else f"Ray Data, {r['cpus']} CPU"
    return (f"  {name:<24} {r['events_per_s']:>10,} events/s  wall {r['wall_s']:>7.1f}s "
            f"(read+validate {r['read_validate_s']:.1f}s, global {r['global_steps_s']:.1f}s)  "
            f"peak PSS {r['peak_pss_gb']:.2f} GB  ratio {r['events_per_s'] / base['events_per_s']:.2f}x")


if __name__ == "__main__":
    main()
