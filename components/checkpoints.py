"""Checkpoint folders: weights, side files and their manifest (the registry is components.registry).

A checkpoint is a folder: ``model.safetensors`` (weights; nothing is unpickled), ``config.json``,
optional extra files (tokenizer, item tables), ``metrics.json``, ``lineage.json`` and
``manifest.json`` (sha256 of every file).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from components import layout
from components.storage import Storage

class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt; the message says which file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_local(folder: str | Path, state_dict: Dict[str, torch.Tensor], config: Dict[str, Any],
               metrics: Optional[Dict[str, Any]] = None, lineage: Optional[Dict[str, Any]] = None) -> Path:
    """Write weights + JSON side files + manifest into ``folder`` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(folder / layout.WEIGHTS))
    (folder / layout.CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    (folder / "metrics.json").write_text(json.dumps(metrics or {}, indent=2, sort_keys=True, default=str))
    (folder / layout.LINEAGE).write_text(json.dumps(lineage or {}, indent=2, sort_keys=True, default=str))
    write_manifest(folder)
    return folder


def write_manifest(folder: str | Path) -> Dict[str, str]:
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256_file(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != layout.MANIFEST}
    (folder / layout.MANIFEST).write_text(json.dumps(files, indent=2, sort_keys=True))
    return files


def verify_local(folder: str | Path) -> Dict[str, str]:
    """Check every file against manifest.json; raise CheckpointError on any mismatch."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / layout.MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: missing or unreadable manifest.json ({exc})") from exc
    for rel, digest in manifest.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{folder}: {rel} listed in the manifest is missing")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{folder}: sha256 of {rel} does not match the manifest")
    return manifest


# -- training state (DeepSpeed) ---------------------------------------------------------------
# DeepSpeed's engine.load_checkpoint unpickles its files (torch.load, weights_only=False). Before
# a resume, every such file must match the digest its writer recorded at save time: a corrupt,
# half-uploaded or swapped file is refused instead of unpickled. With LLMREC_CHECKPOINT_KEY set
# the digests are HMACs under that key, so someone who can write to storage but lacks the key
# cannot forge a matching manifest.
STATE_MANIFEST = "state-manifest-rank{rank}.json"
CHECKPOINT_KEY_ENV = "LLMREC_CHECKPOINT_KEY"
UNPICKLED = (".pt", ".pth", ".bin", ".pkl")


def _digest_file(path: Path, key: Optional[str]) -> str:
    import hmac

    h = hmac.new(key.encode(), digestmod=hashlib.sha256) if key else hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_state_manifest(folder: str | Path, rank: int, key: Optional[str] = None) -> Dict[str, str]:
    """Digests of the files this rank wrote into ``folder`` (its part of a Ray Train checkpoint)."""
    import os

    key = key if key is not None else os.environ.get(CHECKPOINT_KEY_ENV)
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): _digest_file(p, key) for p in sorted(folder.rglob("*"))
             if p.is_file() and not p.name.startswith("state-manifest-")}
    (folder / STATE_MANIFEST.format(rank=rank)).write_text(json.dumps({"keyed": bool(key), "files": files},
                                                                      indent=1, sort_keys=True))
    return files


def verify_state(folder: str | Path, key: Optional[str] = None) -> int:
    """Check a merged training checkpoint before anything in it is unpickled: every file a rank
    listed matches, and every unpicklable file is listed by some rank. Returns files checked."""
    import os

    key = key if key is not None else os.environ.get(CHECKPOINT_KEY_ENV)
    folder = Path(folder)
    manifests = sorted(folder.glob(STATE_MANIFEST.format(rank="*")))
    if not manifests:
        raise CheckpointError(f"{folder}: no state manifest: refusing to load a training checkpoint without one")
    covered: Dict[str, str] = {}
    for m in manifests:
        try:
            doc = json.loads(m.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{folder}: unreadable {m.name} ({exc})") from exc
        if doc.get("keyed") != bool(key):
            raise CheckpointError(f"{folder}: {m.name} was written {'with' if doc.get('keyed') else 'without'} "
                                  f"{CHECKPOINT_KEY_ENV}, and it is {'set' if key else 'not set'} now")
        covered.update(doc["files"])
    for rel, digest in covered.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{folder}: {rel} listed in the state manifest is missing")
        if _digest_file(path, key) != digest:
            raise CheckpointError(f"{folder}: digest of {rel} does not match the state manifest")
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and p.suffix in UNPICKLED and rel not in covered:
            raise CheckpointError(f"{folder}: {rel} is in no state manifest: refusing to unpickle it")
    return len(covered)


def load_local(folder: str | Path, verify: bool = True):
    """-> (state_dict, config, metrics) of a local checkpoint folder."""
    folder = Path(folder)
    if verify:
        verify_local(folder)
    state = load_file(str(folder / layout.WEIGHTS))
    config = json.loads((folder / layout.CONFIG).read_text())
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    return state, config, metrics


def new_run_id(prefix: str = "run") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{hashlib.sha1(str(time.time_ns()).encode()).hexdigest()[:6]}"


def publish(storage: Storage, folder: str | Path, model: str, run_id: str) -> str:
    """Upload a local checkpoint folder to ``checkpoints/<model>/<run_id>/``; returns its prefix."""
    prefix = layout.bundle(run_id, model)
    storage.upload_dir(folder, prefix)
    return prefix


def fetch(storage: Storage, prefix: str, dest: str | Path, verify: bool = True) -> Path:
    """Download a checkpoint and verify it against its manifest."""
    dest = Path(dest)
    storage.download_dir(prefix, dest)
    if verify:
        verify_local(dest)
    return dest
