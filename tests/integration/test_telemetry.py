"""Job metrics reach Prometheus through Ray's metrics API (jobs/telemetry.py), from the driver and
from a worker process, and the ingress replicas' metrics through Ray Serve's (serve/metrics.py),
summed over replicas by GET /metrics, on the local Ray the other integration tests use."""

import threading
import time
import urllib.request

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from jobs import telemetry
from jobs.quick_train import build_bundle
from serve import runner
from tests.conftest import free_port

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


def _samples(text, name, **labels):
    """[(labels, value)] of the samples ``name`` of a Prometheus exposition that carry ``labels``."""
    return [(s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def _per_replica(samples):
    out = {}
    for labels, value in samples:
        out[labels.get("replica")] = out.get(labels.get("replica"), 0.0) + value
    return out


@pytest.mark.serve
def test_the_endpoint_sums_the_request_counts_of_two_ingress_replicas(ray_local, tmp_path):
    """Issue 23.4: each ingress replica records its own series through Ray Serve's metrics API,
    exported by the node's Ray metrics agent, and GET /metrics (whichever replica answers it)
    gathers them from every node's agent: the counts of both replicas add up to the requests sent."""
    from ray import serve

    run_id = "telemetry-test"
    root = tmp_path / "store"
    build_bundle(root, run_id=run_id, epochs=2, force_promote=True)
    two = {"Ingress": {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2}}}
    url = runner.start("configs/serve-fused.yaml", {"storage_root": str(root), "deployment_options": two},
                       port=free_port())
    recommend = {"route": "recommend", "status": "200"}
    try:
        deadline = time.time() + 60
        while dict(serve.status().applications["recommender"].deployments["Ingress"].replica_states) != {
                "RUNNING": 2}:
            assert time.time() < deadline, serve.status().applications["recommender"].deployments["Ingress"]
            time.sleep(0.5)
        # Counters of the apps that earlier tests started stay in the agent (under other replica
        # tags): count from what it holds now.
        before = _per_replica(_samples(requests.get(url + "/metrics", timeout=30).text,
                                       "ray_llmrec_requests_total", **recommend))

        statuses, stop = [], threading.Event()
        users = [f"u{k:07d}" for k in range(1, 30)]

        def client(offset):  # a new connection per request, so the load balancer spreads them
            k = offset
            while not stop.is_set():
                try:
                    r = requests.post(url + "/v1/recommend", json={"user_id": users[k % len(users)], "k": 5},
                                      timeout=30)
                    statuses.append(r.status_code)
                except Exception as exc:
                    statuses.append(repr(exc))
                k += 1
                time.sleep(0.02)

        threads = [threading.Thread(target=client, args=(j,)) for j in range(6)]
        for t in threads:
            t.start()
        time.sleep(5.0)  # long enough for the load balancer to route to both replicas
        stop.set()
        for t in threads:
            t.join()
        sent = len(statuses)
        assert sent >= 20 and set(statuses) == {200}, [s for s in statuses if s != 200][:3]

        deadline, text, grown, info = time.time() + 90, "", {}, {}
        while time.time() < deadline:  # the agent exports on its report interval (10 s by default)
            text = requests.get(url + "/metrics", timeout=30).text
            now = _per_replica(_samples(text, "ray_llmrec_requests_total", **recommend))
            grown = {r: v - before.get(r, 0.0) for r, v in now.items() if v > before.get(r, 0.0)}
            info = _per_replica(_samples(text, "ray_llmrec_model_info", model="retriever", model_version=run_id))
            if sum(grown.values()) == sent and len(grown) == 2 and all(info.get(r) == 1 for r in grown):
                break
            time.sleep(2)
    finally:
        serve.shutdown()
    lines = [ln for ln in text.splitlines() if ln.startswith("ray_llmrec_requests_total")]
    assert sum(grown.values()) == sent, (grown, sent, lines)  # the totals of all replicas
    assert len(grown) == 2, lines  # both replicas answered, each counted in its own series
    for labels, _ in _samples(text, "ray_llmrec_requests_total", **recommend):
        if labels["replica"] in grown:
            assert (labels["deployment"], labels["application"], labels["model_version"]) == (
                "Ingress", "recommender", run_id), labels
    assert all(info.get(r) == 1 for r in grown), info  # each replica records the model version it serves
    types = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE ")]
    assert len(types) == len(set(types)) and all(t.startswith("ray_llmrec_") for t in types), types
