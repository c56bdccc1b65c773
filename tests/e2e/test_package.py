"""The installable package: a wheel built from this repository and installed outside it runs the
documented commands with no file of the checkout: `llmrec --help`, `llmrec run --preset tiny`
and `llmrec serve` (the presets and Serve configs are package data, read through
importlib.resources). The wheel goes into its own folder (``pip install --target``) over this
environment's dependencies, and every command runs from a folder outside the repository."""

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.e2e.test_cli import ENV


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("llmrec-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work = tmp / "elsewhere"
    work.mkdir()
    env = {**ENV, "PYTHONPATH": str(tmp / "site")}
    return {"site": tmp / "site", "llmrec": str(tmp / "site" / "bin" / "llmrec"), "cwd": work, "env": env}


def _tail(out, n: int = 3000) -> str:
    if isinstance(out, bytes):  # TimeoutExpired keeps bytes even with text=True
        out = out.decode(errors="replace")
    return (out or "")[-n:]


def _run(installed, *args, timeout=600):
    try:
        return subprocess.run([installed["llmrec"], *args], cwd=installed["cwd"], env=installed["env"],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # say where it stopped, not only that it did
        pytest.fail(f"llmrec {' '.join(args)} ran past {timeout}s\n--- stdout tail ---\n{_tail(exc.stdout)}"
                    f"\n--- stderr tail ---\n{_tail(exc.stderr)}")


def test_the_wheel_carries_the_configs_and_imports_nothing_from_the_checkout(installed):
    p = subprocess.run([sys.executable, "-c", "import components, configs, jobs, serve; from components.config "
                        "import PRESETS; print(components.__file__, configs.__file__, PRESETS)"],
                       cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for path in p.stdout.split():
        assert Path(path).is_relative_to(installed["site"]), p.stdout
    assert (installed["site"] / "configs" / "hardware" / "tiny.yaml").is_file()
    assert (installed["site"] / "configs" / "serve-fused.yaml").is_file()
    h = _run(installed, "--help", timeout=120)
    assert h.returncode == 0 and "tiny" in h.stdout, h.stderr[-2000:]


# A whole tiny pipeline and a Serve start from the installed wheel (~3 min): in the default
# suite, so CI checks what a user who installs the package runs.
def test_the_installed_command_trains_on_the_tiny_preset_and_serves(installed):
    store = installed["cwd"] / "store"
    p = _run(installed, "run", "--preset", "tiny", f"storage.root={store}", "serve.enabled=false", "ray.num_cpus=2",
             timeout=1500)
    assert p.returncode == 0, p.stderr[-4000:]
    pointer = json.loads((store / "registry/recommender/latest.json").read_text())
    port = free_port()
    log = installed["cwd"] / "serve.log"
    proc = subprocess.Popen([installed["llmrec"], "serve", f"storage.root={store}", f"serve.port={port}"],
                            cwd=installed["cwd"], env=installed["env"], stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))
    try:
        deadline, version = time.time() + 240, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/version", timeout=5) as r:
                    version = json.loads(r.read())["retriever"]["version"]
                    break
            except OSError:
                time.sleep(2)
        assert version == pointer["run_id"], log.read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
