"""Job metrics reach Prometheus through Ray's metrics API (jobs/telemetry.py), from the driver and
from a worker process, on the local Ray the other integration tests use."""

import time
import urllib.request

import pytest

from jobs import telemetry

pytestmark = [pytest.mark.ray]


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_job_metrics_are_exported_in_prometheus_format(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def worker_reports():  # as a Ray Train worker does, in its own process
        telemetry.training("retriever", "run-telemetry-test", {"epoch": 3, "loss": 2.5, "epoch_s": 2.0,
                                                              "valid_ndcg@10": 0.25}, samples=1000)
        return True

    assert ray.get(worker_reports.remote())
    telemetry.record_many("llmrec_job_rows", {"raw": 100, "quarantined": 7, "note": "not a number"}, "kind",
                          job="preprocess", run="run-telemetry-test")
    port = ray.nodes()[0]["MetricsExportPort"]
    # Ray exports every metric under its "ray_" namespace
    want = ['ray_llmrec_train_loss{', 'ray_llmrec_train_samples_per_second{', 'ray_llmrec_train_valid_ndcg10{',
            'ray_llmrec_job_rows{']
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:  # the metrics agent exports on its report interval
        text = _scrape(port)
        if all(w in text for w in want):
            break
        time.sleep(2)
    lines = [ln for ln in text.splitlines() if "run-telemetry-test" in ln]
    assert all(w in text for w in want), "\n".join(lines) or text[-2000:]

    def value(name, **tags):
        for ln in lines:
            if ln.startswith(name + "{") and all(f'{k}="{v}"' in ln for k, v in tags.items()):
                return float(ln.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} {tags} not in:\n" + "\n".join(lines))

    assert value("ray_llmrec_train_loss", stage="retriever") == 2.5
    assert value("ray_llmrec_train_samples_per_second", stage="retriever") == 500.0
    assert value("ray_llmrec_job_rows", kind="quarantined", job="preprocess") == 7.0
    assert not any('kind="note"' in ln for ln in lines)  # only numbers are recorded


def test_recording_without_ray_does_nothing_and_never_raises(monkeypatch, caplog):
    import ray

    sets = []

    class Gauge:  # stands in for ray.util.metrics.Gauge: what would be exported
        def set(self, value, tags):
            sets.append((value, tags))

    real_gauge = telemetry._gauge
    monkeypatch.setattr(telemetry, "_gauge", lambda name: Gauge())
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    telemetry.record("llmrec_train_loss", 1.0, stage="x", run="y")  # no Ray: a no-op
    assert sets == []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    telemetry.record("llmrec_train_loss", 2, stage="x", run=7)  # the same call with Ray is recorded
    assert sets == [(2.0, {"stage": "x", "run": "7"})]
    monkeypatch.setattr(telemetry, "_gauge", real_gauge)
    caplog.set_level("DEBUG", logger=telemetry.log.name)
    telemetry.record("no_such_metric", 1.0)  # an unknown name is logged, not raised
    assert "no_such_metric not recorded" in caplog.text and "no_such_metric" not in telemetry._gauges


def test_a_stage_bar_follows_ticks_from_a_worker_process(ray_local):
    """Ray Train workers tick the driver's stage bar through a named actor (jobs/progress.py)."""
    import io

    from jobs.progress import Ticker, stage

    ray = ray_local

    @ray.remote(num_cpus=0)
    def worker(actor_name):  # rank 0 of a training stage, in its own process
        t = Ticker(actor_name)
        t.tick(0, total=30, force=True)
        for step in range(30):
            t.tick(1, force=step == 29, epoch=step // 10)
        return True

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    with stage("train ranker", unit="step", remote=True, file=out) as bar:
        assert ray.get(worker.remote(bar.actor_name))
    assert (bar.n, bar.total) == (30, 30)
    assert "30/30" in out.getvalue().split("\r")[-1] and "epoch=2" in out.getvalue()
    with pytest.raises(ValueError):  # the stage's actor is gone with the stage
        ray.get_actor(bar.actor_name, namespace="llmrec")
