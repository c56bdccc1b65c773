"""How the retriever stage should use a node's cores: more workers, or more threads per worker.

    python -m benchmarks.train_layout [--datasets ml-latest-small,amazon-beauty] [--steps 150]

For each dataset (preprocessed here from ../shared/data with its data.source preset, no Ray), the
retriever of that preset is trained for ``--steps`` steps (after 20 warm-up steps) in two layouts
with the same windows per optimizer step (32 by default):

  2 workers x 1 thread, batch 16 each   (the layout every preset used before)
  1 worker  x 2 threads, batch 32

Each worker is a process running the stage's own pieces: ``components.training.retriever``'s
batches and model over a ``DeepSpeedStepper`` (ZeRO-2, gloo), as a Ray Train worker does; Ray
itself is left out so the figures hold only the step. The text embeddings are random unit vectors
of the encoder's width (384): the cost of a step does not depend on their values, and embedding a
catalog would take minutes. Reported: milliseconds per optimizer step, windows a second, and the
cores each worker kept busy (process CPU time over wall time). Writes results/train_layout.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from benchmarks.quality import DATASETS, SHARED

RESULTS = Path(__file__).resolve().parents[1] / "results"
LAYOUTS = ((2, 1), (1, 2))  # (workers, threads each)
WARMUP = 20


def _worker(rank: int, world: int, threads: int, batch: int, steps: int, port: int, store: str, prefix: str,
            rcfg: Dict[str, Any], queue) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from components.data.datasets import load_training_data
    from components.models.retriever import RetrieverConfig
    from components.storage import Storage
    from components.training import retriever as loop
    from components.training.stepper import DeepSpeedStepper

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = load_training_data(Storage(store), prefix, None)
        text = torch.nn.functional.normalize(torch.randn(data.items.num_rows, 384,
                                                         generator=torch.Generator().manual_seed(0)), dim=1)
        model = loop.new_retriever(data.histories, text, RetrieverConfig(**rcfg), 0)
        x = loop.retriever_inputs(data.histories, text, model.cfg)
        stepper = DeepSpeedStepper(model, 1e-3, 0.0, 2, "fp32", batch)
        extra = [x.known] if x.known is not None else []
        stepper.train()
        epochs = (loop.batches(x.windows, batch, np.random.default_rng(e), rank, world) for e in itertools.count())
        t0 = cpu0 = 0.0
        for n, b in enumerate(itertools.chain.from_iterable(epochs)):
            if n == WARMUP:
                dist.barrier()
                t0, cpu0 = time.perf_counter(), time.process_time()
            if n == WARMUP + steps:
                break
            loss = stepper(b, x.text_emb, x.log_q, *extra)
            stepper.step(loss)
            float(loss.item())
        dist.barrier()
        wall = time.perf_counter() - t0
        busy = stepper.mean((time.process_time() - cpu0) / wall)
        if rank == 0:
            queue.put({"workers": world, "threads_each": threads, "batch_each": batch, "windows_per_step": batch * world,
                       "ms_per_step": round(1000 * wall / steps, 1),
                       "windows_per_s": round(steps * batch * world / wall, 1),
                       "cores_busy_per_worker": round(busy, 2), "cores_busy": round(busy * world, 2)})
    except BaseException as e:  # the other rank would wait at a collective forever
        queue.put({"error": f"rank {rank}: {type(e).__name__}: {e}"})
        raise
    finally:
        dist.destroy_process_group()


def measure(store: str, prefix: str, rcfg: Dict[str, Any], per_step: int, steps: int) -> List[Dict[str, Any]]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    rows = []
    for k, (world, threads) in enumerate(LAYOUTS):
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, world, threads, per_step // world, steps, 29600 + k, store,
                                                   prefix, rcfg, queue)) for r in range(world)]
        for p in procs:
            p.start()
        row = queue.get(timeout=1800)
        for p in procs:
            p.join(timeout=60) if "error" not in row else p.kill()
        if "error" in row:
            raise RuntimeError(row["error"])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="ml-latest-small,amazon-beauty")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--windows-per-step", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS / "train_layout.json"))
    args = ap.parse_args()
    from components.config import load_config, preset_for, to_dict
    from jobs.preprocess import run as preprocess

    out: Dict[str, Any] = {"benchmark": "train_layout", "machine": f"{os.cpu_count()} cpus",
                           "python": platform.python_version(), "steps": args.steps,
                           "windows_per_step": args.windows_per_step, "datasets": {}}
    for name in args.datasets.split(","):
        source, folder, extra, _peer, _flags = DATASETS[name]
        if not (SHARED / folder).is_dir():
            print(f"skip {name}: {SHARED / folder} is absent")
            continue
        with tempfile.TemporaryDirectory(prefix="layout-") as tmp:
            base = [f"data.source={source}", f"data.path={SHARED / folder}", f"storage.root={tmp}",
                    "preprocess.engine=local", *extra]
            cfg = load_config(base, preset_for(base))
            prep = preprocess(cfg, engine="local")
            rcfg = to_dict(cfg.retriever)
            print(f"{name}: retriever {rcfg}", flush=True)
            rows = measure(f"file://{tmp}", prep["prefix"], rcfg, args.windows_per_step, args.steps)
        by = {(r["workers"], r["threads_each"]): r for r in rows}
        out["datasets"][name] = {"retriever": rcfg, "layouts": rows,
                                 "speedup_1x2_over_2x1": round(by[(1, 2)]["windows_per_s"] / by[(2, 1)]["windows_per_s"], 2)}
    out["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
