"""Candidate channels, one module each, and their fusion (``fusion.Channels``).

    retriever.py   the sequence retriever's <u, i>
    covisit.py     item-to-item co-occurrence (ItemKNN), with its live update between retrains
    text.py        LLM text similarity to the user's recent items (reaches brand-new items)
    popularity.py  log of training interactions
    registry.py    the list of channels (a new channel: a module here and a line there)
    fusion.py      ``Channels``: every channel's per-user z-score, summed with weights fitted on valid
"""

from components.models.channels.base import Channel, Query
from components.models.channels.covisit import LiveCovisitation, covisitation
from components.models.channels.fusion import Channels, FusionConfig, channel_names, describe, topk_excluding
from components.models.channels.registry import CHANNELS, REGISTRY

__all__ = ["CHANNELS", "REGISTRY", "Channel", "Channels", "FusionConfig", "LiveCovisitation", "Query",
           "channel_names", "covisitation", "describe", "topk_excluding"]
