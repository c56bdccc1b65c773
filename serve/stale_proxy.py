"""A Ray Serve HAProxy left behind by a killed service: found on the HTTP port and cleared.

With ``RAY_SERVE_ENABLE_HA_PROXY`` (serve/runner.py SERVE_ENV) Serve's proxy actor runs HAProxy as
a child process: ``haproxy -db -f <dir>/<Ray node id>/haproxy.cfg``. When the service is killed
hard (SIGKILL), Ray's processes go but HAProxy does not: it keeps the port, answers 500 to every
request (its backends are gone), and the next ``serve.start`` on that port fails. It also keeps
HAProxy's stats and metrics ports (``haproxy_side_ports``), which every Serve on this machine
binds whatever its HTTP port: a service on another port fails too ("Address already in use"). Such a process
is provably stale when, besides being named haproxy and listening on the port, its command line
names Serve's per-node config and no running process of that Ray node is left (raylet, agents,
workers all name their node id), nor a Ray worker as its parent. Nothing else is ever signalled.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Callable, Iterable, List, Optional, Sequence, Set, Union

import psutil

log = logging.getLogger(__name__)

_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


def haproxy_node_id(cmdline: Iterable[str]) -> Optional[str]:
    """The Ray node id of Serve's HAProxy from its command line (the folder of its ``-f`` config),
    or None when the command line is not Serve's."""
    args = list(cmdline)
    try:
        config = args[args.index("-f") + 1]
    except (ValueError, IndexError):
        return None
    node = os.path.basename(os.path.dirname(config))
    return node if re.fullmatch(r"[0-9a-f]{32,}", node) else None


def live_ray_node_ids() -> Set[str]:
    """Node ids named (``--node_id=`` / ``--node-id=``) by any process running on this machine."""
    ids: Set[str] = set()
    for proc in psutil.process_iter(["cmdline"]):
        for arg in proc.info["cmdline"] or ():
            if arg.startswith(("--node_id=", "--node-id=")):
                ids.add(arg.split("=", 1)[1])
    return ids


def _named_haproxy(proc: psutil.Process) -> bool:
    return proc.name() == "haproxy"


def haproxy_side_ports() -> List[int]:
    """The stats and metrics ports Serve's HAProxy binds beside the HTTP port (Ray's settings:
    ``RAY_SERVE_HAPROXY_STATS_PORT``, ``RAY_SERVE_HAPROXY_METRICS_PORT``)."""
    from ray.serve._private import constants

    return [int(constants.RAY_SERVE_HAPROXY_STATS_PORT), int(constants.RAY_SERVE_HAPROXY_METRICS_PORT)]


def _listens_on(proc: psutil.Process, ports: Set[int]) -> bool:
    conns = proc.net_connections(kind="inet") if hasattr(proc, "net_connections") else proc.connections(kind="inet")
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in ports for c in conns)


def _child_of_ray_worker(proc: psutil.Process) -> bool:
    parent = proc.parent()
    if parent is None or parent.pid == 1:
        return False
    try:
        return parent.name().startswith("ray::") or any("default_worker.py" in a for a in parent.cmdline())
    except _GONE:
        return False


def find_stale_haproxy(port: Union[int, Sequence[int]], is_haproxy: Callable[[psutil.Process], bool] = _named_haproxy,
                       live_node_ids: Callable[[], Set[str]] = live_ray_node_ids) -> List[psutil.Process]:
    """Serve HAProxy processes listening on ``port`` whose Ray node is gone (see the module doc).

    Args:
        port: the port(s) Serve is about to bind (one held is enough).
        is_haproxy: which processes count as HAProxy (by name; tests pass their own).
        live_node_ids: the node ids of the Ray processes running here (read once, when needed).
    """
    ports = {port} if isinstance(port, int) else set(port)
    stale, live = [], None
    for proc in psutil.process_iter():
        try:
            if not is_haproxy(proc) or not _listens_on(proc, ports):
                continue
            node = haproxy_node_id(proc.cmdline())
            if node is None:
                continue
            live = live_node_ids() if live is None else live
            if node not in live and not _child_of_ray_worker(proc):
                stale.append(proc)
        except _GONE:
            continue
    return stale


def clear_stale_haproxy(port: Union[int, Sequence[int]], timeout_s: float = 10.0, **find: Callable) -> List[int]:
    """Stop the stale Serve HAProxy processes holding ``port`` or one of several
    (``find_stale_haproxy``); returns their pids.

    Raises:
        RuntimeError: one cannot be stopped from here (another user's); the message names its pid
            and the command that stops it."""
    stale = find_stale_haproxy(port, **find)
    for proc in stale:
        log.warning("port %s is held by pid %d, the HAProxy of a Ray Serve whose Ray is gone (a killed "
                    "service; it answers 500 to everything): stopping it", port, proc.pid)
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
        except psutil.AccessDenied:
            raise RuntimeError(
                f"port(s) {port} held by pid {proc.pid}, the HAProxy of a Ray Serve whose Ray is gone (a "
                f"killed service), and this user cannot stop it: run `kill {proc.pid}` as its owner or "
                f"root, or serve on another port") from None
    _, alive = psutil.wait_procs(stale, timeout=timeout_s)
    for proc in alive:  # HAProxy ends on SIGTERM at once; this is only a backstop
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)
    return [p.pid for p in stale]
