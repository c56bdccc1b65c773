"""The ingress's metrics (serve/metrics.py) and the logging encoding plumbing, without Ray: what is
recorded, how GET /metrics merges the node agents' expositions, and which LoggingConfig the jobs
and the Serve app are given."""

import time
from contextlib import nullcontext

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve import metrics as sm


class Recorded:
    """Stands in for a ray.serve.metrics Counter/Gauge/Histogram: every call it gets."""

    def __init__(self, name, kind, description, tag_keys):
        self.name, self.kind, self.tag_keys, self.calls = name, kind, tag_keys, []

    def inc(self, value=1.0, tags=None):
        self.calls.append(("inc", value, tags))

    def observe(self, value, tags=None):
        self.calls.append(("observe", value, tags))

    def set(self, value, tags=None):
        self.calls.append(("set", value, tags))


@pytest.fixture
def recorded():
    made = {}

    def factory(name, kind, description, tag_keys):
        made[name] = Recorded(name, kind, description, tag_keys)
        return made[name]

    return sm.IngressMetrics(factory), made


def test_requests_are_recorded_by_route_status_and_model_version(recorded):
    m, made = recorded
    m.observe("recommend", time.perf_counter(), 200, "run-7")
    m.observe("events", time.perf_counter(), 503)
    m.recommended(10)
    m.recommended(0)  # Ray's counters refuse 0: an empty answer records nothing rather than failing
    m.ingested(3)
    m.stale_retry()
    assert made["llmrec_requests"].calls == [
        ("inc", 1.0, {"route": "recommend", "status": "200", "model_version": "run-7"}),
        ("inc", 1.0, {"route": "events", "status": "503", "model_version": ""})]
    [(op, seconds, tags), _] = made["llmrec_request_seconds"].calls
    assert op == "observe" and 0 <= seconds < 1 and tags == {"route": "recommend"}
    assert made["llmrec_recommendations_served"].calls == [("inc", 10, None)]
    assert made["llmrec_events_ingested"].calls == [("inc", 3, None)]
    assert made["llmrec_stale_version_retries"].calls == [("inc", 1.0, None)]


def test_a_swapped_out_version_drops_to_zero_so_the_gauge_sums_to_replicas_per_version(recorded):
    m, made = recorded

    def status(version, swaps):
        return {name: {"version": version, "swaps": swaps} for name in sm.MODEL_DEPLOYMENTS}

    m.set_versions(status("v1", 0))
    m.set_versions(status("v1", 0))
    m.set_versions(status("v2", 1))
    info = [c for c in made["llmrec_model_info"].calls if c[2]["model"] == "retriever"]
    assert info == [("set", 1, {"model": "retriever", "model_version": "v1"})] * 2 + [
        ("set", 0, {"model": "retriever", "model_version": "v1"}),
        ("set", 1, {"model": "retriever", "model_version": "v2"})]
    assert made["llmrec_model_swaps"].calls[-1] == ("set", 1, {"model": "text"})


def test_outside_a_serve_replica_nothing_is_recorded():
    m = sm.IngressMetrics()  # a unit test is no Serve replica
    assert isinstance(m._requests, sm._NotRecorded) and isinstance(m._info, sm._NotRecorded)
    m.observe("recommend", time.perf_counter(), 200, "v")
    m.set_versions({name: {"version": "v", "swaps": 0} for name in sm.MODEL_DEPLOYMENTS})


def test_the_metrics_are_valid_for_ray_serve():
    """Tag keys a tuple and none of the tags Ray Serve adds; Ray accepts every declaration."""
    from ray.serve import metrics as ray_metrics

    reserved = {ray_metrics.DEPLOYMENT_TAG, ray_metrics.REPLICA_TAG, ray_metrics.APPLICATION_TAG}
    for name, (kind, description, tag_keys) in sm.METRICS.items():
        assert isinstance(tag_keys, tuple) and not reserved & set(tag_keys), name
        assert name.startswith("llmrec_") and description
        assert isinstance(sm.serve_metric(name, kind, description, tag_keys),
                          {"counter": ray_metrics.Counter, "gauge": ray_metrics.Gauge,
                           "histogram": ray_metrics.Histogram}[kind])


