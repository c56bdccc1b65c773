"""Request and response shapes of the HTTP API (the contract in DESIGN.md, "Serving contract").

Every request model forbids unknown fields and bounds its sizes, so a malformed request gets a 4xx
whose message names the field before it reaches a model. Timestamps are epoch milliseconds or
ISO-8601 strings; absent means server time.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from components.data.schemas import EVENT_TYPES

MAX_K = 100
MAX_EVENTS = 1000  # per POST /v1/events
MAX_RECENT = 200  # recent_events per /v1/recommend
MAX_ITEMS = 256  # per PUT /v1/items
MAX_ID = 256  # characters of a user or item id
MAX_TEXT = 10_000
MAX_BODY_BYTES = 1 << 20
# Timestamps outside these bounds are typos (seconds for milliseconds, years off), not events.
TS_MIN_MS = 946_684_800_000  # 2000-01-01
TS_FUTURE_SLACK_MS = 86_400_000  # a day of client clock skew


def now_ms() -> int:
    return int(time.time() * 1000)


def parse_ts(value: Union[int, float, str, None]) -> int:
    """Epoch ms (int/float) or ISO-8601 -> epoch ms; None -> now. Raises ValueError naming the rule."""
    if value is None:
        return now_ms()
    if isinstance(value, bool):
        raise ValueError("must be epoch milliseconds or an ISO-8601 string, not a boolean")
    if isinstance(value, (int, float)):
        ms = int(value)
    else:
        s = value.strip()
        try:
            ms = int(s)
        except ValueError:
            try:
                t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"must be epoch milliseconds or an ISO-8601 string, got {value!r}") from None
            if t.tzinfo is None:
                t = t.replace(tzinfo=dt.timezone.utc)
            ms = int(t.timestamp() * 1000)
    if ms < TS_MIN_MS:
        raise ValueError(f"{ms} is before 2000-01-01 in epoch milliseconds (seconds given for milliseconds?)")
    if ms > now_ms() + TS_FUTURE_SLACK_MS:
        raise ValueError(f"{ms} is more than a day in the future")
    return ms


def check_event(v: str) -> str:
    if v not in EVENT_TYPES:
        raise ValueError(f"must be one of {', '.join(EVENT_TYPES)}")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


Id = Field(min_length=1, max_length=MAX_ID)


class _EventFields(_Strict):
    item_id: str = Id
    event: str = "click"

    @field_validator("event")
    @classmethod
    def _event(cls, v: str) -> str:
        return check_event(v)


class RecentEvent(_EventFields):
    ts: Optional[Union[int, str]] = None

    @field_validator("ts")
    @classmethod
    def _ts(cls, v):
        return parse_ts(v) if v is not None else None


class Filters(_Strict):
    categories: Optional[List[str]] = Field(default=None, max_length=100)


class RecommendRequest(_Strict):
    user_id: Optional[str] = Field(default=None, max_length=MAX_ID)
    k: int = Field(default=10, ge=1, le=MAX_K)
    recent_events: List[RecentEvent] = Field(default_factory=list, max_length=MAX_RECENT)
    exclude: List[str] = Field(default_factory=list, max_length=1000)
    filters: Optional[Filters] = None


class RecommendedItem(BaseModel):
    item_id: str
    title: str
    score: float
    reason: Optional[str] = Field(description="the history item that most explains the pick (None: cold start)")
    reason_title: Optional[str] = Field(default=None, description="that history item's title, for display: "
                                        "\"because you liked <reason_title>\"")
    categories: List[str] = Field(default_factory=list)


class RecommendResponse(BaseModel):
    user_id: Optional[str]
    items: List[RecommendedItem]
    model_version: str
    took_ms: float
    cold_start: bool = False
    unknown_items: List[str] = Field(default_factory=list, description="ids in recent_events/exclude not in the catalog")


class Event(_EventFields):
    user_id: str = Id
    ts: Optional[Union[int, str]] = Field(default=None, validate_default=True, description="epoch ms or ISO-8601; default now")
    value: Optional[float] = None
    session_id: Optional[str] = Field(default=None, max_length=MAX_ID)
    context: Optional[Dict[str, Any]] = None
    event_id: Optional[str] = Field(default=None, min_length=1, max_length=MAX_ID, description=(
        "client-chosen idempotency key: an event retried with the same id (after a 503, a timeout) "
        "counts once in live state, retraining and every read of the feedback log"))

    @field_validator("ts")
    @classmethod
    def _ts(cls, v):
        return parse_ts(v)


class EventsRequest(_Strict):
    events: List[Event] = Field(min_length=1, max_length=MAX_EVENTS)


class EventsResponse(BaseModel):
    accepted: int
    shard: str = Field(description="the feedback shard holding these events (with live state sharded by "
                                   "user, the shards, comma-separated, when the batch spans several)")
    unknown_items: List[str] = Field(default_factory=list,
                                     description="items not in the catalog yet: stored, but neither used for "
                                                 "recommendations nor counted in the live co-visits")


class Item(_Strict):
    item_id: str = Id
    title: str = Field(default="", max_length=1000)
    text: str = Field(default="", max_length=MAX_TEXT)
    categories: List[str] = Field(default_factory=list, max_length=50)


class ItemsRequest(_Strict):
    items: List[Item] = Field(min_length=1, max_length=MAX_ITEMS)


class ItemsResponse(BaseModel):
    upserted: int
    new: int
    model_version: str


class CanaryRule(BaseModel):
    """A canary's own decision thresholds (components.online.canary.CanaryRule); those not given
    are the serving application's."""

    model_config = ConfigDict(extra="forbid")
    confidence: Optional[float] = Field(None, gt=0.0, lt=1.0)
    min_requests: Optional[int] = Field(None, gt=0)
    error_rate_margin: Optional[float] = Field(None, ge=0.0)
    latency_p99_ratio_max: Optional[float] = Field(None, ge=0.0)
    min_recommendations: Optional[int] = Field(None, gt=0)
    noninferiority_recommendations: Optional[int] = Field(None, gt=0)
    noninferiority_margin: Optional[float] = Field(None, ge=0.0)


class CanaryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_id: str = Field(min_length=1, max_length=MAX_ID, description="a published bundle (checkpoints/<model>/<run_id>/)")
    share: float = Field(0.1, gt=0.0, lt=1.0, description="the share of users served by the candidate")
    rule: Optional[CanaryRule] = Field(None, description="this canary's own decision thresholds")
