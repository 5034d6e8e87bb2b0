"""billingd's public handler API: every name a handler needs, and nothing else.

A handler package imports from here only; everything else in `billingd` is internal and may change
in any release. docs/api.md documents each name (shapes, units, errors); a test keeps this
module's `__all__` and that page equal. The built-in handlers (`billingd.handlers.*`) are built on
these same names.

* building and registering a handler: `HandlerSpec`, `HandlerContext`, `Handler`, `Message`,
  `NoOptions`, `JsonDecoder`, `Id`, `OptionalId`, `MAX_ID_LENGTH`, `Duration`;
* outcomes: `Outcome`, `ACK`, `Retry`, `DeadLetter`, `InvalidMessage`, and the downstream errors
  `DownstreamUnavailable`, `DownstreamRejected`, `Throttled`, `Busy`;
* effects exactly once: `Ledger` (Lua scripts through the command batcher), `Script`,
  `redis_key` (hash-tagged keys), `OnceLedger` (a step once per subject and key, across
  replicas), `StripeGateway` (Stripe's budget, idempotency keys, error classification),
  `MeterEventExists`, `meter_identifier`, `stripe_key`, `HttpForwarder`;
* money: `to_units`, `to_micros`, `to_micros_rounded`, `MAX_UNITS`, `MAX_MINOR_UNITS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from billingd.clients.errors import Busy, DownstreamRejected, DownstreamUnavailable, Throttled
from billingd.clients.http import HttpForwarder
from billingd.clients.ledger.base import RedisLedger as Ledger
from billingd.clients.ledger.base import key as redis_key
from billingd.clients.ledger.once import OnceLedger
from billingd.clients.ledger.scripts import Script
from billingd.clients.stripe_ids import bounded as stripe_key
from billingd.clients.stripe_ids import meter_identifier
from billingd.config.durations import Duration
from billingd.handlers.kit.base import (
    MAX_ID_LENGTH,
    Handler,
    HandlerContext,
    HandlerSpec,
    Id,
    JsonDecoder,
    Message,
    NoOptions,
    OptionalId,
)
from billingd.handlers.kit.money import MAX_MINOR_UNITS, MAX_UNITS, to_micros, to_micros_rounded, to_units
from billingd.handlers.kit.outcome import ACK, DeadLetter, InvalidMessage, Outcome, Retry

if TYPE_CHECKING:  # the Stripe SDK loads on first use (a daemon without Stripe starts ~15 MiB smaller)
    from billingd.clients.stripe import MeterEventExists, StripeGateway

__all__ = [
    "ACK",
    "MAX_ID_LENGTH",
    "MAX_MINOR_UNITS",
    "MAX_UNITS",
    "Busy",
    "DeadLetter",
    "DownstreamRejected",
    "DownstreamUnavailable",
    "Duration",
    "Handler",
    "HandlerContext",
    "HandlerSpec",
    "HttpForwarder",
    "Id",
    "InvalidMessage",
    "JsonDecoder",
    "Ledger",
    "Message",
    "MeterEventExists",
    "NoOptions",
    "OnceLedger",
    "OptionalId",
    "Outcome",
    "Retry",
    "Script",
    "StripeGateway",
    "Throttled",
    "meter_identifier",
    "redis_key",
    "stripe_key",
    "to_micros",
    "to_micros_rounded",
    "to_units",
]


def __getattr__(name: str) -> Any:
    """`StripeGateway` and `MeterEventExists`, imported (with the Stripe SDK) when first named."""
    if name in ("StripeGateway", "MeterEventExists"):
        from billingd.clients import stripe

        return getattr(stripe, name)
    raise AttributeError(f"module 'billingd.api' has no attribute {name!r}")
