"""Two Ray nodes on one machine with S3 (moto on loopback) as the only thing they share, driven
the way Ray users drive a cluster: `ray job submit --working-dir .` for the pipeline (preprocess,
train with one worker per node, evaluate, promote, serve) and for the feedback retrain, HTTP for
the rest. Each node has two logical CPUs and its own ports and temp dir, as two machines would;
the training workers are placed with SPREAD. Anything that assumed one filesystem (a driver's
temp folder handed to a worker, a local checkpoint path) fails here."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import requests

from serve.runner import serve_env
from tests.conftest import ROOT, free_port
from tests.e2e.test_cli import NODE_KEY_ENV, stop_cluster

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.cluster]
RAY = str(Path(sys.executable).parent / "ray")
DEPLOYMENTS = ("encoder", "retriever", "ranker", "text")


def _node_ports() -> list:
    names = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port")
    return [f"--{n}={free_port()}" for n in names]


@pytest.fixture
def two_nodes(s3_server):
    """A head and a worker node (2 logical CPUs each, own ports), the jobs API on loopback."""
    # Started after the S3 server: every Ray process (job drivers, workers on both nodes) gets its
    # endpoint and credentials from the environment, as pods get them on a cluster; Serve's fast
    # path and the checkpoint signing key as infra/ sets them.
    env = {**os.environ, **serve_env(), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           **NODE_KEY_ENV}
    port, dash = free_port(), free_port()
    # A temp dir per node, as two machines have: a node's runtime-env agent deletes the packages it
    # does not use from its own folder (a shared one lost the job's working directory).
    temps = [tempfile.mkdtemp(prefix=f"ray2n{k}", dir="/tmp") for k in range(2)]  # AF_UNIX paths < 108 bytes
    common = ["--num-cpus=2", "--object-store-memory=300000000", "--node-ip-address=127.0.0.1",
              "--disable-usage-stats"]
    head = subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=true",
                           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temps[0]}",
                           *common, *_node_ports()], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert head.returncode == 0, head.stderr[-3000:]
        worker = subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", f"--temp-dir={temps[1]}", *common,
                                 *_node_ports(), "--min-worker-port=20000", "--max-worker-port=20999"],
                                env=env, capture_output=True, text=True, timeout=180)
        assert worker.returncode == 0, worker.stderr[-3000:]
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                nodes = json.loads(urllib.request.urlopen(f"{address}/nodes?view=summary", timeout=5).read())
                alive = [n for n in nodes["data"]["summary"] if n["raylet"]["state"] == "ALIVE"]
                if len(alive) == 2:
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the two Ray nodes did not both come up")
        yield {"address": address, "env": env}
    finally:
        for temp in temps[::-1]:
            stop_cluster(temp)
            shutil.rmtree(temp, ignore_errors=True)


def _submit(cluster, *args, wait=True, timeout=1500):
    cmd = [RAY, "job", "submit", "--address", cluster["address"], "--working-dir", "."]
    if not wait:
        cmd.append("--no-wait")
    for _ in range(12):  # the job agent may come up after the dashboard answers
        p = subprocess.run([*cmd, "--", "python", *args], cwd=ROOT, env=cluster["env"], capture_output=True,
                           text=True, timeout=timeout)
        if "No available agent to submit job" not in p.stderr:
            return p
        time.sleep(5)
    return p


def _actors(cluster, class_part):
    """{actor class name: set of node ids} for the cluster's actors whose class contains ``class_part``
    (finished ones included: the state API keeps them)."""
    p = subprocess.run([RAY, "list", "actors", "--address", cluster["address"], "--format", "json", "--limit",
                        "10000", "--detail"], env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = {}
    for a in json.loads(p.stdout):
        if class_part in (a.get("class_name") or ""):
            out.setdefault(a["class_name"], set()).add(a["node_id"])
    return out


def test_two_nodes_share_only_s3_pipeline_serve_feedback_retrain_swap(two_nodes, s3_bucket):
    root = f"{s3_bucket}/recsys"
    port = free_port()
    p = _submit(two_nodes, "-m", "jobs.pipeline", f"storage.root={root}",
                "data.synthetic.num_events=8000", "data.synthetic.num_items=800", "data.synthetic.num_shards=2",
                "retriever.dim=32", "retriever.max_len=50", "train.retriever.epochs=8", "train.retriever.eval_every=4",
                "train.llm.steps=2", "train.llm.batch_size=8", "ranker.epochs=3", "train.num_workers=2",
                "train.placement_strategy=SPREAD",
                "serve.enabled=true", f"serve.port={port}", wait=False, timeout=120)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    job = re.search(r"raysubmit_\w+", p.stdout).group(0)
    url, deadline, logs = None, time.time() + 1500, ""
    try:
        while time.time() < deadline and url is None:
            logs = subprocess.run([RAY, "job", "logs", "--address", two_nodes["address"], job], env=two_nodes["env"],
                                  capture_output=True, text=True, timeout=120).stdout
            m = re.search(r"serving on (http://\S+)", logs)
            if m:
                url = m.group(1)
                break
            st = subprocess.run([RAY, "job", "status", "--address", two_nodes["address"], job],
                                env=two_nodes["env"], capture_output=True, text=True, timeout=120)
            status = st.stdout + st.stderr
            if "FAILED" in status or "SUCCEEDED" in status or "STOPPED" in status:
                pytest.fail(f"the pipeline job ended before serving: {status}\n{logs[-6000:]}")
            time.sleep(5)
        assert url == f"http://127.0.0.1:{port}", logs[-6000:]
        assert "PROMOTED" in logs

        # Training ran one worker per node; the Serve replicas are spread over both nodes.
        workers = set().union(*_actors(two_nodes, "TrainWorker").values())
        assert len(workers) == 2, _actors(two_nodes, "TrainWorker")
        replicas = _actors(two_nodes, "ServeReplica")
        assert len(set().union(*replicas.values())) == 2, replicas

        # Everything the nodes exchanged is in the bucket: the registry, the bundle, the dataset.
        from components import registry
        from components.storage import Storage

        storage = Storage(root)
        pointer = registry.read_pointer(storage, "recommender")
        assert pointer and pointer["prefix"].startswith("checkpoints/recommender/")

        # Feedback through the endpoint, stored in S3, then a retrain submitted as a job.
        s = requests.Session()
        users = s.get(url + "/v1/users?limit=40", timeout=30).json()["users"][10:40]
        items = storage.read_parquet(f"{pointer['prefix']}/items", columns=["item_id", "categories"]).to_pylist()
        category = Counter(c for it in items for c in it["categories"]).most_common()[-1][0]
        pool = [it["item_id"] for it in items if it["categories"] == [category]]
        events = [{"user_id": u, "item_id": pool[(k * 5 + j) % len(pool)], "event": "click"}
                  for k, u in enumerate(users) for j in range(6)]
        assert s.post(url + "/v1/events", json={"events": events}, timeout=60).status_code == 202
        r = _submit(two_nodes, "-m", "jobs.retrain", f"storage.root={root}", "retrain.epochs=3", "ranker.epochs=3")
        assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
        assert "promotion:" in r.stdout, r.stdout[-4000:]
        new = registry.read_pointer(storage, "recommender")
        if "PROMOTED" in r.stdout:  # every replica, on either node, swaps to it from S3
            assert new["run_id"] != pointer["run_id"] and new["lineage"]["feedback_events"] == len(events)
            deadline = time.time() + 60
            while time.time() < deadline:
                v = s.get(url + "/v1/version", timeout=30).json()
                if {v[d]["version"] for d in DEPLOYMENTS} == {new["run_id"]}:
                    break
                time.sleep(0.5)
            else:
                pytest.fail(f"not every deployment serves {new['run_id']}: {json.dumps(v)[:1500]}")
        else:  # the gate kept the parent: it must still be what every replica serves
            assert new["run_id"] == pointer["run_id"]
        out = s.post(url + "/v1/recommend", json={"user_id": users[0], "k": 5}, timeout=30).json()
        assert len(out["items"]) == 5 and out["model_version"] == new["run_id"]
    finally:
        subprocess.run([RAY, "job", "stop", "--address", two_nodes["address"], job], env=two_nodes["env"],
                       capture_output=True, text=True, timeout=120)
