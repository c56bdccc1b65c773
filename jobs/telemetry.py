"""Job metrics through Ray's metrics API, the way Ray users collect them.

``ray.util.metrics`` gauges, recorded from the job driver and from Ray Train workers, are exported
by every node's metrics agent in Prometheus format (``http://<node>:<metrics-export-port>/metrics``;
Ray's ``/tmp/ray/session_latest/metrics/prometheus`` service discovery, or KubeRay's pod
annotations, point Prometheus at them). ``infra/grafana-dashboard.json`` charts them next to the
Serve metrics. Every gauge carries the run id, so runs do not overwrite each other.

Recording never fails a job: without Ray, or on any error, it does nothing.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, Mapping, Tuple

log = logging.getLogger(__name__)

# name -> (description, tag keys). Prometheus sees them under Ray's namespace: ray_llmrec_....
METRICS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "llmrec_job_rows": ("Rows a job read, kept or set aside, by kind (preprocess: raw, quarantined, "
                        "duplicates, kcore_dropped, interactions, users, items)", ("job", "run", "kind")),
    "llmrec_train_loss": ("Training loss of the last epoch (or step) reported", ("stage", "run")),
    "llmrec_train_samples_per_second": ("Training samples a second over all workers, last epoch",
                                        ("stage", "run")),
    "llmrec_train_epoch": ("Last finished training epoch (or step)", ("stage", "run")),
    "llmrec_train_valid_ndcg10": ("Validation NDCG@10 at the last evaluation during training", ("stage", "run")),
    "llmrec_eval_metric": ("Offline evaluation of a model on a split (jobs.evaluate)",
                           ("run", "model", "split", "metric")),
    "llmrec_stage_seconds": ("Wall time of a job stage", ("job", "run", "stage")),
}

_gauges: Dict[str, Any] = {}
_lock = threading.Lock()


def _gauge(name: str):
    with _lock:
        g = _gauges.get(name)
        if g is None:
            from ray.util.metrics import Gauge

            desc, tags = METRICS[name]
            g = _gauges[name] = Gauge(name, description=desc, tag_keys=tags)
        return g


def record(name: str, value: float, **tags: Any) -> None:
    """Set gauge ``name`` (one of ``METRICS``) to ``value`` for ``tags``; a no-op without Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return
        _gauge(name).set(float(value), tags={k: str(v) for k, v in tags.items()})
    except Exception as exc:  # metrics are best effort
        log.debug("metric %s not recorded: %s", name, exc)


def record_many(name: str, values: Mapping[str, float], key: str, **tags: Any) -> None:
    """``record(name, v, **tags, key=k)`` for every ``k, v`` of ``values`` that is a number."""
    for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            record(name, v, **tags, **{key: k})


def training(stage: str, run: str, metrics: Mapping[str, Any], samples: int) -> None:
    """One training report: loss, epoch (or step), samples/s over ``epoch_s``, valid NDCG@10."""
    if "loss" in metrics:
        record("llmrec_train_loss", metrics["loss"], stage=stage, run=run)
    step = metrics.get("epoch", metrics.get("step"))
    if step is not None:
        record("llmrec_train_epoch", step, stage=stage, run=run)
    if metrics.get("epoch_s"):
        record("llmrec_train_samples_per_second", samples / metrics["epoch_s"], stage=stage, run=run)
    if "valid_ndcg@10" in metrics:
        record("llmrec_train_valid_ndcg10", metrics["valid_ndcg@10"], stage=stage, run=run)
