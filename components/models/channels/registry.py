"""The channels, in the order their scores are computed and summed. A new channel: one module in
this package (a ``Channel`` subclass and its ``CHANNEL``) and one line here."""

from __future__ import annotations

from typing import Tuple

from components.models.channels import covisit, popularity, retriever, text
from components.models.channels.base import Channel

REGISTRY: Tuple[Channel, ...] = (retriever.CHANNEL, covisit.CHANNEL, popularity.CHANNEL, text.CHANNEL)
BY_NAME = {c.name: c for c in REGISTRY}
# Names in fitting (and reporting) order.
CHANNELS = tuple(c.name for c in sorted(REGISTRY, key=lambda c: c.fit_order))
