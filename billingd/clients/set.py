"""`Clients`: the downstream clients of one daemon, made on first use and closed together."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from billingd.clients.errors import Guard
from billingd.clients.http import HttpForwarder
from billingd.clients.ledger import OnceLedger, SmsLedger, UsageLedger
from billingd.clients.ledger.attempts import AttemptLedger
from billingd.clients.ledger.base import RedisLedger
from billingd.clients.ledger.batch import CommandBatcher
from billingd.clients.ledger.jasmin import JasminLedger
from billingd.clients.ledger.limits import SharedLimits
from billingd.clients.ledger.outbox import OutboxLedger
from billingd.clients.ledger.payments import PaymentLedger
from billingd.clients.ledger.subscriptions import SubscriptionLedger
from billingd.clients.redis import RedisClient, connect_redis
from billingd.config.model import RedisSettings, StripeSettings, TlsSettings

if TYPE_CHECKING:
    from billingd.clients.stripe import StripeGateway
    from billingd.telemetry import Metrics

L = TypeVar("L", bound=RedisLedger)


class Clients:
    """Lazily built downstream clients sharing one Redis pool; `guard(name)` gives the breaker of a
    downstream; `redis_tls` is `[redis] tls` resolved (`Settings.tls_of`).

    Handlers take what they need from here at construction, so a daemon whose sources never touch
    Stripe never builds a Stripe client.
    """

    def __init__(
        self,
        redis: RedisSettings,
        stripe: StripeSettings,
        guard: Callable[[str], Guard],
        metrics: Metrics | None = None,
        tracer: Any = None,
        redis_tls: TlsSettings | None = None,
    ) -> None:
        self.tracer = tracer
        """An OpenTelemetry tracer for child spans of the clients' calls (None: traces off)."""
        self._redis_settings = redis
        self._redis_tls = (
            redis_tls if redis_tls is not None else redis.tls if isinstance(redis.tls, TlsSettings) else None
        )
        """`[redis] tls` resolved (a `[tls.<name>]` table named there is passed in)."""
        self._stripe_settings = stripe
        self.guard = guard
        self._metrics = metrics
        self._forwarders: dict[str, HttpForwarder] = {}
        self._ledgers: dict[type[RedisLedger], RedisLedger] = {}

    @cached_property
    def redis(self) -> RedisClient:
        """The shared Redis client (`[redis]`)."""
        return connect_redis(self._redis_settings, self._redis_tls)

    @cached_property
    def batcher(self) -> CommandBatcher:
        """Pipelines the scripts of every ledger together."""
        s = self._redis_settings
        return CommandBatcher(self.redis, replicas=s.min_replicas_acked, replica_timeout=float(s.wait_timeout))

    @cached_property
    def sms_ledger(self) -> SmsLedger:
        """SMS charges and CDRs (seed 002)."""
        return SmsLedger(self.redis, self.guard("redis"), self.batcher, self.tracer)

    @cached_property
    def jasmin_ledger(self) -> JasminLedger:
        """Jasmin submit records, the SMSC id → msgid map, submit results (seed 002, native)."""
        return JasminLedger(self.redis, self.guard("redis"), self.batcher, self.tracer)

    @cached_property
    def usage_ledger(self) -> UsageLedger:
        """Entitlements, usage counters, customer mapping (seeds 001, 004)."""
        return UsageLedger(self.redis, self.guard("redis"), self.batcher, self.tracer)

    @cached_property
    def subscription_ledger(self) -> SubscriptionLedger:
        """Entitlements from Stripe subscriptions, features, customer mapping (seed 004)."""
        return SubscriptionLedger(self.redis, self.guard("redis"), self.batcher, self.tracer)

    @cached_property
    def once(self) -> OnceLedger:
        """Once-only steps (POSTs, Stripe calls) across workers and replicas."""
        return OnceLedger(self.redis, self.guard("redis"), self.batcher, self.tracer)

    @cached_property
    def attempts(self) -> AttemptLedger:
        """Counted attempts per message, for every source (a broker's own count is not one)."""
        return AttemptLedger(self.redis, self.guard("redis"), self.batcher, self.tracer)

    @cached_property
    def outbox(self) -> OutboxLedger:
        """The meter outboxes, their leases, the journal (metering)."""
        return OutboxLedger(self.redis, self.guard("redis"), self.batcher, self.tracer)

    @cached_property
    def payments(self) -> PaymentLedger:
        """Which payment pays each invoice (pay calls serialised per invoice, outcomes recorded)."""
        return PaymentLedger(self.redis, self.guard("redis"), self.batcher, self.tracer)

    @cached_property
    def limits(self) -> SharedLimits:
        """Request budgets and leases shared by every replica (Stripe's rate and concurrency limits)."""
        return SharedLimits(self.redis, self.guard("redis"), self.batcher, self.tracer)

    @cached_property
    def stripe(self) -> StripeGateway:
        """Stripe (`[stripe]`), behind the `stripe` breaker, within the shared request budget. The
        stripe SDK is imported here, on first use: a daemon without Stripe sources starts faster
        and ~15 MiB smaller."""
        from billingd.clients.stripe import StripeGateway

        return StripeGateway(self._stripe_settings, self.guard("stripe"), self.limits, self._metrics, self.tracer)

    def ledger(self, kind: type[L]) -> L:
        """The daemon's one ledger of class `kind` (a `RedisLedger` subclass, e.g. a plugin's): on
        the shared Redis client, its command batcher and the `redis` breaker."""
        ledger = self._ledgers.get(kind)
        if ledger is None:
            ledger = self._ledgers[kind] = kind(self.redis, self.guard("redis"), self.batcher, self.tracer)
        assert isinstance(ledger, kind)
        return ledger

    def forwarder(self, name: str, timeout: float = 10.0) -> HttpForwarder:
        """The HTTP forwarder behind breaker `forward:<name>` (one per name)."""
        forwarder = self._forwarders.get(name)
        if forwarder is None:
            breaker = f"forward:{name}"
            forwarder = self._forwarders[name] = HttpForwarder(breaker, self.guard(breaker), timeout, self.tracer)
        return forwarder

    async def aclose(self) -> None:
        """Close every client that was built."""
        for forwarder in self._forwarders.values():
            await forwarder.aclose()
        if "stripe" in self.__dict__:
            await self.stripe.aclose()
        if "redis" in self.__dict__:
            await self.redis.aclose()
