"""Loading the Serve application's settings (``components.config.ServeAppConfig``, the ``args`` of
``applications[]`` in configs/serve*.yaml), typed like every other config in the project:
dataclass defaults <- the Serve YAML's app args <- overrides (``serve.runner.start``), merged by
OmegaConf in struct mode, so an unknown arg fails with its name. The options themselves are
documented once, in ``components/config.py``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping, Optional, Union

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from components.config import ConfigError, ServeAppConfig
from components.online.canary import check_canary_config
from components.storage import Storage

MODES = ("graph", "fused")
PRECISIONS = ("fp32", "fp16")  # serve.retrieval.PRECISIONS (no torch import here)
MAX_LIVE_STATE_SHARDS = 256


def load_settings(*layers: Optional[Mapping[str, Any]]) -> ServeAppConfig:
    """Defaults <- each of ``layers`` in turn (the YAML's app args, then overrides).

    Raises:
        ConfigError: an unknown arg, a value of the wrong type or an invalid value; the message
            names the arg.
    """
    try:
        cfg = OmegaConf.structured(ServeAppConfig)
        for layer in layers:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(dict(layer or {})))
        settings: ServeAppConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except ConfigKeyError as exc:
        known = ", ".join(f.name for f in fields(ServeAppConfig))
        raise ConfigError(f"unknown serve application arg: {_key_of(exc)} (known: {known})") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid serve application arg {_key_of(exc)}: {exc.msg.splitlines()[0]}") from None
    validate_settings(settings)
    return settings


def as_settings(value: Union[ServeAppConfig, Mapping[str, Any], None]) -> ServeAppConfig:
    """``value`` itself when it is already settings, else ``load_settings(value)`` (a deployment
    constructed by hand, as the unit tests do, may be given the plain args)."""
    return value if isinstance(value, ServeAppConfig) else load_settings(value)


def validate_settings(s: ServeAppConfig) -> None:
    """Check what types alone cannot; raise ConfigError naming the arg."""
    if s.mode not in MODES:
        raise ConfigError(f"serve args mode must be graph or fused, got {s.mode!r}")
    if not 1 <= s.live_state_shards <= MAX_LIVE_STATE_SHARDS:
        raise ConfigError(f"serve args live_state_shards must be an integer 1..{MAX_LIVE_STATE_SHARDS}, "
                          f"got {s.live_state_shards!r}")
    for name in ("live_spill_users_max", "live_covisit_neighbours", "live_covisit_max_pairs", "ann_above"):
        if getattr(s, name) < 0:
            raise ConfigError(f"serve args {name} must be >= 0, got {getattr(s, name)!r}")
    if s.precision not in PRECISIONS:
        raise ConfigError(f"serve args precision must be one of {', '.join(PRECISIONS)}, got {s.precision!r}")
    if s.canary_check_s <= 0:
        raise ConfigError(f"serve args canary_check_s must be > 0, got {s.canary_check_s!r}")
    try:
        check_canary_config(s.canary)
    except ValueError as exc:
        raise ConfigError(f"serve args {exc}") from None
    if s.rate_limit:
        from limits import parse

        try:
            parse(s.rate_limit)
        except ValueError:
            raise ConfigError(f"serve args rate_limit: {s.rate_limit!r} is not like '300/second'") from None


def open_storage(s: ServeAppConfig) -> Storage:
    """The storage root the settings name (registry, bundles, feedback, upserts)."""
    return Storage(s.storage_root, endpoint_url=s.storage_endpoint)


def _key_of(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    return str(key) if key else str(exc).splitlines()[0]
