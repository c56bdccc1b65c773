"""Two local Rays on one machine (issue 23 item 6): a job that starts its own Ray while another
instance runs must not depend on finding "the" local Ray. Ray Train's placement-group cleaner is
an actor that calls Ray's state API without an address; with two instances that used to fail
with "Found multiple active Ray instances" (seen when two `make run`s overlapped)."""

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.ray]

PROBE = textwrap.dedent("""
    import ray
    from components.config import load_config
    from jobs.runtime import ray_session

    with ray_session(load_config(["ray.num_cpus=1"]).ray):
        @ray.remote(num_cpus=0)
        def probe():  # what the cleaner actor does: the state API, no address given
            from ray.util.state import list_nodes
            return len(list_nodes())
        print("state API from a worker: nodes", ray.get(probe.remote()), flush=True)
""")


def test_a_job_starting_its_own_ray_beside_another_instance_reaches_its_state_api(tmp_path):
    other = subprocess.Popen(  # another local Ray, alive for the whole test
        [sys.executable, "-c", "import ray, sys; ray.init(num_cpus=0, include_dashboard=False, "
                               "logging_level='ERROR'); print('up', flush=True); sys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert "state API from a worker: nodes 1" in out.stdout, out.stdout[-2000:]
        assert "multiple active Ray instances" not in out.stderr
    finally:
        other.stdin.close()  # the other driver exits normally and stops its Ray
        try:
            other.wait(timeout=60)
        except subprocess.TimeoutExpired:
            other.kill()
