"""Identifiers billingd gives Stripe, derived deterministically and kept within Stripe's limits.

A producer's key is unique only within its subject (a workspace, a user) and, for seed 001, its
entitlement key (DESIGN §10). Stripe's namespaces are the whole account: a meter event's
`identifier` is unique per account for at least 24 hours (at most 100 characters, API reference
"Create a billing meter event"), an `Idempotency-Key` replays the first answer for 24 hours (at
most 255 characters, docs.stripe.com/idempotency). So what billingd sends is derived from the
scoped key — the same on every retry and every replica, different for every tenant:

* `meter_identifier(subject, name, key)` = `bd1-` + SHA-256 (hex) of the length-prefixed parts:
  68 characters, whatever the producer's key;
* `idempotency_key(kind, *parts)` = `billingd-<kind>-<parts joined by '-'>` when that fits 255
  characters, else its first 180 characters, `~` and the SHA-256 of the whole.
"""

from __future__ import annotations

import hashlib

#: Stripe's limits (characters).
MAX_IDENTIFIER = 100
MAX_IDEMPOTENCY_KEY = 255
IDENTIFIER_PREFIX = "bd1-"


def _scoped(*parts: str) -> bytes:
    """`parts` joined so that no two different tuples give the same bytes (length-prefixed)."""
    return b"".join(f"{len(p.encode())}:".encode() + p.encode() for p in parts)


def meter_identifier(subject: str, name: str, key: str) -> str:
    """The meter event `identifier` of usage `key` of event type (or entitlement) `name` of
    `subject`: `bd1-` and 64 hex digits (see module docstring)."""
    return IDENTIFIER_PREFIX + hashlib.sha256(_scoped(subject, name, key)).hexdigest()


def idempotency_key(kind: str, *parts: str) -> str:
    """An `Idempotency-Key` of at most 255 characters for a request of `kind` about `parts`."""
    plain = "-".join(("billingd", kind, *parts))
    if len(plain) <= MAX_IDEMPOTENCY_KEY:
        return plain
    return f"{plain[:180]}~{hashlib.sha256(_scoped(kind, *parts)).hexdigest()}"


def bounded(value: str, limit: int) -> str:
    """`value` if it has at most `limit` characters, else a prefix and a digest of the whole in
    `limit` characters (a Stripe metadata value takes 500)."""
    if len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{value[: limit - len(digest) - 1]}~{digest}"
