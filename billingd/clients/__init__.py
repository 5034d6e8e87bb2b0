"""Downstream clients: the Redis ledger, Stripe, Razorpay, the HTTP forwarder."""

from billingd.clients.errors import (
    Busy,
    CircuitOpen,
    DownstreamError,
    DownstreamRejected,
    DownstreamUnavailable,
    Guard,
    Throttled,
    Unguarded,
)
from billingd.clients.set import Clients

__all__ = [
    "Busy",
    "CircuitOpen",
    "Clients",
    "DownstreamError",
    "DownstreamRejected",
    "DownstreamUnavailable",
    "Guard",
    "Throttled",
    "Unguarded",
]
