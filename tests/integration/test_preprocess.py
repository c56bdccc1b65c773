"""Preprocessing on local Ray (Ray Data) and in-process, over local and S3 shards."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.config import load_config
from components.storage import Storage
from jobs import preprocess
from tests.conftest import shared_dataset

pytestmark = pytest.mark.ray


def _cfg(tmp_path, *over):
    return load_config([f"storage.root={tmp_path / 'store'}", *over])


def _read(storage, prefix, name):
    return storage.read_parquet(f"{prefix}/{name}")


def test_ray_data_matches_single_process_and_is_deterministic(ray_local, tmp_path):
    cfg = _cfg(tmp_path, "data.synthetic.num_events=30000", "data.synthetic.num_shards=6")
    a = preprocess.run(cfg, engine="ray")
    st = Storage(str(tmp_path / "store"))
    first = {n: _read(st, a["prefix"], n) for n in ("train", "valid", "test", "vocab/items.parquet", "sequences")}
    b = preprocess.run(cfg, engine="local")
    assert a["version"] == b["version"]  # same input + settings -> same version
    for name, table in first.items():
        assert _read(st, b["prefix"], name).equals(table), name
    s = a["stats"]
    assert s["raw_rows"] == 30000 and s["quarantined"] == 0
    assert s["interactions"] == s["train"] + s["valid"] + s["test"]
    assert s["valid"] == s["test"] == s["users"]
    pointer = st.read_json("datasets/synthetic/latest.json")
    assert pointer["version"] == a["version"]


def _write_messy_input(root):
    root.mkdir(parents=True)
    good = pa.table({"user_id": [f"u{k % 7}" for k in range(70)], "item_id": [f"i{k % 10}" for k in range(70)],
                     "ts": [1_600_000_000_000 + k for k in range(70)], "event": ["click"] * 70})
    pq.write_table(good, root / "a-good.parquet")
    (root / "b-corrupt.parquet").write_bytes(b"PAR1 truncated garbage")
    (root / "c-types.csv").write_text("user_id,item_id,ts,event,value\n"
                                      "u1,i1,1600000000,view,1\n"
                                      "u2,i2,not-a-time,view,1\n"
                                      "u3,i3,1600000000,view,lots\n"
                                      "u4,i4,1600000000,dance,1\n")
    (root / "d-missing.jsonl").write_text('{"user_id": "u1", "item_id": "i1"}\n{"user_id": "u2", "item_id": "i2"}\n')
    (root / "e-empty.csv").write_text("")
    (root / "f-badlines.jsonl").write_text('{"user_id": "u1", "item_id": "i2", "ts": 1600000000}\n{oops\n')


def test_bad_input_is_quarantined_with_reasons_never_lost(ray_local, tmp_path):
    _write_messy_input(tmp_path / "in")
    cfg = _cfg(tmp_path, "data.source=files", f"data.path={tmp_path / 'in'}", "preprocess.kcore=2")
    out = preprocess.run(cfg, engine="ray")
    s = out["stats"]
    r = s["quarantined_by_reason"]
    assert r["unreadable_shard"] == 2  # the corrupt Parquet file and the empty CSV
    assert r["bad_ts"] == 1 and r["bad_value"] == 1 and r["bad_event"] == 1
    assert r["missing_column:ts"] == 2
    assert r["malformed_row"] == 1
    # Every record read (an unreadable shard counts as one) is either valid or quarantined.
    assert s["valid_events"] + s["quarantined"] == s["raw_rows"] == 70 + 4 + 2 + 2 + 2
    q = Storage(str(tmp_path / "store")).read_parquet(f"{out['prefix']}/quarantine")
    assert q.num_rows == s["quarantined"]
    bad_ts = [json.loads(rec) for rec, why in zip(q["record"].to_pylist(), q["reason"].to_pylist()) if why == "bad_ts"]
    assert bad_ts == [{"user_id": "u2", "item_id": "i2", "ts": "not-a-time", "event": "view", "value": "1"}]
    assert s["users"] == 7 and s["items"] == 10


def test_empty_or_all_bad_input_fails_clearly(ray_local, tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="no event shards"):
        preprocess.run(_cfg(tmp_path, "data.source=files", f"data.path={tmp_path / 'none'}"), engine="ray")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.csv").write_text("user,item\n1,2\n")
    with pytest.raises(ValueError, match=r"no valid events.*missing_column:user_id"):
        preprocess.run(_cfg(tmp_path, "data.source=files", f"data.path={bad}"), engine="ray")


@pytest.mark.s3
def test_sharded_s3_input_and_output(ray_local, s3_bucket, s3_server, tmp_path):
    src = Storage(f"{s3_bucket}/incoming")
    for k in range(4):
        rows = [{"uid": f"u{(k * 50 + j) % 40}", "iid": f"i{j % 25}", "t": 1_600_000_000 + k * 1000 + j}
                for j in range(50)]
        src.write_bytes(f"events/part-{k}.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    src.write_parquet("items/catalog.parquet", pa.table({"item_id": [f"i{j}" for j in range(25)],
                                                          "title": [f"Item &amp; {j}" for j in range(25)]}))
    cfg = load_config([f"storage.root={s3_bucket}/root", "data.source=files", f"data.path={s3_bucket}/incoming",
                       "data.columns.user_id=uid", "data.columns.item_id=iid", "data.columns.ts=t",
                       "preprocess.kcore=2", "data.name=s3demo"])
    out = preprocess.run(cfg, engine="ray")
    assert out["uri"].startswith(f"{s3_bucket}/root/datasets/s3demo/")
    st = Storage(f"{s3_bucket}/root")
    stats = st.read_json(f"{out['prefix']}/stats.json")
    assert stats["raw_rows"] == 200 and stats["event_shards"] == 4 and stats["quarantined"] == 0
    items = st.read_parquet(f"{out['prefix']}/items")
    assert items["title"][0].as_py() == "Item & 0"
    assert st.read_json("datasets/s3demo/latest.json")["version"] == out["version"]


def test_ml_latest_small_loo_self_check(ray_local, tmp_path):
    path = shared_dataset("ml-latest-small")
    out = preprocess.run(_cfg(tmp_path, "data.source=movielens", f"data.path={path}"), engine="ray")
    s = out["stats"]
    assert (s["users"], s["items"], s["interactions"]) == (610, 3650, 90274)
    assert s["valid"] == s["test"] == 610 and s["quarantined"] == 0
    items = Storage(str(tmp_path / "store")).read_parquet(f"{out['prefix']}/items")
    toy = items.filter(pa.compute.equal(items["item_id"], "1")).to_pylist()[0]
    assert toy["title"] == "Toy Story (1995)" and "Animation" in toy["categories"]


def test_amazon_gift_cards(ray_local, tmp_path):
    path = shared_dataset("amazon-2018-gift-cards-5core")
    out = preprocess.run(_cfg(tmp_path, "data.source=amazon", f"data.path={path}", "preprocess.kcore=3"),
                         engine="local")
    s = out["stats"]
    assert s["raw_rows"] == 2972 and s["dropped"]["duplicates"] == 7
    assert (s["users"], s["items"], s["interactions"]) == (458, 148, 2965)
    assert s["items_without_metadata"] == 0


@pytest.mark.s3
def test_registry_compare_and_swap_on_s3(s3_bucket):
    """Conditional PUTs (If-None-Match / If-Match) against the S3 server: of racing promotions
    from the same pointer exactly one wins, and every stale one is refused."""
    from concurrent.futures import ThreadPoolExecutor

    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    from components import registry
    from tests.conftest import free_port

    class SerialMotoServer(ThreadedMotoServer):
        """The same moto backend answering one request at a time. S3 applies a conditional PUT
        atomically; the threaded emulator checks and then writes, so two racers can both pass
        its check. Serving requests one by one gives S3's atomicity (and nothing more)."""

        def _server_entry(self) -> None:
            app = DomainDispatcherApplication(create_backend_app)
            self._server = make_server(self._ip_address, self._port, app, False, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    storage = Storage(f"{s3_bucket}/root")
    registry.promote(storage, "m", "a", "checkpoints/m/a", {}, {}, expected=None)
    with pytest.raises(registry.PromotionConflict):
        registry.promote(storage, "m", "b", "checkpoints/m/b", {}, {}, expected=None)
    port = free_port()
    serial = SerialMotoServer("127.0.0.1", port, verbose=False)
    serial.start()
    try:
        racers = Storage(f"{s3_bucket}/root", endpoint_url=f"http://127.0.0.1:{port}")
        for round_ in range(3):
            _, token = registry.read_pointer_versioned(storage, "m")

            def attempt(k):
                try:
                    registry.promote(racers, "m", f"r{round_}-{k}", f"checkpoints/m/r{k}", {}, {}, expected=token)
                    return k
                except registry.PromotionConflict:
                    return None

            with ThreadPoolExecutor(8) as ex:
                winners = [k for k in ex.map(attempt, range(8)) if k is not None]
            assert len(winners) == 1, winners
            assert registry.read_pointer(storage, "m")["run_id"] == f"r{round_}-{winners[0]}"
            with pytest.raises(registry.PromotionConflict):
                registry.promote(storage, "m", "late", "checkpoints/m/late", {}, {}, expected=token)
    finally:
        serial.stop()
