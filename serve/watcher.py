"""Fetching promoted bundles and hot-swapping them inside a replica (no Ray).

``fetch_parts`` downloads only the parts of a bundle a deployment needs and checks the sha256 of
every file against the manifest recorded in ``registry/<model>/latest.json``: a missing or
altered file raises ``CheckpointError`` and nothing is loaded.

``ModelWatcher`` polls the pointer from a background thread (off the request path), fetches and
loads a new version, then swaps one reference: requests in flight keep the object they started
with, the next ones get the new one. A refused version is logged, counted and not retried until
the pointer moves again; the old model keeps serving.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from components import checkpoints as ck
from components import layout, registry
from components.storage import Storage

log = logging.getLogger(__name__)

# Parts without which no retriever can load: a manifest lacking one is refused before any download.
REQUIRED_PARTS = (layout.RETRIEVER, layout.TEXT, layout.ITEMS)


def fetch_parts(storage: Storage, pointer: Dict[str, Any], parts: Sequence[str], dest: Path) -> Path:
    """Download ``parts`` (top-level folders, ``components.layout.*_PARTS``) of the bundle
    ``pointer`` names, plus its lineage, verifying each file's sha256 against the pointer's
    manifest. Returns ``dest``."""
    manifest: Dict[str, str] = pointer.get("sha256") or {}
    prefix = pointer.get("prefix")
    if not manifest or not prefix:
        raise ck.CheckpointError(f"registry pointer for run {pointer.get('run_id')!r} has no manifest or prefix")
    wanted = {rel: digest for rel, digest in manifest.items()
              if rel == layout.LINEAGE or rel.split("/", 1)[0] in parts}
    for part in parts:
        if part in REQUIRED_PARTS and not any(r.startswith(part + "/") for r in wanted):
            raise ck.CheckpointError(f"bundle {prefix} has no {part}/ in its manifest")
    dest = Path(dest)
    for rel, digest in sorted(wanted.items()):
        try:
            data = storage.read_bytes(f"{prefix}/{rel}")
        except Exception as exc:
            raise ck.CheckpointError(f"{storage.uri(prefix)}: {rel} listed in the manifest cannot be read ({exc})") from exc
        if hashlib.sha256(data).hexdigest() != digest:
            raise ck.CheckpointError(f"{storage.uri(prefix)}: sha256 of {rel} does not match the manifest")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return dest


class ModelWatcher:
    """Keeps ``current`` at the newest loadable version of the registry pointer of ``model``.

    Args:
        storage: the storage root holding registry/ and checkpoints/.
        model: registry name (``recommender``).
        parts: bundle parts to fetch (``components.layout.*_PARTS``).
        loader: ``(folder, version) -> object``; runs in the watcher thread.
        interval_s: polling interval.
        prepare: ``(old, new)`` run under ``swap_lock`` just before ``new`` replaces ``old``
            (e.g. to replay upserts); ``old`` is None for the first version.
    """

    def __init__(self, storage: Storage, model: str, parts: Sequence[str], loader: Callable[[Path, str], Any],
                 interval_s: float = 2.0, prepare: Optional[Callable[[Any, Any], None]] = None):
        self.storage = storage
        self.model = model
        self.parts = tuple(parts)
        self.loader = loader
        self.interval_s = interval_s
        self.prepare = prepare
        self.current: Any = None
        self.pointer: Optional[Dict[str, Any]] = None
        # A running canary's candidate, loaded beside ``current`` (serve/rollout.py): requests of
        # the users in its share are pinned to it.
        self.candidate: Any = None
        self.canary: Optional[Dict[str, Any]] = None
        self.refused_candidates: Dict[str, str] = {}
        self.swaps = 0
        self.refused: Dict[str, str] = {}
        self.last_swap_s: Optional[float] = None
        self.last_error: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._swap_lock = threading.Lock()

    @property
    def version(self) -> str:
        return self.pointer["run_id"] if self.pointer else ""

    def check_once(self) -> bool:
        """One poll of the promoted pointer, then of the canary's; True when a new version was
        swapped in."""
        swapped = self._check_promoted()
        self._check_canary()
        return swapped

    def _check_promoted(self) -> bool:
        pointer = registry.read_pointer(self.storage, self.model)
        if pointer is None:
            self.last_error = f"no promoted model at {self.storage.uri(layout.pointer(self.model))}"
            return False
        run_id = pointer.get("run_id", "")
        if run_id == self.version or run_id in self.refused:
            return False
        t0 = time.perf_counter()
        try:
            if self.candidate is not None and run_id == self.candidate_version:
                new = self.candidate  # a canary promoted: loaded and verified already
            else:
                new = self._load(pointer)
            if self.prepare is not None:
                with self._swap_lock:
                    self.prepare(self.current, new)
                    self._swap(new, pointer)
            else:
                self._swap(new, pointer)
        except Exception as exc:  # corrupt, partial or unloadable: refuse, keep serving the old one
            self.refused[run_id] = str(exc)
            self.last_error = f"refused {run_id}: {exc}"
            log.error("model %s: refused version %s, still serving %r: %s", self.model, run_id, self.version or None, exc)
            return False
        if new is self.candidate:
            self.candidate, self.canary = None, None
        self.last_swap_s = time.perf_counter() - t0
        log.warning("model %s: now serving %s (loaded in %.2fs)", self.model, run_id, self.last_swap_s)
        return True

    def _load(self, pointer: Dict[str, Any]) -> Any:
        tmp = Path(tempfile.mkdtemp(prefix=f"serve-{pointer.get('run_id', '')}-"))
        try:
            fetch_parts(self.storage, pointer, self.parts, tmp)
            return self.loader(tmp, pointer.get("run_id", ""))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @property
    def candidate_version(self) -> str:
        return self.canary["run_id"] if self.canary else ""

    def _check_canary(self) -> None:
        """Load the canary's candidate beside the promoted version (verified the same way), or drop
        it once the canary ends or is promoted. A refused candidate is not retried."""
        canary = registry.read_canary(self.storage, self.model)
        run_id = (canary or {}).get("run_id", "")
        if not run_id or run_id == self.version:
            if self.candidate is not None:
                log.warning("model %s: canary %s ended, candidate dropped", self.model, self.candidate_version)
            with self._swap_lock:  # the retriever reads it under this lock
                self.candidate, self.canary = None, None
            return
        if run_id == self.candidate_version or run_id in self.refused_candidates:
            return
        try:
            new = self._load(canary)
            if self.prepare is not None:
                with self._swap_lock:  # no previous version to keep: old=None
                    self.prepare(None, new)
                    self.candidate, self.canary = new, canary
            else:
                self.candidate, self.canary = new, canary
        except Exception as exc:  # kept apart from ``refused``: a promotion of it is tried afresh
            self.refused_candidates[run_id] = str(exc)
            self.last_error = f"refused canary {run_id}: {exc}"
            log.error("model %s: refused canary %s: %s", self.model, run_id, exc)
            return
        log.warning("model %s: canary candidate %s loaded beside %s", self.model, run_id, self.version)

    def _swap(self, new: Any, pointer: Dict[str, Any]) -> None:
        first = self.current is None
        self.current, self.pointer = new, pointer
        self.last_error = None
        if not first:
            self.swaps += 1

    @property
    def swap_lock(self) -> threading.Lock:
        """Held while a new version is prepared and swapped in (with ``prepare``)."""
        return self._swap_lock

    def wait_first(self, timeout_s: float) -> None:
        """Block until a first version loads; raises with the reason when none does in time."""
        deadline = time.monotonic() + timeout_s
        while self.current is None:
            try:
                self.check_once()
            except Exception as exc:  # storage not reachable yet
                self.last_error = str(exc)
            if self.current is not None:
                break
            if self.refused and self.last_error:  # the promoted version cannot be served: say why now
                raise RuntimeError(f"cannot serve {self.model!r}: {self.last_error}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no servable model for {self.model!r} after {timeout_s:.0f}s: {self.last_error}")
            time.sleep(min(self.interval_s, 1.0))

    def start(self) -> "ModelWatcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"watch-{self.model}", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except Exception as exc:  # registry unreadable this time: try again next interval
                self.last_error = str(exc)
                log.warning("model %s: registry poll failed: %s", self.model, exc)

    def stop(self) -> None:
        self._stop.set()

    def problem(self) -> Optional[str]:
        """Why this replica cannot serve or follow promotions (None: it can): no model loaded, or
        the watch thread gone while not stopped. Serve's ``check_health`` restarts it then."""
        if self.current is None:
            return f"model {self.model}: no version loaded"
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return f"model {self.model}: the registry watch thread died; promotions would never arrive"
        return None

    def status(self) -> Dict[str, Any]:
        p = self.pointer or {}
        return {"version": self.version, "candidate": self.candidate_version or None,
                "refused_candidates": dict(self.refused_candidates), "swaps": self.swaps, "refused": dict(self.refused),
                "last_error": self.last_error, "lineage": p.get("lineage", {}), "metrics": p.get("metrics", {}),
                "promoted_at": p.get("created_at")}
