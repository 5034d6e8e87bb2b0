"""Configuration: `billingd.toml` → typed, frozen settings (DESIGN §4)."""

from billingd.config.durations import Duration, format_duration, parse_duration
from billingd.config.loader import ConfigError, check_value, convert, load_config, parse_config
from billingd.config.model import (
    AmqpSourceSettings,
    AnySource,
    ResolvedBreaker,
    Settings,
    SourceSettings,
    SqsSourceSettings,
)

__all__ = [
    "AmqpSourceSettings",
    "AnySource",
    "ConfigError",
    "Duration",
    "ResolvedBreaker",
    "Settings",
    "SourceSettings",
    "SqsSourceSettings",
    "check_value",
    "convert",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
]
