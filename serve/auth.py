"""Access control for the HTTP API: bearer keys with three rights, and per-key rate limits.

Keys come from the environment (``LLMREC_WRITE_KEY``, ``LLMREC_ADMIN_KEY``, ``LLMREC_READ_KEY``;
comma-separated lists, so a new key can be added before the old one is removed) and/or a secret
file named in the Serve config (``keys_file``: JSON or YAML ``{write: [...], admin: [...],
read: [...]}``, e.g. a mounted Kubernetes Secret). Rights nest: admin > write > read.

- read: ``POST /v1/recommend``, ``GET /v1/items/{id}``, health, version, metrics, the page, docs.
  Open unless ``require_read_key`` is set or a read key is configured.
- write: ``POST /v1/events``.
- admin: ``PUT /v1/items``, ``GET /v1/users``, ``GET /v1/users/{id}/history``, ``DELETE /v1/users/{id}``,
  ``POST``/``DELETE /v1/admin/canary``.

No key configured at all: the service is open (development) and only a loopback bind is allowed.
Keys are compared by their SHA-256 digests with ``hmac.compare_digest`` against every configured
key (no early exit), so timing reveals neither which key nor how much of one matched; they are
never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

log = logging.getLogger(__name__)

OPEN, READ, WRITE, ADMIN = 0, 1, 2, 3
RIGHTS = {"read": READ, "write": WRITE, "admin": ADMIN}
ENV_VARS = {"read": "LLMREC_READ_KEY", "write": "LLMREC_WRITE_KEY", "admin": "LLMREC_ADMIN_KEY"}
MIN_KEY_CHARS = 16

# (method, path pattern) -> right needed; anything not listed needs READ.
_ROUTES: List[Tuple[str, re.Pattern, int]] = [
    ("POST", re.compile(r"^/v1/events/?$"), WRITE),
    ("PUT", re.compile(r"^/v1/items/?$"), ADMIN),
    ("GET", re.compile(r"^/v1/users/?$"), ADMIN),
    ("GET", re.compile(r"^/v1/users/[^/]+/history/?$"), ADMIN),
    ("DELETE", re.compile(r"^/v1/users/[^/]+/?$"), ADMIN),
    ("POST", re.compile(r"^/v1/admin/"), ADMIN),
    ("DELETE", re.compile(r"^/v1/admin/"), ADMIN),
]


def right_needed(method: str, path: str) -> int:
    for m, pattern, right in _ROUTES:
        if method == m and pattern.match(path):
            return right
    return READ


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _split(value: Optional[str]) -> List[str]:
    return [k.strip() for k in (value or "").split(",") if k.strip()]


@dataclass
class AccessPolicy:
    """Digests of the configured keys with their right; ``open`` when no key is configured."""

    keys: List[Tuple[bytes, int]] = field(default_factory=list)
    require_read_key: bool = False

    @classmethod
    def load(cls, env: Mapping[str, str] = os.environ, keys_file: Optional[str] = None,
             require_read_key: bool = False) -> "AccessPolicy":
        found: Dict[str, List[str]] = {r: _split(env.get(var)) for r, var in ENV_VARS.items()}
        if keys_file:
            p = Path(keys_file)
            if not p.is_file():
                raise ValueError(f"keys_file: {keys_file} does not exist")
            import yaml  # JSON is YAML

            doc = yaml.safe_load(p.read_text()) or {}
            if not isinstance(doc, dict) or set(doc) - set(RIGHTS):
                raise ValueError(f"keys_file: {keys_file} must map read/write/admin to lists of keys")
            for right, keys in doc.items():
                keys = [keys] if isinstance(keys, str) else keys
                if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                    raise ValueError(f"keys_file: {right} must be a list of strings")
                found[right] += [k.strip() for k in keys if k.strip()]
        for right, keys in found.items():
            short = [k for k in keys if len(k) < MIN_KEY_CHARS]
            if short:  # the message names the right, never the key
                raise ValueError(f"{ENV_VARS[right]}: keys must be at least {MIN_KEY_CHARS} characters")
        keys = [(_digest(k), RIGHTS[r]) for r, ks in found.items() for k in ks]
        return cls(keys, require_read_key or bool(found["read"]))

    @property
    def open(self) -> bool:
        return not self.keys

    def right_of(self, key: str) -> int:
        """The highest right ``key`` carries (OPEN if none): every configured key is compared."""
        d, best = _digest(key), OPEN
        for digest, right in self.keys:
            if hmac.compare_digest(d, digest):
                best = max(best, right)
        return best

    def check(self, method: str, path: str, authorization: Optional[str]) -> Optional[Tuple[int, str]]:
        """None when the request may proceed, else (status, message) for a 401 or 403."""
        if self.open:
            return None
        need = right_needed(method, path)
        if need == READ and not self.require_read_key:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return 401, "authorization: send 'Authorization: Bearer <key>'"
        right = self.right_of(token.strip())
        if right == OPEN:
            return 401, "authorization: the key is not valid"
        if right < need:
            names = {v: k for k, v in RIGHTS.items()}
            return 403, f"authorization: this key may not {method} {path} (needs the {names[need]} key)"
        return None


def is_loopback(host: Optional[str]) -> bool:
    """Whether ``host`` is surely a loopback address; anything else (None, a name other than
    localhost, an unparseable string) is not."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(policy: AccessPolicy, host: Optional[str]) -> None:
    """Refuse an open service on a non-loopback address; warn about an open one on loopback.

    Fails closed: a bind address that is unknown (``host`` None: Serve could not say) or not
    recognisably loopback counts as public, so a lookup that broke cannot open the service."""
    if not policy.open:
        return
    if not is_loopback(host):
        where = host if host is not None else "an unknown address"
        raise RuntimeError(
            f"refusing to serve on {where} without API keys: set LLMREC_WRITE_KEY and LLMREC_ADMIN_KEY "
            "(or keys_file in the Serve config), or bind to 127.0.0.1")
    log.warning("no API keys configured: the API is open to anyone who can reach it (loopback only; "
                "set LLMREC_WRITE_KEY / LLMREC_ADMIN_KEY before exposing it)")


