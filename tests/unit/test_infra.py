"""infra/ manifests: every Ray cluster they create runs with token auth (the dashboard and jobs
API listen on 0.0.0.0 inside the cluster network), where the KubeRay CRD schema allows it."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "data" / "kuberay-crds"
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
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            from serve.runner import SERVE_ENV

            assert env == SERVE_ENV, container["name"]  # the fast path the benchmark measured
