"""The text encoder's one training loop (torch only, no Ray): contrastive fine-tuning on (item,
next item) text pairs from the training histories, so that an item's text lands near the text of
what users take next. Run by the Ray Train worker with a DeepSpeed stepper (ZeRO shards a large
encoder)."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from components.data.sequences import UserHistories
from components.models.text_encoder import TextEncoder, contrastive_loss


def next_item_pairs(h: UserHistories) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): every consecutive pair of different items in the training histories."""
    a = np.concatenate([s[:-1] for s in h.items if len(s) > 1])
    b = np.concatenate([s[1:] for s in h.items if len(s) > 1])
    differ = a != b
    return a[differ], b[differ]


def train_llm(stepper, encoder: TextEncoder, texts: List[str], pairs: tuple[np.ndarray, np.ndarray],
              steps: int, batch_size: int, temperature: float, progress: Optional[Dict[str, Any]] = None,
              rank: int = 0, world: int = 1,
              after_step: Callable[[Dict[str, Any], Dict[str, Any], bool], None] = lambda *a: None,
              tick: Callable[..., None] = lambda *a, **k: None) -> Dict[str, Any]:
    """``steps`` optimiser steps; each draws ``batch_size * world`` pairs (the same draw on every
    rank) and this rank embeds its slice, both sides in one forward. ``after_step(metrics,
    progress, last)``: report (and, at the last step, export ``progress["_best_state"]``)."""
    progress = progress or {"epoch": -1}
    a, b = pairs
    rng = np.random.default_rng(11)
    total, tokens = 0.0, 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    tick(0, total=steps, force=True)
    for step in range(progress["epoch"] + 1, steps):
        pick = rng.integers(0, len(a), batch_size * world)[rank * batch_size:(rank + 1) * batch_size]
        tok = encoder.tokenize([texts[k] for k in a[pick]] + [texts[k] for k in b[pick]])
        tokens += int(tok["attention_mask"].sum())
        emb = stepper(tok["input_ids"], tok["attention_mask"])  # one forward per step (FACTS.md)
        half = len(pick)
        loss = contrastive_loss(emb[:half], emb[half:], temperature)
        stepper.step(loss)
        total += float(loss.item())
        progress["epoch"] = step
        last = step == steps - 1
        tick(1, force=last, loss=float(loss.item()))
        metrics = {"step": step, "loss": float(loss.item())}
        if last:
            progress["_best_state"] = encoder.export_state(stepper.state())  # LoRA: the adapter only
            progress["best_metrics"] = {"contrastive_loss": stepper.mean(total / steps)}
            metrics["loss"] = progress["best_metrics"]["contrastive_loss"]
            # per worker, averaged over workers (as the retriever stage reports them)
            wall = time.perf_counter() - t0
            metrics["tokens_per_s_per_worker"] = round(stepper.mean(tokens / max(wall, 1e-9)), 1)
            metrics["cpu_busy_per_worker"] = round(stepper.mean((time.process_time() - cpu0) / max(wall, 1e-9)), 2)
        after_step(metrics, progress, last)
    return progress
