"""The command-line contract of DESIGN.md, run as a user would: subprocesses, exit codes, files."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

# As an activated virtual environment would: `python` in a job's entrypoint is this interpreter.
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


# What a cluster's nodes get from infra/ besides: the checkpoint signing key, without which jobs
# that run with $RAY_ADDRESS set (every `ray job submit`) refuse to start (jobs/runtime.py).
NODE_KEY_ENV = {"LLMREC_CHECKPOINT_KEY": "e2e-checkpoint-key-" + "0" * 32}


def _run(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_preprocess_command_writes_dataset_with_stats(tmp_path):
    root = tmp_path / "store"
    p = _run("-m", "jobs.preprocess", "data.source=synthetic", "data.synthetic.num_events=5000",
             f"storage.root=file://{root}", "ray.num_cpus=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "users" in p.stdout and "dataset written to" in p.stdout
    pointer = json.loads((root / "datasets/synthetic/latest.json").read_text())
    stats = json.loads((root / "datasets/synthetic" / pointer["version"] / "stats.json").read_text())
    assert {"users", "items", "interactions"} <= set(stats)
    assert stats["interactions"] == stats["train"] + stats["valid"] + stats["test"] > 0


def test_bad_config_and_bad_data_exit_with_clear_message(tmp_path):
    p = _run("-m", "jobs.preprocess", "preprocess.kcor=3", timeout=60)
    assert p.returncode == 2 and "unknown config key: preprocess.kcor" in p.stderr
    p = _run("-m", "jobs.preprocess", "data.source=movielens", f"data.path={tmp_path}",
             f"storage.root={tmp_path / 's'}", timeout=120)
    assert p.returncode == 1
    assert "no MovieLens files" in p.stderr and "ratings.csv" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.fixture
def ray_head(tmp_path):
    """A real single-node Ray cluster with the jobs API on loopback (what `ray job submit` talks to)."""
    port, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX socket paths must stay < 108 bytes
    ray_bin = str(Path(sys.executable).parent / "ray")
    start = subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                            f"--temp-dir={temp}", "--disable-usage-stats"],
                           env={**ENV, **NODE_KEY_ENV}, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    address = f"http://127.0.0.1:{dash}"
    try:
        for _ in range(60):
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                time.sleep(1)
        yield address
    finally:
        stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def stop_cluster(temp_dir: str, timeout_s: float = 30) -> None:
    """Stop only the Ray cluster started with ``--temp-dir=temp_dir`` (its GCS, raylet, dashboard
    and workers name that folder on their command lines). ``ray stop --force`` would end every
    Ray process of the user on the machine, other people's jobs included."""
    import psutil

    def ours(proc):
        try:
            return proc.pid != os.getpid() and any(temp_dir in a for a in proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    procs = {p.pid: p for p in psutil.process_iter() if ours(p)}
    for proc in list(procs.values()):  # workers and agents rename themselves "ray::...": take descendants too
        try:
            procs.update({c.pid: c for c in proc.children(recursive=True)})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    procs = list(procs.values())
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def test_ray_job_submit_runs_the_same_command(ray_head, tmp_path):
    root = tmp_path / "store"
    ray_bin = str(Path(sys.executable).parent / "ray")
    for _ in range(36):  # the job agent may come up minutes after the dashboard answers on a loaded box
        p = subprocess.run([ray_bin, "job", "submit", "--address", ray_head, "--working-dir", ".", "--",
                            "python", "-m", "jobs.preprocess", "data.synthetic.num_events=3000", f"storage.root={root}"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in p.stderr:
            break
        time.sleep(5)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "succeeded" in p.stdout.lower()
    assert (root / "datasets/synthetic/latest.json").is_file()
    # The same job through the `llmrec` entry point: --address submits it with `ray job submit`.
    import pyarrow.parquet as pq

    version = json.loads((root / "datasets/synthetic/latest.json").read_text())["version"]
    user = pq.read_table(root / "datasets/synthetic" / version / "test", columns=["user_id"])["user_id"][0].as_py()
    llmrec = str(Path(sys.executable).parent / "llmrec")
    p = subprocess.run([llmrec, "forget-user", "--address", ray_head, f"storage.root={root}", f"forget.user_id={user}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "ray job submit --address" in p.stdout and "succeeded" in p.stdout.lower()
    assert len(list((root / "privacy/forgotten").glob("*.json"))) == 1


def test_llmrec_lists_its_commands_and_each_command_its_settings():
    llmrec = str(Path(sys.executable).parent / "llmrec")
    p = subprocess.run([llmrec, "--help"], env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    for command in ("run", "preprocess", "train", "evaluate", "serve", "retrain", "forget-user"):
        assert f"\n  {command} " in p.stdout
    p = subprocess.run([llmrec, "train", "--help"], env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "retriever:" in p.stdout and "storage:" in p.stdout
    p = subprocess.run([llmrec, "trian"], env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown command 'trian'" in p.stderr
    p = subprocess.run([llmrec, "serve", "storage.root=/nonexistent/store"], env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and "nothing to serve" in p.stderr and "Traceback" not in p.stderr
