"""serve/stale_proxy.py: a killed service's HAProxy on the port is found and cleared, and nothing
else is. Real processes listening on loopback stand in for HAProxy: small Python socket servers
whose command line is Serve's HAProxy's (``-db -f <dir>/<node id>/haproxy.cfg``)."""

import os
import secrets
import socket
import subprocess
import sys

import psutil
import pytest

from serve.stale_proxy import clear_stale_haproxy, find_stale_haproxy
from tests.conftest import free_port

LISTEN = ("import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
          "print(s.getsockname()[1], flush=True); time.sleep(600)")


@pytest.fixture
def listener(tmp_path):
    """listener(serve_config=True, exe=python) -> (process, port, node id): a process listening on
    a free loopback port with Serve's HAProxy arguments (those of a Ray node nobody runs)."""
    procs = []

    def start(serve_config=True, exe=sys.executable):
        node = secrets.token_hex(28)  # a Ray node id: 28 bytes
        args = ["-db", "-f", str(tmp_path / node / "haproxy.cfg")] if serve_config else ["-db"]
        p = subprocess.Popen([exe, "-c", LISTEN, *args], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        return p, int(p.stdout.readline()), node

    yield start
    for p in procs:
        p.kill()
        p.wait()


def _is(*procs):
    pids = {p.pid for p in procs}
    return lambda proc: proc.pid in pids


def _port_is_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_only_a_serve_haproxy_on_the_port_whose_ray_node_is_gone_is_stale(listener):
    proxy, port, node = listener()
    assert [p.pid for p in find_stale_haproxy(port, is_haproxy=_is(proxy), live_node_ids=set)] == [proxy.pid]
    # its Ray node still runs: Serve's own proxy, not stale
    assert find_stale_haproxy(port, is_haproxy=_is(proxy), live_node_ids=lambda: {node}) == []
    # another port
    assert find_stale_haproxy(free_port(), is_haproxy=_is(proxy), live_node_ids=set) == []
    # not named haproxy (the default matcher): a Python process is never taken for one
    assert find_stale_haproxy(port, live_node_ids=set) == []
    # an haproxy that is not Serve's (no per-node config on its command line)
    other, other_port, _ = listener(serve_config=False)
    assert find_stale_haproxy(other_port, is_haproxy=_is(other), live_node_ids=set) == []


def test_clearing_stops_the_stale_proxy_frees_the_port_and_leaves_the_rest(listener):
    proxy, port, _ = listener()
    live, live_port, live_node = listener()
    assert not _port_is_free(port)
    cleared = clear_stale_haproxy(port, is_haproxy=_is(proxy, live), live_node_ids=lambda: {live_node})
    assert cleared == [proxy.pid] and not psutil.pid_exists(proxy.pid) and _port_is_free(port)
    assert clear_stale_haproxy(live_port, is_haproxy=_is(proxy, live), live_node_ids=lambda: {live_node}) == []
    assert live.poll() is None and not _port_is_free(live_port)


def test_serve_starts_on_a_port_a_killed_service_left_its_haproxy_on(listener, tmp_path, monkeypatch):
    """runner.start clears the stale HAProxy (a process really named haproxy) before Serve binds."""
    from ray import serve

    from serve import runner

    exe = tmp_path / "haproxy"
    os.symlink(sys.executable, exe)
    proxy, port, _ = listener(exe=str(exe))
    assert psutil.Process(proxy.pid).name() == "haproxy"
    bound = []

    class Binding(Exception):
        """Serve would bind the port now: the test stops there."""

    def fake_start(http_options, **kwargs):
        bound.append(_port_is_free(http_options["port"]))
        raise Binding

    monkeypatch.setattr(serve, "start", fake_start)
    with pytest.raises(Binding):
        runner.start("configs/serve-fused.yaml", {"storage_root": str(tmp_path / "store")}, host="127.0.0.1",
                     port=port)
    assert bound == [True] and not psutil.pid_exists(proxy.pid)


def test_serve_on_another_port_clears_a_stale_haproxy_holding_its_stats_port(listener, tmp_path, monkeypatch):
    """Every Serve HAProxy on a machine binds the same stats and metrics ports: a killed service
    on port A left one there, and a service starting on port B failed with "Address already in
    use" (found running an experiment on 8011 beside `make run` on 8000). runner.start clears it."""
    from ray import serve
    from ray.serve._private import constants

    from serve import runner

    exe = tmp_path / "haproxy"
    os.symlink(sys.executable, exe)
    proxy, side_port, _ = listener(exe=str(exe))
    monkeypatch.setattr(constants, "RAY_SERVE_HAPROXY_STATS_PORT", side_port)
    http_port = free_port()

    class Binding(Exception):
        """Serve would bind now: the test stops there."""

    def fake_start(http_options, **kwargs):
        assert http_options["port"] == http_port and _port_is_free(side_port)
        raise Binding

    monkeypatch.setattr(serve, "start", fake_start)
    with pytest.raises(Binding):
        runner.start("configs/serve-fused.yaml", {"storage_root": str(tmp_path / "store")}, host="127.0.0.1",
                     port=http_port)
    assert not psutil.pid_exists(proxy.pid)
