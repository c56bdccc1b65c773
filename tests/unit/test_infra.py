"""infra/ manifests: every Ray cluster they create runs with token auth (the dashboard and jobs
API listen on 0.0.0.0 inside the cluster network), where the KubeRay CRD schema allows it."""

import copy
import functools
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT, SHARED_DATA

CRDS = SHARED_DATA / "kuberay-crds"
# manifest -> (CRD file, path from spec to the cluster spec)
MANIFESTS = {"raycluster.yaml": ("rayclusters", []), "rayjob-preprocess.yaml": ("rayjobs", ["rayClusterSpec"]),
             "rayjob-retrain.yaml": ("rayjobs", ["rayClusterSpec"]),
             "rayservice.yaml": ("rayservices", ["rayClusterConfig"])}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_every_ray_cluster_uses_token_auth(name):
    crd, path = MANIFESTS[name]
    spec = yaml.safe_load((ROOT / "infra" / name).read_text())["spec"]
    for key in path:
        spec = spec[key]
    assert spec["authOptions"]["mode"] == "token"
    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} not found: schema part not checked")
    schema = yaml.safe_load((CRDS / f"ray.io_{crd}.yaml").read_text())
    props = schema["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    for key in path:
        props = props[key]["properties"]
    assert "token" in props["authOptions"]["properties"]["mode"]["enum"]


def test_the_public_rayservice_gets_api_keys_on_every_node():
    """The RayService binds Serve to 0.0.0.0, where the ingress refuses to run without keys."""
    spec = yaml.safe_load((ROOT / "infra" / "rayservice.yaml").read_text())["spec"]
    assert yaml.safe_load(spec["serveConfigV2"])["http_options"]["host"] == "0.0.0.0"
    cluster = spec["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            assert "llmrec-api-keys" in refs, container["name"]
            env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
            from serve.runner import SERVE_ENV

            assert env == SERVE_ENV, container["name"]  # the fast path the benchmark measured


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_every_container_gets_the_checkpoint_key_from_the_secret(name):
    """Jobs refuse to run on a cluster without LLMREC_CHECKPOINT_KEY (jobs/runtime.py), and the Ray
    Train workers sign and verify checkpoints with it: every pod of every cluster reads it from the
    Secret the manifest's comment says how to create."""
    from components.checkpoints import CHECKPOINT_KEY_ENV

    text = (ROOT / "infra" / name).read_text()
    assert "kubectl create secret generic llmrec-checkpoint-key --from-literal=key=" in text
    spec = _spec(name)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for c in _containers(group):
            env = [e for e in c.get("env", []) if e["name"] == CHECKPOINT_KEY_ENV]
            assert env == [{"name": CHECKPOINT_KEY_ENV,
                            "valueFrom": {"secretKeyRef": {"name": "llmrec-checkpoint-key", "key": "key"}}}], \
                (name, group.get("groupName", "head"), c["name"])


def test_the_cluster_launcher_starts_every_node_with_the_checkpoint_key():
    from components.checkpoints import CHECKPOINT_KEY_ENV

    doc = yaml.safe_load((ROOT / "infra" / "cluster-launcher.yaml").read_text())
    key_file = "~/.llmrec/checkpoint_key"
    assert doc["file_mounts"][key_file] == key_file
    for section in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in doc[section] if "ray start" in c]
        assert start and all(f"{CHECKPOINT_KEY_ENV}=$(cat {key_file}) ray start" in c for c in start), section


# --- offline validation against the KubeRay CRD schemas (what `kubectl apply` would check) -------
def _crd_schema(kind: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} not found: the KubeRay CRD schemas are needed to validate manifests")
    return _load_crd_schema(kind)


@functools.lru_cache(maxsize=None)
def _load_crd_schema(kind: str) -> dict:
    crd = yaml.load((CRDS / f"ray.io_{kind}.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def _strict(schema):
    """A Kubernetes structural schema as JSON Schema: unknown fields are errors (kubectl's default
    strict field validation) unless the schema preserves them; int-or-string accepts both."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _apply_defaults(obj, schema):
    """Fill the schema's defaults into ``obj`` where absent, as the API server does on admission."""
    if isinstance(obj, dict) and isinstance(schema.get("properties"), dict):
        for key, sub in schema["properties"].items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                _apply_defaults(obj[key], sub)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            _apply_defaults(item, schema["items"])
    return obj


def validate_manifest(doc: dict) -> list:
    kind = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}[doc["kind"]]
    schema = copy.deepcopy(_crd_schema(kind))
    doc = _apply_defaults(copy.deepcopy(doc), schema)
    validator = jsonschema.Draft7Validator(_strict(schema))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_is_valid_against_the_kuberay_crd(name):
    doc = yaml.safe_load((ROOT / "infra" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    assert validate_manifest(doc) == []


def test_the_validator_catches_typos_wrong_types_and_missing_fields():
    doc = yaml.safe_load((ROOT / "infra" / "raycluster.yaml").read_text())
    bad = copy.deepcopy(doc)
    bad["spec"]["headGroupSpec"]["rayStartParam"] = {}  # typo of rayStartParams
    bad["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    del bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    errors = "\n".join(validate_manifest(bad))
    assert "rayStartParam'" in errors and "'two' is not of type 'integer'" in errors
    assert "'name' is a required property" in errors


@pytest.mark.parametrize("name", ["rayjob-preprocess.yaml", "rayjob-retrain.yaml"])
def test_rayjob_entrypoints_run_real_jobs_with_real_settings(name):
    """The entrypoint's module exists and its settings load through the job's config schema."""
    import importlib
    import shlex

    from components.config import parse_cli

    argv = shlex.split(yaml.safe_load((ROOT / "infra" / name).read_text())["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs.")
    module = importlib.import_module(argv[2])
    assert callable(getattr(module, "main", None))
    args = argv[3:]
    if args[:1] == ["--config"]:
        assert (ROOT / args[1]).is_file(), args[1]
        args = ["--config", str(ROOT / args[1]), *args[2:]]
    cfg = parse_cli(args)  # unknown or ill-typed settings raise ConfigError
    assert cfg.storage.root.startswith("s3://")


def test_rayservice_serves_the_shipped_config_with_cluster_overrides():
    """serveConfigV2 is configs/serve-fused.yaml (what `make run` and the benchmark serve) with only
    the settings a cluster must change."""
    from serve.runner import kuberay_serve_config

    spec = yaml.safe_load((ROOT / "infra" / "rayservice.yaml").read_text())["spec"]
    assert yaml.safe_load(spec["serveConfigV2"]) == kuberay_serve_config()


def test_the_image_installs_what_make_setup_installs():
    docker = (ROOT / "infra" / "Dockerfile").read_text()
    make = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"torch==[\d.]+", make).group(0)
    assert torch_pin in docker and "pip install --no-cache-dir /app" in docker
    ray_pin = re.search(r'"ray\[[^\]]+\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"rayproject/ray:{ray_pin}-" in docker


def test_grafana_dashboard_charts_metrics_that_exist():
    """infra/grafana-dashboard.json: every PromQL name is one the project or Ray Serve exports, all
    under Ray's ray_ namespace: the jobs' gauges (jobs/telemetry.py), the ingress replicas' metrics
    (serve/metrics.py, with the suffix of their kind) and Ray Serve's own (named in Ray's source)."""
    import json

    import ray.serve

    from jobs.telemetry import METRICS as JOB_METRICS
    from serve.metrics import METRICS as INGRESS_METRICS

    dash = json.loads((ROOT / "infra" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]
    assert len(exprs) >= 12
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = {f"ray_{name}" for name in JOB_METRICS}
    exported |= {f"ray_{name}{s}" for name, (kind, _, _) in INGRESS_METRICS.items() for s in suffixes[kind]}
    serve_src = "".join(p.read_text() for p in (Path(ray.serve.__file__).parent / "_private").rglob("*.py"))
    names = {n for e in exprs for n in re.findall(r"\b((?:ray_)?(?:llmrec|serve)_[a-z0-9_]+)", e)}
    assert {n for n in names if n.startswith("ray_llmrec_request")} and {n for n in names if n.startswith("ray_serve_")}
    assert {n for n in names if n.startswith("ray_llmrec_job")}
    for n in names:
        assert n.startswith("ray_"), n  # Ray exports everything under its namespace
        if n.startswith("ray_llmrec_"):
            assert n in exported, (n, sorted(exported))
        else:
            base = re.sub(r"_(total|bucket|sum|count)$", "", n[len("ray_"):])
            assert f'"{base}"' in serve_src, n
    # the labels a query groups or selects the project's metrics by are tags they carry (Ray Serve
    # adds deployment, replica and application to the ingress's)
    tags = {f"ray_{name}": set(keys) for name, (_, keys) in JOB_METRICS.items()}
    tags |= {f"ray_{name}{s}": {*keys, "deployment", "replica", "application", "le"}
             for name, (kind, _, keys) in INGRESS_METRICS.items() for s in suffixes[kind]}
    for e in exprs:
        for n in re.findall(r"\b(ray_llmrec_[a-z0-9_]+)", e):
            used = {x.strip() for by in re.findall(r"by \(([^)]*)\)", e) for x in by.split(",")}
            used |= set(re.findall(r"(\w+)=", "".join(re.findall(n + r"\{([^}]*)\}", e))))
            assert used <= tags[n], (e, used - tags[n])


def test_deployment_options_from_the_config_are_overridden_per_deployment():
    from serve.runner import deployment_options, load_serve_config

    app = load_serve_config("configs/serve-fused.yaml")["app"]
    two = {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2}}
    opts = deployment_options(app, {"Ingress": two})
    assert opts["Ingress"]["autoscaling_config"] == two["autoscaling_config"]
    assert opts["Ingress"]["max_ongoing_requests"] == 64  # untouched options stay
    assert opts["EventStore"] == deployment_options(app)["EventStore"]


def test_serve_settings_are_typed_and_refuse_unknown_args():
    """The Serve app args (serve/settings.py): every arg the shipped YAMLs set is a known, typed
    setting; defaults <- YAML args <- overrides; an unknown or invalid arg fails with its name."""
    from components.config import ConfigError
    from serve.runner import load_serve_config
    from serve.settings import load_settings

    for path in ("configs/serve.yaml", "configs/serve-fused.yaml"):
        args = load_serve_config(path)["app"]["args"]
        s = load_settings(args, {"watch_interval_s": 1, "live_state_shards": "2"})
        assert s.watch_interval_s == 1.0 and s.live_state_shards == 2 and s.rate_limit == args["rate_limit"]
        assert s.mode == args.get("mode", "graph") and s.startup_timeout_s == 120.0  # a default the YAML leaves
    for bad, name in (({"colour": "red"}, "colour"), ({"candidates": "many"}, "candidates"),
                      ({"mode": "async"}, "mode"), ({"live_state_shards": 0}, "live_state_shards"),
                      ({"rate_limit": "lots"}, "rate_limit"), ({"precision": "int8"}, "precision")):
        with pytest.raises(ConfigError, match=name):
            load_settings(bad)


# --- manifests that schedule: resources agree with the presets they run, images pinned ------------
def _spec(name: str) -> dict:
    crd, path = MANIFESTS[name]
    spec = yaml.safe_load((ROOT / "infra" / name).read_text())["spec"]
    for key in path:
        spec = spec[key]
    return spec


def _containers(group: dict) -> list:
    return group["template"]["spec"]["containers"]


def _gpus(group: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in _containers(group))


@pytest.mark.parametrize("name", ["rayjob-preprocess.yaml", "rayjob-retrain.yaml"])
def test_every_rayjob_has_the_pods_its_preset_asks_for(name):
    """A RayJob's ephemeral cluster does not autoscale: its fixed worker groups must hold the
    Ray Train workers of the preset its entrypoint names (one GPU each when the preset uses GPUs)."""
    import shlex

    from components.config import parse_cli

    argv = shlex.split(yaml.safe_load((ROOT / "infra" / name).read_text())["spec"]["entrypoint"])
    cfg = parse_cli(argv[3:])
    groups = _spec(name)["workerGroupSpecs"]
    for g in groups:  # fixed size: what it asks for is what it gets
        assert g.get("minReplicas", g["replicas"]) == g["replicas"] == g.get("maxReplicas", g["replicas"]), g["groupName"]
    if cfg.train.use_gpu:
        assert sum(g["replicas"] * _gpus(g) for g in groups) >= cfg.train.num_workers
    else:
        cpus = sum(g["replicas"] * float(_containers(g)[0]["resources"]["limits"]["cpu"]) for g in groups)
        assert cpus >= cfg.train.num_workers


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayservice.yaml"])
def test_long_lived_clusters_autoscale_and_groups_that_start_empty_can_grow(name):
    spec = _spec(name)
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] > 0


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_images_are_pinned_to_the_package_version_and_gpu_pods_run_the_gpu_image(name):
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    spec = _spec(name)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        want = f"ghcr.io/example/llmrec:{version}" + ("-gpu" if _gpus(group) else "")
        assert [c["image"] for c in _containers(group)] == [want] * len(_containers(group))


def test_a_model_path_a_preset_names_is_mounted_in_every_pod_that_runs_it():
    """`--preset gpu-cluster` reads text.model from /models: every pod of the cluster that runs it
    mounts a volume there."""
    from components.config import parse_cli

    model = parse_cli(["--preset", "gpu-cluster"]).text.model
    assert model.startswith("/")
    for name in ("raycluster.yaml", "rayjob-retrain.yaml"):
        spec = _spec(name)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            volumes = {v["name"] for v in group["template"]["spec"].get("volumes", [])}
            for c in _containers(group):
                mounts = [m for m in c.get("volumeMounts", []) if m["name"] in volumes]
                assert any(model.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), (name, c["name"])


def test_the_image_context_leaves_out_the_environment_history_and_outputs():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv/", ".git/", "storage/", "results/"):
        assert path in ignored, path
