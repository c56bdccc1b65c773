"""Access policy, bind check and rate limits of the HTTP API (serve/auth.py), no Ray: the
middleware is called directly with real Starlette requests."""

import asyncio
import json

import pytest
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


def test_open_service_check_fails_closed_when_the_bind_address_is_unknown(monkeypatch):
    """An unknown bind (Serve's http host could not be read: None) or one not recognisably
    loopback is treated as public: an open service refuses to start (issue 23 item 4)."""
    for host in (None, "", "my-host", "localhost.example.com", "[::1]", "127.0.0.1:8000"):
        with pytest.raises(RuntimeError, match="refusing to serve on"):
            auth.check_bind(auth.AccessPolicy(), host)
    auth.check_bind(policy(LLMREC_ADMIN_KEY=ADMIN), None)  # keys set: the address does not matter

    # the ingress replica's check: the controller lookup failing refuses the open service
    from components.config import ServeAppConfig
    from serve import guard

    for var in auth.ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(guard, "_http_host", lambda: None)
    with pytest.raises(RuntimeError, match="refusing to serve on an unknown address"):
        guard.configure_access(ServeAppConfig())


def test_runner_refuses_an_open_public_bind_before_deploying(monkeypatch):
    from serve import runner

    for var in auth.ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="refusing to serve on 0.0.0.0"):
        runner.start("configs/serve.yaml", {"storage_root": "/nonexistent"}, host="0.0.0.0", port=1)


def _call(method, path, key=None, client=("10.0.0.1", 5000), body=b"{}"):
    """One request through the real ASGI guard in front of a route that records it; returns
    (status, headers) as the client would see them."""
    from serve.guard import Guard

    reached.clear()

    async def route(scope, receive, send):
        reached.append(scope["path"])
        await JSONResponse({"ok": True})(scope, receive, send)

    headers = [(b"content-length", str(len(body)).encode())]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {"type": "http", "method": method, "path": path, "headers": headers, "query_string": b"",
             "client": client, "server": ("127.0.0.1", 8000), "scheme": "http", "root_path": ""}
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(Guard(route)(scope, receive, send))
    start = sent[0]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}


reached = []


def test_guard_answers_401_403_429_before_any_route_runs():
    before = auth.current()
    try:
        auth.configure(policy(LLMREC_WRITE_KEY=WRITE, LLMREC_ADMIN_KEY=ADMIN), auth.RateLimiter("3/minute"))
        status, headers = _call("POST", "/v1/events")
        assert status == 401 and headers["www-authenticate"] == "Bearer" and reached == []
        assert _call("PUT", "/v1/items", WRITE)[0] == 403 and reached == []
        assert [_call("POST", "/v1/events", WRITE)[0] for _ in range(4)] == [200, 200, 200, 429]
        status, headers = _call("POST", "/v1/events", WRITE)
        assert status == 429 and 1 <= int(headers["retry-after"]) <= 61 and reached == []
        assert _call("POST", "/v1/events", ADMIN)[0] == 200  # counted per key
        assert _call("GET", "/healthz", client=("10.0.0.2", 1))[0] == 200  # probes never throttled
        assert [_call("POST", "/v1/recommend", client=("10.0.0.3", 1))[0] for _ in range(4)][-1] == 429
        assert _call("POST", "/v1/recommend", client=("10.0.0.4", 1))[0] == 200  # per address
        assert _call("POST", "/v1/recommend", client=("10.0.0.5", 1), body=b"x" * (2 << 20))[0] == 413
    finally:
        auth.configure(*before)
