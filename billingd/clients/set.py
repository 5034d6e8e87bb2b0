"""`Clients`: the downstream clients of one daemon, made on first use and closed together."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter

from billingd.clients.errors import Guard
from billingd.clients.http import HttpForwarder
from billingd.clients.ledger import OnceLedger, SmsLedger, UsageLedger
from billingd.clients.ledger.batch import CommandBatcher
from billingd.clients.ledger.subscriptions import SubscriptionLedger
from billingd.clients.redis import connect_redis
from billingd.clients.stripe import StripeGateway
from billingd.config.model import Settings


class Clients:
    """Lazily built clients sharing one Redis pool; `guard(name)` gives the breaker of a downstream.

    Handlers take what they need from here at construction, so a daemon whose sources never touch
    Stripe never builds a Stripe client. `registry` is where handler-specific metrics go.
    """

    def __init__(
        self, settings: Settings, guard: Callable[[str], Guard], registry: CollectorRegistry | None = None
    ) -> None:
        self.settings = settings
        self.guard = guard
        self.registry = registry or CollectorRegistry()
        self._forwarders: dict[str, HttpForwarder] = {}
        self._counters: dict[str, Counter] = {}

    def counter(self, name: str, documentation: str, labels: list[str]) -> Counter:
        """A counter on the daemon's registry, created once however many handlers ask for it."""
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = Counter(name, documentation, labels, registry=self.registry)
        return counter

    @cached_property
    def redis(self) -> aioredis.Redis:
        """The shared Redis client (`[redis]`)."""
        return connect_redis(self.settings.redis)

    @cached_property
    def batcher(self) -> CommandBatcher:
        """Pipelines the scripts of every ledger together."""
        return CommandBatcher(self.redis)

    @cached_property
    def sms_ledger(self) -> SmsLedger:
        """SMS charges and CDRs (seed 002)."""
        return SmsLedger(self.redis, self.guard("redis"), self.batcher)

    @cached_property
    def usage_ledger(self) -> UsageLedger:
        """Entitlements, usage counters, customer mapping (seeds 001, 004)."""
        return UsageLedger(self.redis, self.guard("redis"), self.batcher)

    @cached_property
    def subscription_ledger(self) -> SubscriptionLedger:
        """Entitlements from Stripe subscriptions, features, customer mapping (seed 004)."""
        return SubscriptionLedger(self.redis, self.guard("redis"), self.batcher)

    @cached_property
    def once(self) -> OnceLedger:
        """Once-only steps (POSTs, Stripe calls) across workers and replicas."""
        return OnceLedger(self.redis, self.guard("redis"), self.batcher)

    @cached_property
    def stripe(self) -> StripeGateway:
        """Stripe (`[stripe]`), behind the `stripe` breaker."""
        return StripeGateway(self.settings.stripe, self.guard("stripe"))

    def forwarder(self, name: str, timeout: float = 10.0) -> HttpForwarder:
        """The HTTP forwarder behind breaker `forward:<name>` (one per name)."""
        forwarder = self._forwarders.get(name)
        if forwarder is None:
            breaker = f"forward:{name}"
            forwarder = self._forwarders[name] = HttpForwarder(breaker, self.guard(breaker), timeout)
        return forwarder

    async def aclose(self) -> None:
        """Close every client that was built."""
        for forwarder in self._forwarders.values():
            await forwarder.aclose()
        if "stripe" in self.__dict__:
            await self.stripe.aclose()
        if "redis" in self.__dict__:
            await self.redis.aclose()
