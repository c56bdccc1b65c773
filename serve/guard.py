"""Access, rate and size checks in front of every route (``Guard``), and the ingress replica's
access settings (``configure_access``). The rules themselves (keys, rights, limits) are
``serve/auth.py``.
"""

from __future__ import annotations

import logging
from typing import Optional

from fastapi.responses import JSONResponse

from components.config import ServeAppConfig
from serve import api, auth

log = logging.getLogger(__name__)


class Guard:
    """Access, rate and size checks before a route reads anything (an unauthenticated client
    cannot make the replica read a body). Plain ASGI, not Starlette's BaseHTTPMiddleware: it
    adds no task or stream per request on the hot path."""

    BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k: v for k, v in scope.get("headers") or () if k in (b"authorization", b"content-length")}
        authorization = headers[b"authorization"].decode("latin-1") if b"authorization" in headers else None
        method, path = scope["method"], scope["path"]
        policy, limiter = auth.current()
        denied = policy.check(method, path, authorization)
        if denied is not None:
            status, message = denied
            extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return await JSONResponse({"error": message}, status, extra)(scope, receive, send)
        if path != "/healthz":  # probes are never throttled
            client = scope.get("client")
            wait = limiter.hit(auth.client_id(authorization, client[0] if client else None))
            if wait is not None:
                return await JSONResponse({"error": f"rate limit: retry in {wait} s"}, 429,
                                          {"Retry-After": str(wait)})(scope, receive, send)
        too_big = JSONResponse({"error": f"body: larger than {api.MAX_BODY_BYTES} bytes"}, 413)
        size = headers.get(b"content-length")
        if size is not None:
            if not size.isdigit() or int(size) > api.MAX_BODY_BYTES:
                return await too_big(scope, receive, send)
            return await self.app(scope, receive, send)
        if method not in self.BODY_METHODS:
            return await self.app(scope, receive, send)
        # No length announced (chunked): count while reading, stop at the limit, and replay the
        # body read so far to the route.
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > api.MAX_BODY_BYTES:
                return await too_big(scope, receive, send)
        pending = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return await self.app(scope, replay, send)


def configure_access(settings: ServeAppConfig) -> None:
    """Load the access policy and rate limiter the ``Guard`` of this replica applies, after
    refusing an open service on a non-loopback bind (``auth.check_bind``)."""
    policy = auth.AccessPolicy.load(keys_file=settings.keys_file, require_read_key=settings.require_read_key)
    auth.check_bind(policy, _http_host())
    auth.configure(policy, auth.RateLimiter(settings.rate_limit, settings.rate_limit_storage))
    log.info("access: %s", auth.dumps_public(policy))


def _http_host() -> Optional[str]:
    """The address Serve's proxies bind to (None if the controller cannot say: ``check_bind``
    then treats it as public)."""
    try:
        import ray
        from ray.serve.context import _get_global_client

        return ray.get(_get_global_client()._controller.get_http_config.remote(), timeout=30).host
    except Exception as exc:  # an internal API: a newer Ray may move it
        log.warning("could not read Serve's http host (%s); treated as a public bind", exc)
        return None