def _node(replica: str, requests: int, version: str = "v1") -> str:
    """A node agent's exposition: the llmrec series of one replica among Ray's own."""
    tags = f'application="recommender",deployment="Ingress",replica="{replica}"'
    return "\n".join([
        "# HELP ray_tasks Current number of tasks",
        "# TYPE ray_tasks gauge",
        'ray_tasks{State="RUNNING"} 3.0',
        "# HELP ray_llmrec_requests_total Requests by route",
        "# TYPE ray_llmrec_requests_total counter",
        f'ray_llmrec_requests_total{{{tags},model_version="{version}",route="recommend",status="200"}} {requests}.0',
        "# HELP ray_llmrec_request_seconds Request latency by route",
        "# TYPE ray_llmrec_request_seconds histogram",
        f'ray_llmrec_request_seconds_bucket{{{tags},le="0.1",route="recommend"}} {requests}.0',
        f'ray_llmrec_request_seconds_bucket{{{tags},le="+Inf",route="recommend"}} {requests}.0',
        f'ray_llmrec_request_seconds_count{{{tags},route="recommend"}} {requests}.0',
        f'ray_llmrec_request_seconds_sum{{{tags},route="recommend"}} 0.5',
        "# HELP target_info Target metadata",
        "# TYPE target_info gauge",
        'target_info{service_name="ray-dashboard-agent"} 1.0',
        ""])


