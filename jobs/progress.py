"""One progress bar per stage, with an ETA, wherever the stage's work runs.

The driver opens a bar around each stage (``with stage("embed", total=n, unit="item") as bar``)
and ticks it itself when the work streams through it (embedding, evaluation), or lets Ray Train
workers tick it: ``stage(..., remote=True)`` starts a small named actor (no CPU) that rank 0
reports to through ``Ticker(bar.actor_name).tick(n, total=..., **postfix)``, and the bar polls
it twice a second. tqdm draws the bar and its ETA on a terminal; elsewhere (CI logs, ``ray job logs``,
captured output) bars are off and each stage's summary line is what prints.
``LLMREC_PROGRESS=1`` / ``0`` forces them on / off.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

NAMESPACE = "llmrec"
POLL_S = 0.5
_WORKER_MIN_INTERVAL_S = 0.5  # a worker sends at most two updates a second
_FIND_S = 10.0  # how long a worker looks for the stage's actor, and waits for a forced update


def bars_enabled(stream=None) -> bool:
    forced = os.environ.get("LLMREC_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class _Counter:
    """The actor behind a remote-fed bar: the latest (done, total, postfix) of one stage."""

    def __init__(self) -> None:
        self.done, self.total, self.postfix = 0, None, {}

    def update(self, n: int, total: Optional[int], postfix: Dict[str, Any]) -> None:
        self.done += n
        if total is not None:
            self.total = total
        self.postfix.update(postfix)

    def read(self):
        return self.done, self.total, dict(self.postfix)


class Bar:
    """A tqdm bar (or nothing, when bars are off) that remembers what it counted."""

    def __init__(self, desc: str, total: Optional[int], unit: str, file=None, enabled: Optional[bool] = None):
        self.desc, self.total, self.n = desc, total, 0
        self.actor_name: Optional[str] = None  # set by stage(remote=True): what workers tick
        self._file = file or sys.stderr
        self._enabled = bars_enabled(self._file) if enabled is None else enabled
        self._tqdm = None
        if self._enabled:
            from tqdm.auto import tqdm

            # the terminal's size (a pseudo-terminal without one reports 0 x 0, and tqdm would
            # hide every bar "below" a 0-row screen)
            size = shutil.get_terminal_size((100, 20))
            self._tqdm = tqdm(total=total, desc=f"{desc:<15}", unit=unit, file=self._file, leave=True,
                              ncols=max(size.columns, 60), nrows=max(size.lines, 20))

    def update(self, n: int = 1, total: Optional[int] = None, **postfix: Any) -> None:
        self.set(self.n + n, total, **postfix)

    def set(self, done: int, total: Optional[int] = None, **postfix: Any) -> None:
        self.n = done
        if total is not None:
            self.total = total
        if self._tqdm is not None:
            if total is not None and self._tqdm.total != total:
                self._tqdm.total = total
            self._tqdm.n = done
            if postfix:
                self._tqdm.set_postfix(_short(postfix), refresh=False)
            self._tqdm.refresh()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


def _short(postfix: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}


@contextmanager
def stage(desc: str, total: Optional[int] = None, unit: str = "it", remote: bool = False,
          file=None, enabled: Optional[bool] = None) -> Iterator[Bar]:
    """A bar for one stage. ``remote=True``: also a named actor that Ray workers tick
    (``bar.actor_name`` goes into their config); the bar follows it until the stage ends."""
    bar = Bar(desc, total, unit, file, enabled)
    actor, stop, poller = None, threading.Event(), None
    if remote:
        import ray

        bar.actor_name = f"progress-{os.getpid()}-{time.time_ns()}"
        bar.set(0, None, status="starting workers")
        actor = ray.remote(num_cpus=0)(_Counter).options(name=bar.actor_name,
                                                                          namespace=NAMESPACE).remote()

        def follow():
            while not stop.wait(POLL_S):
                try:
                    _follow_once(bar, actor)
                except Exception:  # a bar must never fail the stage it draws
                    return

        poller = threading.Thread(target=follow, daemon=True, name=f"progress-{desc}")
        poller.start()
    try:
        yield bar
    finally:
        if actor is not None:
            stop.set()
            poller.join(timeout=5)
            try:
                import ray

                _follow_once(bar, actor, timeout_s=30.0)  # the final state, on a busy machine too
                ray.kill(actor)
            except Exception:
                pass
        bar.close()


def _follow_once(bar: Bar, actor, timeout_s: float = 5.0) -> None:
    import ray

    done, total, postfix = ray.get(actor.read.remote(), timeout=timeout_s)
    bar.set(done, total, **postfix)


class Ticker:
    """Worker side of a remote-fed bar: batches ticks and sends at most two updates a second
    (fire and forget; a missing actor, e.g. a stage run outside ``stage(remote=True)``, is ignored)."""

    def __init__(self, actor_name: Optional[str]):
        self._actor = None
        if actor_name:
            import ray

            deadline = time.monotonic() + _FIND_S
            while self._actor is None:  # the driver's actor may still be registering
                try:
                    self._actor = ray.get_actor(actor_name, namespace=NAMESPACE)
                except Exception:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
        self._pending, self._total, self._postfix, self._last = 0, None, {}, 0.0

    def tick(self, n: int = 1, total: Optional[int] = None, force: bool = False, **postfix: Any) -> None:
        if self._actor is None:
            return
        self._pending += n
        if total is not None:
            self._total = total
        self._postfix.update(postfix)
        now = time.monotonic()
        if force or now - self._last >= _WORKER_MIN_INTERVAL_S:
            try:
                ref = self._actor.update.remote(self._pending, self._total, self._postfix)
                if force:  # an epoch's end or a stage's last step: there before the worker goes on
                    import ray

                    ray.get(ref, timeout=_FIND_S)
            except Exception:
                return
            self._pending, self._postfix, self._last = 0, {}, now