class RateLimiter:
    """Requests per key (per client address for requests without a key), via the ``limits``
    library: a moving window in this replica's memory by default, or shared by all replicas with
    a storage URI such as ``redis://host:6379``."""

    def __init__(self, rate: Optional[str], storage_uri: str = "memory://"):
        self.item = None
        if rate:
            from limits import parse, storage, strategies

            self.item = parse(rate)
            self.limiter = strategies.MovingWindowRateLimiter(storage.storage_from_string(storage_uri))

    def hit(self, who: str) -> Optional[int]:
        """None if allowed, else the seconds to wait (for Retry-After)."""
        if self.item is None or self.limiter.hit(self.item, who):
            return None
        import time

        reset = self.limiter.get_window_stats(self.item, who).reset_time
        return max(1, int(reset - time.time()) + 1)


def client_id(authorization: Optional[str], client_host: Optional[str]) -> str:
    """What a rate limit is counted against: a digest of the key (never the key), else the address."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "key:" + hashlib.sha256(token.strip().encode()).hexdigest()[:16]
    return "addr:" + (client_host or "unknown")


# The ingress replica's policy and limiter: set once by Ingress.__init__, read by the HTTP
# middleware (this module is imported by reference in the replica, so both see the same state).
_state: Dict[str, object] = {"policy": AccessPolicy(), "limiter": RateLimiter(None)}


def configure(policy: AccessPolicy, limiter: RateLimiter) -> None:
    _state["policy"], _state["limiter"] = policy, limiter


def current() -> Tuple[AccessPolicy, RateLimiter]:
    return _state["policy"], _state["limiter"]  # type: ignore[return-value]


def dumps_public(policy: AccessPolicy) -> str:
    """What may be said about the policy (status pages, logs): counts, never keys or digests."""
    counts = {name: sum(1 for _, r in policy.keys if r == right) for name, right in RIGHTS.items()}
    return json.dumps({"open": policy.open, "require_read_key": policy.require_read_key, "keys": counts})


def client_headers(env: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """Headers for this project's own clients (the pipeline's demo, benchmarks): the first admin
    key in the environment, else the first write key, else none (an open local service)."""
    keys = _split(env.get(ENV_VARS["admin"])) or _split(env.get(ENV_VARS["write"]))
    return {"Authorization": f"Bearer {keys[0]}"} if keys else {}