def test_the_endpoint_merges_every_node_agent_into_one_valid_exposition():
    merged = sm.merge_families([_node("r1", 3), _node("r2", 4)], sm.EXPORTED_PREFIX)
    assert "ray_tasks" not in merged and "target_info" not in merged
    assert merged.count("# TYPE ray_llmrec_requests_total counter") == 1
    assert merged.count("# HELP ray_llmrec_request_seconds ") == 1
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    requests = [s for s in families["ray_llmrec_requests"].samples if s.name.endswith("_total")]
    assert sorted(s.labels["replica"] for s in requests) == ["r1", "r2"]
    assert sum(s.value for s in requests) == 7  # the totals of all replicas
    counts = [s for s in families["ray_llmrec_request_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in counts) == 7
    # a series repeated by a second exposition is kept once (an exposition may not repeat one)
    assert sm.merge_families([_node("r1", 3), _node("r1", 5)], sm.EXPORTED_PREFIX).count(
        "ray_llmrec_requests_total{") == 1
    assert sm.merge_families(["# HELP ray_tasks x\nray_tasks 1\n"], sm.EXPORTED_PREFIX) == ""


def test_the_endpoint_asks_every_alive_node_and_skips_one_that_does_not_answer(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [
        {"Alive": True, "NodeManagerAddress": "10.0.0.1", "MetricsExportPort": 8080},
        {"Alive": True, "NodeManagerAddress": "10.0.0.2", "MetricsExportPort": 8080},
        {"Alive": False, "NodeManagerAddress": "10.0.0.3", "MetricsExportPort": 8080},
        {"Alive": True, "NodeManagerAddress": "10.0.0.4", "MetricsExportPort": -1},  # metrics off
        {"Alive": True, "NodeManagerAddress": "fd00::5", "MetricsExportPort": 8080}])
    answers = {"http://10.0.0.1:8080/metrics": _node("r1", 3), "http://10.0.0.2:8080/metrics": None,
               "http://[fd00::5]:8080/metrics": _node("r2", 4)}
    asked = []

    def fetch(url, timeout):
        asked.append(url)
        return answers[url]

    assert sm.fetch_exposition("http://[fd00::5/metrics") is None  # a failure is logged, not raised
    monkeypatch.setattr(sm, "fetch_exposition", fetch)
    merged = sm.cluster_exposition()
    assert sorted(asked) == sorted(answers)
    assert 'replica="r1"' in merged and 'replica="r2"' in merged


def test_an_ingress_replica_refreshes_its_model_info_and_answers_metrics_of_the_cluster(monkeypatch, recorded):
    """Prometheus scrapes the agents, not the replica: the replica records its models' versions on
    its own clock, and GET /metrics answers what the agents gathered (serve/ingress.py)."""
    import asyncio

    from serve import ingress

    m, made = recorded
    asked = []

    class Replica:  # the ingress's state the two methods read
        metrics = m

        async def _model_status(self):
            asked.append(1)
            if len(asked) == 2:
                raise RuntimeError("a deployment restarting")  # logged; the next round records
            return {name: {"version": "v1", "swaps": 0} for name in sm.MODEL_DEPLOYMENTS}

    cls = ingress.Ingress.func_or_class
    # serve.ingress copied the class with its own globals when it decorated it: patch those
    monkeypatch.setitem(cls._record_model_info.__globals__, "MODEL_INFO_REFRESH_S", 0.01)
    monkeypatch.setitem(cls.prometheus.__globals__, "cluster_exposition", lambda: "ray_llmrec_requests_total 3.0\n")

    async def run():
        task = asyncio.get_running_loop().create_task(cls._record_model_info(Replica()))
        while len(asked) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        return await cls.prometheus(Replica())

    answer = asyncio.run(run())
    assert answer.body == b"ray_llmrec_requests_total 3.0\n" and answer.media_type == sm.CONTENT_TYPE
    assert [c for c in made["llmrec_model_info"].calls if c[2]["model"] == "text"][:2] == [
        ("set", 1, {"model": "text", "model_version": "v1"})] * 2


# --- logging encoding: jobs (ray.init) and the Serve app ----------------------------------------
def test_a_jobs_ray_session_gets_the_configured_log_encoding(monkeypatch):
    import ray

    from components.config import load_config
    from jobs import runtime

    monkeypatch.delenv("RAY_LOGGING_CONFIG_ENCODING", raising=False)
    cfg = load_config(["ray.log_encoding=json", "ray.address=ray://head:10001"])
    assert runtime.ray_logging_config(cfg.ray, "WARNING") == ray.LoggingConfig(encoding="JSON", log_level="WARNING")
    assert runtime.ray_logging_config(load_config([]).ray, "INFO").encoding == "TEXT"
    monkeypatch.setenv("RAY_LOGGING_CONFIG_ENCODING", "JSON")  # Ray's own variable, when the config is silent
    assert runtime.ray_logging_config(load_config([]).ray, "INFO").encoding == "JSON"

    seen = {}
    monkeypatch.setenv("LLMREC_RAY_LOGS", "1")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with runtime.ray_session(load_config(["ray.log_encoding=TEXT", "ray.address=ray://head:10001"]).ray):
        pass
    assert seen["address"] == "ray://head:10001"
    assert seen["logging_config"] == ray.LoggingConfig(encoding="TEXT", log_level="INFO")


def test_a_log_encoding_other_than_text_or_json_is_refused_by_name():
    from components.config import ConfigError, load_config

    for key in ("ray.log_encoding", "serve.log_encoding"):
        with pytest.raises(ConfigError, match=f"{key} must be TEXT or JSON"):
            load_config([f"{key}=XML"])
    assert load_config(["serve.log_encoding=JSON"]).serve.log_encoding == "JSON"


def test_the_serve_app_gets_the_configured_log_encoding_over_the_yamls():
    from ray.serve.schema import LoggingConfig

    from serve.runner import load_serve_config, serve_logging_config

    yaml_config = load_serve_config("configs/serve-fused.yaml")["logging_config"]
    assert yaml_config["encoding"] == "TEXT"
    assert serve_logging_config(yaml_config) == yaml_config  # unset: the YAML decides
    json_config = serve_logging_config(yaml_config, "json")
    assert json_config == {**yaml_config, "encoding": "JSON"}
    assert LoggingConfig(**json_config).encoding == "JSON"  # what serve.start/serve.run validate it as
    assert serve_logging_config(None, "JSON") == {"encoding": "JSON"}
    with pytest.raises(ValueError, match="TEXT or JSON"):
        serve_logging_config(yaml_config, "XML")


def test_jobs_serve_passes_serve_log_encoding_to_the_app(monkeypatch, tmp_path):
    from components import registry
    from components.config import load_config
    from jobs import serve as serve_job
    from serve import runner

    started = {}
    monkeypatch.setattr(registry, "read_pointer", lambda storage: {"run_id": "r"})
    monkeypatch.setattr(serve_job, "ray_session", lambda ray_cfg: nullcontext())
    monkeypatch.setattr(runner, "start", lambda *a, **kw: started.update(kw) or "http://127.0.0.1:1")
    monkeypatch.setattr(runner, "serve_until_signal", lambda url: None)
    serve_job.main(load_config([f"storage.root={tmp_path}", "serve.log_encoding=JSON"]))
    assert started["log_encoding"] == "JSON"
