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
