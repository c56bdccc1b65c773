"""Request validation of the HTTP API: every malformed request names its field."""

import pytest
from pydantic import ValidationError

from serve import api


def _fields(exc: ValidationError):
    return {".".join(str(p) for p in e["loc"]) for e in exc.errors()}


@pytest.mark.parametrize("body, field", [
    ({"user_id": "u", "k": 0}, "k"),
    ({"user_id": "u", "k": 101}, "k"),
    ({"user_id": "u", "k": "ten"}, "k"),
    ({"user_id": "u", "colour": "red"}, "colour"),
    ({"user_id": "u", "recent_events": [{"item_id": "a", "event": "stare"}]}, "recent_events.0.event"),
    ({"user_id": "u", "recent_events": [{"item_id": "a", "ts": "yesterday"}]}, "recent_events.0.ts"),
    ({"user_id": "u", "recent_events": [{"item_id": ""}]}, "recent_events.0.item_id"),
    ({"user_id": "u", "filters": {"categories": "Cycling"}}, "filters.categories"),
    ({"user_id": "x" * 300}, "user_id"),
    ({"user_id": "u", "exclude": ["a"] * 1001}, "exclude"),
])
def test_bad_recommend_requests_name_the_field(body, field):
    with pytest.raises(ValidationError) as exc:
        api.RecommendRequest(**body)
    assert field in _fields(exc.value)


@pytest.mark.parametrize("event, field", [
    ({"item_id": "i"}, "user_id"),
    ({"user_id": "u", "item_id": "i", "ts": 1_700_000_000}, "ts"),  # seconds, not milliseconds
    ({"user_id": "u", "item_id": "i", "ts": "2999-01-01T00:00:00Z"}, "ts"),
    ({"user_id": "u", "item_id": "i", "ts": True}, "ts"),
    ({"user_id": "u", "item_id": "i", "value": "lots"}, "value"),
    ({"user_id": "u", "item_id": "i", "extra": 1}, "extra"),
])
def test_bad_events_name_the_field(event, field):
    with pytest.raises(ValidationError) as exc:
        api.EventsRequest(events=[event])
    assert any(f.endswith(field) for f in _fields(exc.value)), _fields(exc.value)


def test_event_timestamps_accept_epoch_ms_and_iso_and_default_to_now():
    ev = api.EventsRequest(events=[
        {"user_id": "u", "item_id": "i", "ts": 1_700_000_000_123},
        {"user_id": "u", "item_id": "i", "ts": "2023-11-14T22:13:20.123Z"},
        {"user_id": "u", "item_id": "i", "ts": "2023-11-14T22:13:20.123"},  # naive = UTC
        {"user_id": "u", "item_id": "i"},
    ]).events
    assert [e.ts for e in ev[:3]] == [1_700_000_000_123] * 3
    assert abs(ev[3].ts - api.now_ms()) < 5_000


def test_empty_and_oversized_event_batches_are_refused():
    with pytest.raises(ValidationError):
        api.EventsRequest(events=[])
    with pytest.raises(ValidationError):
        api.EventsRequest(events=[{"user_id": "u", "item_id": "i"}] * (api.MAX_EVENTS + 1))


def test_items_need_an_id_and_bounded_text():
    with pytest.raises(ValidationError) as exc:
        api.ItemsRequest(items=[{"title": "no id"}])
    assert "items.0.item_id" in _fields(exc.value)
    with pytest.raises(ValidationError):
        api.ItemsRequest(items=[{"item_id": "a", "text": "x" * (api.MAX_TEXT + 1)}])
    ok = api.ItemsRequest(items=[{"item_id": " a ", "title": "T", "categories": ["c"]}])
    assert ok.items[0].item_id == "a"


def test_openapi_declares_the_bearer_key_where_the_guard_asks_for_one():
    """/docs gets an Authorize button: the schema declares the key scheme the Guard checks
    (Authorization: Bearer), required on exactly the routes serve/auth.py closes to reads, optional
    elsewhere; declaring it changes no answer (the Guard alone answers 401/403)."""
    import asyncio

    from starlette.requests import Request

    from serve import auth
    from serve.ingress import API_KEY, http_app

    schema = http_app.openapi()
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": API_KEY.model.description}
    ops = [(method.upper(), path, op) for path, item in schema["paths"].items() for method, op in item.items()]
    assert ops
    for method, path, op in ops:
        closed = auth.right_needed(method, path) > auth.READ
        assert op["security"] == ([{"apiKey": []}] if closed else [{}, {"apiKey": []}]), (method, path)
    assert ("POST", "/v1/events") in {(m, p) for m, p, op in ops if op["security"] == [{"apiKey": []}]}
    assert all(p["name"] != "self" for _, _, op in ops for p in op.get("parameters", []))

    def request(headers):
        return Request({"type": "http", "method": "POST", "path": "/v1/events", "headers": headers})

    assert asyncio.run(API_KEY(request([]))) is None  # no key: left to the Guard, not a FastAPI 401/403
    assert asyncio.run(API_KEY(request([(b"authorization", b"Basic abc")]))) is None
    assert asyncio.run(API_KEY(request([(b"authorization", b"Bearer k")]))).credentials == "k"
