"""Faults with a client running throughout: the object store (moto over HTTP on loopback) goes
away for ~10 s under a service whose only storage is S3.

The outage is a TCP proxy between the service and the S3 server that closes its listening socket
and every open connection (pooled keep-alive connections included), as a network partition or a
dead S3 endpoint would; stopping moto's own server would leave established connections served."""

import socket
import threading
import time
import uuid
from collections import Counter

import pytest
import requests

from components.storage import Storage
from jobs.quick_train import build_bundle
from serve import runner
from serve.feedback import list_feedback_shards, read_feedback
from tests.conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.s3]
OUTAGE_S = 10.0


class TcpProxy:
    """127.0.0.1:<port> -> ``target``; ``down()`` refuses new and cuts open connections, ``up()``
    listens again on the same port."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self._conns, self._lock, self._listener = [], threading.Lock(), None

    def up(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone does not)
        except OSError:
            pass
        listener.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by down()
                return
            if self._listener is not listener:  # accepted as down() ran: refuse it
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _post_until_acknowledged(url, user, stop, log):
    """A well-behaved client: one event per request with its own event_id; on 503 it waits the
    Retry-After and sends the same event again, until it gets its 202."""
    k = 0
    while not stop.is_set():
        event = {"user_id": user, "item_id": f"i{k % 50:06d}", "event": "click", "event_id": f"{user}-{k}"}
        while True:
            t0 = time.monotonic()
            try:
                r = requests.post(url + "/v1/events", json={"events": [event]}, timeout=40)
                log.append((t0, event["event_id"], r.status_code, r.headers.get("Retry-After"), time.monotonic() - t0))
            except requests.RequestException as exc:  # a dropped connection: retried like a 503
                log.append((t0, event["event_id"], type(exc).__name__, None, time.monotonic() - t0))
                r = None
            if r is not None and r.status_code == 202:
                break
            time.sleep(float(r.headers.get("Retry-After", 1)) if r is not None else 1.0)
        k += 1


def _recommend(url, user, stop, log):
    while not stop.is_set():
        try:
            r = requests.post(url + "/v1/recommend", json={"user_id": user, "k": 10}, timeout=40)
            log.append((time.monotonic(), r.status_code))
        except requests.RequestException as exc:
            log.append((time.monotonic(), type(exc).__name__))
        time.sleep(0.05)


def test_s3_outage_answers_503_with_retry_after_and_stores_every_acknowledged_event_once(
        ray_local, s3_server, s3_bucket):
    from ray import serve

    root = f"{s3_bucket}/rec"
    build_bundle(root, epochs=2, ranker=False)
    proxy = TcpProxy(int(s3_server.rsplit(":", 1)[1]))
    proxy.up()
    endpoint = f"http://127.0.0.1:{proxy.port}"
    url = runner.start("configs/serve-fused.yaml", {"storage_root": root, "storage_endpoint": endpoint,
                                                    "watch_interval_s": 0.5}, port=free_port())
    user = f"outage-{uuid.uuid4().hex[:6]}"
    reader = requests.get(url + "/v1/users?limit=1", timeout=10).json()["users"][0]
    events, recs, stop = [], [], threading.Event()
    clients = [threading.Thread(target=_post_until_acknowledged, args=(url, user, stop, events)),
               threading.Thread(target=_recommend, args=(url, reader, stop, recs))]
    try:
        for c in clients:
            c.start()
        time.sleep(3)
        proxy.down()
        down = time.monotonic()
        time.sleep(OUTAGE_S)
        up = time.monotonic()
        proxy.up()
        time.sleep(6)
        stop.set()
        for c in clients:
            c.join(timeout=120)
        assert not any(c.is_alive() for c in clients)

        statuses = Counter(e[2] for e in events)
        # Requests made and answered while S3 was unreachable (one that retried into the recovery
        # may rightly end in a 202: its event was stored once S3 came back).
        during = [e for e in events if down + 0.5 < e[0] and e[0] + e[4] < up]
        acked = {e[1] for e in events if e[2] == 202}
        slowest_503 = max((e[4] for e in events if e[2] == 503), default=0.0)
        print(f"S3 down {OUTAGE_S:.0f} s: event requests {dict(statuses)} (slowest 503: {slowest_503:.2f} s); "
              f"recommend {dict(Counter(s for _, s in recs))}")
        # Only 202 or 503 (with Retry-After), never a 5xx of another kind or a dropped connection.
        assert set(statuses) <= {202, 503}, statuses
        assert statuses[503] > 0 and all(e[3] == "1" for e in events if e[2] == 503)
        assert during and all(e[2] == 503 for e in during), ("a 202 while S3 was down would be a lie", during)
        assert any(e[0] > up and e[2] == 202 for e in events), "the service did not recover after S3 came back"
        # Every acknowledged event is stored, and counts once however often it was retried.
        storage = Storage(root, endpoint_url=s3_server)
        shards = list_feedback_shards(storage)
        raw = Counter(eid for sh in shards for eid in storage.read_parquet(sh).column("event_id").to_pylist()
                      if eid and eid.startswith(user))
        assert set(raw) == acked
        stored = read_feedback(storage, shards)
        mine = [u for u in stored["user_id"].to_pylist() if u == user]
        assert len(mine) == len(acked)
        history = requests.get(f"{url}/v1/users/{user}/history?limit=200", timeout=10).json()["events"]
        assert len(history) == min(len(acked), 200)  # live state keeps the last history_len (200) per user
        # Recommendations come from memory: they keep answering while the store is down.
        assert recs and all(s == 200 for _, s in recs), Counter(s for _, s in recs)
        print(f"acknowledged {len(acked)} events, stored copies {sum(raw.values())}, counted once: {len(mine)}")
    finally:
        stop.set()
        serve.shutdown()
        if proxy._listener is not None:
            proxy.down()
