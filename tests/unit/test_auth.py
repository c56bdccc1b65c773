"""Access policy, bind check and rate limits of the HTTP API (serve/auth.py), no Ray: the
middleware is called directly with real Starlette requests."""

import asyncio
import json

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from serve import auth

ADMIN, WRITE, READ = "a" * 20, "w" * 20, "r" * 20


def policy(**env):
    return auth.AccessPolicy.load(env={k: v for k, v in env.items()})


def test_rights_nest_and_rotation_lists_are_accepted():
    p = policy(LLMREC_ADMIN_KEY=ADMIN, LLMREC_WRITE_KEY=f"{WRITE}, {'v' * 20}")
    assert p.right_of(ADMIN) == auth.ADMIN and p.right_of(WRITE) == p.right_of("v" * 20) == auth.WRITE
    assert p.right_of("x" * 20) == auth.OPEN and not p.open
    assert p.check("POST", "/v1/events", f"Bearer {WRITE}") is None
    assert p.check("POST", "/v1/events", f"bearer {ADMIN}") is None
    assert p.check("PUT", "/v1/items", f"Bearer {WRITE}")[0] == 403
    assert p.check("DELETE", "/v1/users/u1", f"Bearer {WRITE}")[0] == 403
    assert p.check("GET", "/v1/users/u1/history", f"Bearer {ADMIN}") is None
    for header in (None, "", "Bearer", f"Basic {ADMIN}", "Bearer nope-nope-nope-nope"):
        assert p.check("GET", "/v1/users", header)[0] == 401, header
    # reads are open unless asked for
    assert p.check("POST", "/v1/recommend", None) is None and p.check("GET", "/docs", None) is None


def test_a_read_key_closes_reads_and_messages_never_carry_keys():
    p = policy(LLMREC_READ_KEY=READ, LLMREC_ADMIN_KEY=ADMIN)
    assert p.require_read_key
    assert p.check("POST", "/v1/recommend", None)[0] == 401
    assert p.check("POST", "/v1/recommend", f"Bearer {READ}") is None
    assert p.check("POST", "/v1/events", f"Bearer {READ}")[0] == 403
    status, message = p.check("GET", "/v1/users", f"Bearer {READ}")
    assert READ not in message and ADMIN not in auth.dumps_public(p)
    assert json.loads(auth.dumps_public(p))["keys"] == {"read": 1, "write": 0, "admin": 1}


def test_keys_file_adds_keys_and_bad_files_or_short_keys_are_refused(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text(f"admin: [{ADMIN}]\nwrite: {WRITE}\n")
    p = auth.AccessPolicy.load(env={}, keys_file=str(f))
    assert p.right_of(ADMIN) == auth.ADMIN and p.right_of(WRITE) == auth.WRITE
    with pytest.raises(ValueError, match="does not exist"):
        auth.AccessPolicy.load(env={}, keys_file=str(tmp_path / "missing"))
    f.write_text("owner: [x]\n")
    with pytest.raises(ValueError, match="read/write/admin"):
        auth.AccessPolicy.load(env={}, keys_file=str(f))
    with pytest.raises(ValueError, match="LLMREC_WRITE_KEY: keys must be at least 16") as e:
        policy(LLMREC_WRITE_KEY="short")
    assert "short" not in str(e.value)


def test_open_service_only_on_loopback(caplog):
    for host in ("127.0.0.1", "localhost", "::1"):
        auth.check_bind(auth.AccessPolicy(), host)
    assert "open to anyone" in caplog.text
    for host in ("0.0.0.0", "10.1.2.3", "::"):
        with pytest.raises(RuntimeError, match=f"refusing to serve on {host} without API keys"):
            auth.check_bind(auth.AccessPolicy(), host)
    auth.check_bind(policy(LLMREC_ADMIN_KEY=ADMIN), "0.0.0.0")  # keys set: any address


def test_runner_refuses_an_open_public_bind_before_deploying(monkeypatch):
    from serve import runner

    for var in auth.ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="refusing to serve on 0.0.0.0"):
        runner.start("configs/serve.yaml", {"storage_root": "/nonexistent"}, host="0.0.0.0", port=1)


def _request(method, path, headers=(), client=("10.0.0.1", 5000)):
    scope = {"type": "http", "method": method, "path": path, "headers": [(k.encode(), v.encode()) for k, v in headers],
             "query_string": b"", "client": client, "server": ("127.0.0.1", 8000), "scheme": "http",
             "root_path": ""}

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}
    return Request(scope, receive)


def test_guard_answers_401_403_429_before_any_route_runs():
    from serve.app import _guard

    reached = []

    async def route(request):
        reached.append(request.url.path)
        return JSONResponse({"ok": True})

    def run(method, path, key=None, client=("10.0.0.1", 5000)):
        headers = [("authorization", f"Bearer {key}")] if key else []
        headers.append(("content-length", "2"))
        return asyncio.run(_guard(_request(method, path, headers, client), route))

    before = auth.current()
    try:
        auth.configure(policy(LLMREC_WRITE_KEY=WRITE, LLMREC_ADMIN_KEY=ADMIN), auth.RateLimiter("3/minute"))
        r = run("POST", "/v1/events")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert run("PUT", "/v1/items", WRITE).status_code == 403
        assert reached == []
        assert [run("POST", "/v1/events", WRITE).status_code for _ in range(4)] == [200, 200, 200, 429]
        limited = run("POST", "/v1/events", WRITE)
        assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 61
        assert run("POST", "/v1/events", ADMIN).status_code == 200  # counted per key
        assert run("GET", "/healthz", client=("10.0.0.2", 1)).status_code == 200  # probes never throttled
        assert [run("POST", "/v1/recommend", client=("10.0.0.3", 1)).status_code for _ in range(4)][-1] == 429
        assert run("POST", "/v1/recommend", client=("10.0.0.4", 1)).status_code == 200  # per address
    finally:
        auth.configure(*before)
