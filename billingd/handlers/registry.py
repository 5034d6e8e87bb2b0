"""Handlers by the names `billingd.toml` uses (DESIGN §5), and validation of `handler_options`."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from billingd.config import Settings, check_value, convert
from billingd.handlers import (
    billing_sync,
    payment_events,
    sms_billing,
    sms_dlr,
    stripe_events,
    usage,
    webhook_forward,
)
from billingd.handlers.kit.base import Handler, HandlerContext, HandlerSpec

#: Every handler billingd ships, by name.
HANDLERS: Mapping[str, HandlerSpec[Any]] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            sms_billing.SPEC,
            sms_dlr.SPEC,
            usage.SPEC,
            billing_sync.SPEC,
            stripe_events.SPEC,
            webhook_forward.SPEC,
            payment_events.SPEC,
        )
    }
)


def handler_errors(settings: Settings, handlers: Mapping[str, HandlerSpec[Any]] = HANDLERS) -> list[str]:
    """Config errors about handlers: unknown names and invalid `handler_options`, with paths."""
    errors: list[str] = []
    for i, source in enumerate(settings.sources):
        spec = handlers.get(source.handler)
        if spec is None:
            known = ", ".join(sorted(handlers))
            errors.append(f'sources[{i}].handler: unknown handler "{source.handler}" (known: {known})')
            continue
        errors += check_value(source.handler_options, spec.options, f"sources[{i}].handler_options")
    return errors


def build_handler(context: HandlerContext, handlers: Mapping[str, HandlerSpec[Any]] = HANDLERS) -> Handler:
    """Build the handler of `context.source` with its validated options.

    Raises:
        KeyError: unknown handler (`handler_errors` reports it before the daemon starts).
    """
    spec = handlers[context.source.handler]
    return spec.build(context, convert(context.source.handler_options, spec.options))
