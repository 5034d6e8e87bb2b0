"""`ai_tokens`: an AI model provider's token usage, priced per model, counted once, billed through Stripe.

A billingd handler plugin built on `billingd.api` only. Each message is one model request:

```json
{"request_id": "req_8f2c", "workspace_id": "ws_abc123", "model": "gpt-4o",
 "input_tokens": 1200, "output_tokens": 300, "stripe_customer_id": "cus_Q1"}
```

`handler_options`:

```toml
handler_options = { prices = { "gpt-4o" = { input = "2.50", output = "10.00" } }, meter = "ai_spend" }
```

Prices are in currency units per million tokens, so a request costs `input_tokens × input +
output_tokens × output` micro-units (rounded half-even to a whole micro-unit). One Lua script
records the request (its id, cost and time) and adds the tokens and the cost to the workspace's
month (`billingd:aitokens:{ws}:usage:<YYYY-MM>`: fields `<model>:input`, `<model>:output`,
`cost_micros`) — a second copy of the message finds the record and adds nothing. With `meter`
set, the cost in micro-units is reported once to that Stripe meter for the request's
`stripe_customer_id`, with the cost and time the record holds (a retry a day later, or after the
prices changed, reports what was counted, when it was counted) and `meter_identifier(workspace,
"ai_tokens", request id)` as Stripe's identifier (two workspaces may reuse request ids).

Dead letters: a model without a price, token counts that are not whole non-negative numbers, a
request without a customer when a meter is configured. Redis or Stripe unavailable: retried.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Annotated

import msgspec

from billingd.api import (
    ACK,
    DeadLetter,
    Duration,
    HandlerContext,
    HandlerSpec,
    Id,
    JsonDecoder,
    Ledger,
    Message,
    MeterEventExists,
    OnceLedger,
    Outcome,
    Script,
    StripeGateway,
    meter_identifier,
    redis_key,
    to_micros_rounded,
)

__all__ = ["SPEC", "AiTokensHandler", "AiTokensOptions", "ModelPrice", "TokenLedger", "TokenUsage"]

#: Most tokens one request may report (10¹²): far above any context window, far below a counter's limit.
MAX_TOKENS = 10**12
Tokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
#: Most a model may cost per million tokens (currency units).
MAX_PRICE = Decimal(10**6)


class ModelPrice(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A model's prices in currency units per million tokens."""

    input: Decimal
    output: Decimal

    def __post_init__(self) -> None:
        for price in (self.input, self.output):
            if not price.is_finite() or not 0 <= price <= MAX_PRICE:
                raise ValueError(f"a price per million tokens is a number from 0 to {MAX_PRICE}, not {price}")


class AiTokensOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`handler_options` of `ai_tokens`."""

    prices: dict[str, ModelPrice] = msgspec.field(default_factory=dict)
    """Model name → prices; a request for a model not listed is dead-lettered."""
    meter: str = ""
    """A Stripe meter `event_name` to report each request's cost (micro-units) to; empty: Redis only."""
    dedup_ttl: Duration = Duration(15 * 86400)
    """How long a request id is remembered (seconds): at least the queue's and DLQ's retention."""


class TokenUsage(msgspec.Struct, frozen=True):
    """One model request's usage (unknown fields are ignored)."""

    request_id: Id
    workspace_id: Id
    model: Id
    input_tokens: Tokens
    output_tokens: Tokens
    stripe_customer_id: str | None = None


_RECORD = Script.of("""
local seen = redis.call('HMGET', KEYS[1], 'cost', 'at')
if seen[1] then return {0, tonumber(seen[1]), tonumber(seen[2])} end
redis.call('HSET', KEYS[1], 'cost', ARGV[5], 'at', ARGV[7])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], ARGV[2] .. ':input', ARGV[3])
redis.call('HINCRBY', KEYS[2], ARGV[2] .. ':output', ARGV[4])
redis.call('HINCRBY', KEYS[2], 'cost_micros', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {1, tonumber(ARGV[5]), tonumber(ARGV[7])}
""")


