"""One answer to "is this config valid?", for `billingd check`, `billingd run` and SIGHUP."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from billingd.config import ConfigError, Settings, load_config
from billingd.handlers.kit.base import HandlerSpec
from billingd.handlers.registry import discover, handler_errors


def validate(path: str | os.PathLike[str], handlers: Mapping[str, HandlerSpec[Any]] | None = None) -> Settings:
    """Load `path` and check it whole: TOML, types, cross-key rules, handler names and options
    (`handlers`: the installed ones, `discover()`, unless given).

    Raises:
        ConfigError: every error found, each with its TOML path.
    """
    settings = load_config(path)
    errors = handler_errors(settings, handlers if handlers is not None else discover())
    if errors:
        raise ConfigError(errors, str(path))
    return settings
