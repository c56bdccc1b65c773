"""What a training loop needs of its optimiser, in two forms: plain AdamW in this process, or a
DeepSpeed engine (ZeRO-2/3, gloo on CPU, NCCL on GPU) inside a Ray Train worker.

The loops in components.training call only this interface, so every model has one loop, run the
same way by the Ray Train workers, the in-process baselines and jobs.quick_train:

    out = stepper(*inputs)          # forward
    stepper.step(loss)              # backward, clip, optimiser (and lr schedule) step
    with stepper.full_params():     # whole parameters for evaluation (ZeRO-3 partitions them)
        ...
    stepper.state()                 # a full copy of the weights (the best epoch's, to export)
    stepper.mean(x)                 # a figure averaged over the data-parallel workers
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import torch

from components import checkpoints as ck
from components import layout

Schedule = Callable[[torch.optim.Optimizer], Optional[torch.optim.lr_scheduler.LRScheduler]]
log = logging.getLogger(__name__)

# A JIT build of DeepSpeed's CPU communication op takes ~1 min here; a build lock older than this
# was left by a process killed mid-build (a killed run, the OOM killer), and every later build
# would wait on it forever (torch's FileBaton has no timeout).
STALE_BUILD_LOCK_S = 600


def build_root() -> Path:
    """Where torch JIT-builds extensions (``TORCH_EXTENSIONS_DIR`` or torch's default)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S, root: Optional[Path] = None) -> list[Path]:
    """Remove torch extension build locks older than ``max_age_s`` (under ``TORCH_EXTENSIONS_DIR``
    or torch's default build root); returns the ones removed."""
    root = build_root() if root is None else root
    removed = []
    for lock in [*Path(root).glob("*/lock"), *Path(root).glob("*/*/lock")]:
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
                log.warning("removed a stale torch extension build lock %s (a build was killed)", lock)
        except FileNotFoundError:  # another worker removed it or the build finished
            pass
    return removed


@contextmanager
def stale_build_lock_watchdog(max_age_s: float = STALE_BUILD_LOCK_S, every_s: float = 30.0) -> Iterator[None]:
    """While the body runs (DeepSpeed's import and initialisation, where its ops are JIT-built),
    clear build locks that grow stale, so a worker waiting on a killed builder's lock goes on.

    The watching thread imports nothing: everything it needs is resolved here first. An import
    from it while DeepSpeed initialises deadlocked a rank (CI, twice): it held
    ``torch.utils.cpp_extension``'s module lock waiting for the global import lock, which the
    training thread held inside setuptools' ``_distutils_hack`` finder (DeepSpeed probing its
    ops) while waiting for a module the watcher was importing. Neither timed out."""
    import threading

    done = threading.Event()
    root = build_root()

    def watch() -> None:
        while True:
            clear_stale_build_locks(max_age_s, root)
            if done.wait(every_s):
                return

    t = threading.Thread(target=watch, name="stale-build-lock-watchdog", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()


class LocalStepper:
    """AdamW over ``model``'s trainable parameters in this process, with gradient clipping and an
    optional lr schedule (``schedule(optimizer)``)."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, clip: Optional[float] = 1.0,
                 schedule: Optional[Schedule] = None):
        self.module = model
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                     weight_decay=weight_decay)
        self.sched = schedule(self.opt) if schedule is not None else None
        self.clip = clip

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()

    def full_params(self):
        return nullcontext()

    def state(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def mean(self, value: float) -> float:
        return float(value)


def deepspeed_config(zero_stage: int, precision: str, micro_batch: int) -> Dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage},
        # A torch optimizer instead of DeepSpeed's fused Adam: no ~85 s JIT build on CPU.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedStepper:
    """A DeepSpeed engine over ``model`` with AdamW (a torch optimiser: no fused-Adam JIT build on
    CPU), gradient clipping 1.0 and ``schedule``, which the engine steps and checkpoints. Needs an
    initialised torch.distributed process group (Ray Train's TorchTrainer sets one up)."""

    TAG = "state"

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, zero_stage: int, precision: str,
                 micro_batch: int, schedule: Optional[Schedule] = None):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
        with stale_build_lock_watchdog():
            import deepspeed

            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=schedule,
                                                        config=deepspeed_config(zero_stage, precision, micro_batch))
        self.module = self.engine.module
        self.zero_stage = zero_stage

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def train(self) -> None:
        self.engine.train()

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    @contextmanager
    def full_params(self) -> Iterator[None]:
        """Under ZeRO-3 parameters are partitioned: gather them for evaluation and export."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield
        else:
            yield

    def state(self) -> Dict[str, torch.Tensor]:
        with self.full_params():
            return {k: v.detach().clone().float() for k, v in self.module.state_dict().items()}

    def mean(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
            t /= dist.get_world_size()
        return float(t.item())

    def save(self, folder: str | Path, rank: int) -> None:
        """This rank's engine state (its ZeRO shard, optimiser, schedule) and a signed manifest."""
        self.engine.save_checkpoint(str(folder), tag=self.TAG)
        ck.write_state_manifest(folder, rank)

    def load(self, folder: str | Path) -> None:
        ck.verify_state(folder)  # before DeepSpeed unpickles anything in it
        self.engine.load_checkpoint(str(folder), tag=self.TAG, load_module_strict=True)


def save_progress(folder: str | Path, progress: Dict[str, Any], best_state: Optional[Dict[str, torch.Tensor]],
                  best_config: Dict[str, Any]) -> None:
    """A loop's progress (JSON) and its best weights so far (``best/``) next to an engine state."""
    folder = Path(folder)
    (folder / "progress.json").write_text(json.dumps({k: v for k, v in progress.items() if not k.startswith("_")}))
    if best_state is not None:
        ck.save_local(folder / "best", best_state, best_config, metrics=progress.get("best_metrics"))


def load_progress(folder: str | Path) -> Dict[str, Any]:
    """The progress saved by ``save_progress``, with the best weights under ``_best_state``."""
    folder = Path(folder)
    progress = json.loads((folder / "progress.json").read_text())
    best = folder / "best"
    progress["_best_state"] = ck.load_local(best)[0] if (best / layout.WEIGHTS).is_file() else None
    return progress