class TokenLedger(Ledger):
    """The workspaces' token counters and request ids in Redis."""

    async def record(self, usage: TokenUsage, cost_micros: int, dedup_ttl: int, now: int) -> tuple[bool, int, int]:
        """Add one request's tokens and cost (at `now`, Unix seconds) unless it was recorded;
        returns `(added now, cost in micro-units, when it was recorded)` — a duplicate's are the
        first copy's.

        Raises:
            DownstreamUnavailable, DownstreamRejected: from `Ledger.run`.
        """
        seen = redis_key("aitokens", "seen", usage.request_id, tag=usage.workspace_id)
        month = time.strftime("%Y-%m", time.gmtime(now))
        counters = redis_key("aitokens", "usage", month, tag=usage.workspace_id)
        keep = 400 * 86400  # a month's counters outlive the invoice that bills them
        args = (dedup_ttl, usage.model, usage.input_tokens, usage.output_tokens, cost_micros, keep, now)
        added, cost, at = await self.run(_RECORD, (seen, counters), args)
        return bool(added), int(cost), int(at)


class AiTokensHandler:
    """Applies `TokenUsage` messages (see module docstring)."""

    def __init__(
        self,
        ledger: TokenLedger,
        once: OnceLedger,
        stripe: StripeGateway | None,
        options: AiTokensOptions,
        lease: float = 60.0,
    ) -> None:
        self._lease = lease
        self._ledger = ledger
        self._once = once
        self._stripe = stripe
        self._options = options
        self._decoder = JsonDecoder(TokenUsage)
        self.downstreams: tuple[str, ...] = ("redis", "stripe") if stripe is not None else ("redis",)

    async def handle(self, message: Message) -> Outcome:
        """Count one request once; report its cost to Stripe once (when a meter is configured)."""
        usage = self._decoder.decode(message.body)
        price = self._options.prices.get(usage.model)
        if price is None:
            return DeadLetter(f"no price for model {usage.model!r}: add it to handler_options.prices (not applied)")
        if self._stripe is not None and not (usage.stripe_customer_id or "").startswith("cus_"):
            return DeadLetter(
                f"request {usage.request_id!r} has no stripe_customer_id (cus_…): not applied, not billed"
            )
        cost = to_micros_rounded(
            (usage.input_tokens * price.input + usage.output_tokens * price.output).scaleb(-6), "cost"
        )
        _, cost, at = await self._ledger.record(usage, cost, int(self._options.dedup_ttl), int(time.time()))
        if self._stripe is None or cost == 0:
            return ACK
        stripe, customer = self._stripe, usage.stripe_customer_id or ""
        identifier = meter_identifier(usage.workspace_id, "ai_tokens", usage.request_id)

        async def report() -> None:
            try:
                await stripe.create_meter_event(
                    event_name=self._options.meter, customer=customer, value=cost, identifier=identifier, timestamp=at
                )
            except MeterEventExists as exc:  # (v1) Stripe holds this very event: sent before
                if exc.identifier != identifier:
                    raise

        step = f"aitokens-meter:{usage.request_id}"
        await self._once.run_once(usage.workspace_id, step, report, lease=self._lease, ttl=int(self._options.dedup_ttl))
        return ACK


def _build(context: HandlerContext, options: AiTokensOptions) -> AiTokensHandler:
    clients = context.clients
    stripe = clients.stripe if options.meter else None
    # the lease outlives one Stripe step: a budget slot, the call, a session renewal (as `usage`)
    lease = 3 * float(context.stripe.max_wait) + 2 * float(context.stripe.timeout) + 5
    return AiTokensHandler(clients.ledger(TokenLedger), clients.once, stripe, options, lease)


SPEC = HandlerSpec("ai_tokens", AiTokensOptions, _build, "AI token usage priced per model (example plugin)")
