"""`HandlerHarness`: one handler run through billingd's real source actor on the in-memory source.

What Dramatiq's `StubBroker` and Broadway's `test_message` are to them: the handler is built by the
registry from a `[[sources]]` entry exactly as `billingd run` builds it (its `handler_options`
validated), its clients reach a real Redis (and, when the test gives one, the Stripe double), and
each message goes through the actor's whole path — the attempt ledger, the breakers, the
exception → outcome policy, retries with their backoff, dead letters with their reasons.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import msgspec

from billingd.clients import Clients
from billingd.config import Settings, convert
from billingd.handlers.kit.base import Handler, HandlerContext, HandlerSpec
from billingd.handlers.registry import build_handler, discover, handler_errors
from billingd.sources.base import Disposition, Settlement
from billingd.sources.memory import MemorySource
from billingd.supervisors.actor import SourceActor
from billingd.supervisors.breaker import BreakerBoard
from billingd.supervisors.poison import PoisonLog
from billingd.telemetry import Metrics, SourceStatus

#: Fast retries and breakers, so that a test sees a retried message come back within a second.
FAST = {
    "retry_initial": "10ms",
    "retry_max": "100ms",
}


@dataclass(frozen=True)
class Result:
    """How one message left the actor: `disposition` (`"ack"` or `"dead_letter"`), the dead
    letter's `reason`, `attempts` (billingd's counted attempts: an outage's uncounted retries are
    not attempts) and `deliveries` (every time the handler was given it, retries of any kind)."""

    message_id: str
    disposition: str
    reason: str
    attempts: int
    deliveries: int

    @property
    def acked(self) -> bool:
        """Applied, or a proven duplicate."""
        return self.disposition == "ack"


class HandlerHarness:
    """Runs handler `handler` (a registered name) with `handler_options` against `redis_url`.

    ```python
    async with HandlerHarness("usage", redis_url="redis://127.0.0.1:6379/14") as harness:
        result = await harness.send({"event_type": "ai_credits", ...})
        assert result.acked
    ```

    `sections` are other `billingd.toml` sections (`stripe = {...}`, `breakers = {...}`); the
    Stripe double's `stripe_settings()` points `[stripe]` at it. `handlers` replaces the installed
    handlers (a spec under test that is not installed yet).

    Raises (on entry):
        ValueError: the configuration is invalid (every error, with its path).
    """

    def __init__(
        self,
        handler: str,
        handler_options: Mapping[str, Any] | None = None,
        *,
        redis_url: str,
        handlers: Mapping[str, HandlerSpec[Any]] | None = None,
        prefetch: int = 10,
        **sections: Mapping[str, Any],
    ) -> None:
        source = {"name": "harness", "type": "amqp", "exchange": "", "queue": "harness", "handler": handler,
                  "handler_options": dict(handler_options or {}), "prefetch": prefetch, **FAST}  # fmt: skip
        tree: dict[str, Any] = {
            "redis": {"url": redis_url, "timeout": "2s"},
            "breakers": {"default": {"failure_threshold": 5, "reset_timeout": "200ms", "reset_timeout_max": "1s"}},
            "reconcile": {"interval": "0s"},
            "sources": [source],
        }
        for name, section in sections.items():
            tree[name] = {**tree.get(name, {}), **section}
        self.settings: Settings = convert(tree, Settings)
        self._handlers = handlers if handlers is not None else discover()
        self.metrics = Metrics("test")
        self._ids = itertools.count(1)
        self._stack = AsyncExitStack()
        self.handler: Handler | None = None
        self.clients: Clients | None = None
        self._source: MemorySource | None = None
        self._actor: SourceActor | None = None

    async def __aenter__(self) -> HandlerHarness:
        try:
            return await self._start()
        except BaseException:
            await self._stack.aclose()  # what was started (clients, the source) is closed again
            raise

    async def _start(self) -> HandlerHarness:
        errors = handler_errors(self.settings, self._handlers)
        if errors:
            raise ValueError("; ".join(errors))
        settings = self.settings
        board = BreakerBoard(settings, self.metrics)
        clients = self.clients = Clients(settings.redis, settings.stripe, board.get, self.metrics)
        self._stack.push_async_callback(clients.aclose)
        source_settings = settings.sources[0]
        context = HandlerContext(source_settings, clients, settings.stripe, settings.razorpay, self.metrics)
        handler = self.handler = build_handler(context, self._handlers)
        source = self._source = await self._stack.enter_async_context(MemorySource(receive_max=10))
        actor = self._actor = SourceActor(
            source_settings, source.bind, handler, board, self.metrics.for_source("harness"),
            SourceStatus("harness"), (0.01, 0.1), random.Random(7), PoisonLog(), None, clients.attempts,
        )  # fmt: skip
        group = await self._stack.enter_async_context(anyio.create_task_group())
        group.start_soon(actor.run)
        self._stack.callback(group.cancel_scope.cancel)
        self._stack.callback(actor.drain)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self._stack.__aexit__(kind, error, trace)

    def put(self, body: bytes | Mapping[str, Any], message_id: str | None = None, **attributes: Any) -> str:
        """Enqueue one message (a mapping is sent as JSON; `message_id` may repeat: a copy);
        returns this delivery's id, for `result`."""
        assert self._source is not None, "use the harness as `async with`"
        raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
        number = next(self._ids)
        identity = message_id or f"harness-{number}"
        delivery = f"{identity}#{number}"
        self._source.put(raw, identity, attributes=attributes, delivery_id=delivery)
        return delivery

    async def send(
        self,
        body: bytes | Mapping[str, Any],
        message_id: str | None = None,
        *,
        within: float = 10.0,
        **attributes: Any,
    ) -> Result:
        """Enqueue one message and wait (at most `within` seconds) until it is acked or dead-lettered.

        Raises:
            TimeoutError: the message is still being retried after `within` seconds.
        """
        return await self.result(self.put(body, message_id, **attributes), within=within)

    async def result(self, delivery_id: str, *, within: float = 10.0) -> Result:
        """Wait for the final settlement (ack or dead letter) of the delivery `put` returned.

        Raises:
            TimeoutError: none within `within` seconds.
        """
        with anyio.fail_after(within):
            while True:
                final = self._final(delivery_id)
                if final is not None:
                    return final
                await anyio.sleep(0.005)

    def settlements(self, message_id: str) -> list[Settlement]:
        """Every settlement so far of the deliveries of `message_id` (every copy: retries, then
        each copy's final one), in order."""
        assert self._source is not None
        return [s for s in self._source.settled if s.delivery.message_id == message_id]

    def _final(self, delivery_id: str) -> Result | None:
        assert self._source is not None
        settled = [s for s in self._source.settled if s.delivery.delivery_id == delivery_id]
        if not settled or settled[-1].disposition not in (Disposition.ACK, Disposition.DEAD_LETTER):
            return None
        last = settled[-1]
        counted = last.delivery.attempt  # billingd's count (AttemptLedger), set before the handler ran
        return Result(last.delivery.message_id, last.disposition.value, last.reason, counted, len(settled))
