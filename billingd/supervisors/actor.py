"""The source actor (DESIGN §2): receiver → workers → settler, the shape of Broadway's producer →
processors → acknowledger, joined by bounded anyio memory streams.

* receiver: takes slots from the `prefetch` window, receives, hands deliveries to worker lanes
  (`lanes.Lanes`: partition routing and FIFO holds);
* workers (`concurrency`): call the handler, turn its outcome into a settlement (`policy`);
* settler (`settler.run_settler`): batches settlements and gives the window back;
* pauser: stops intake while a breaker the handler uses is open.

`drain()` stops intake at once; unstarted deliveries are released, in-flight handlers finish,
settlements are flushed, and `run()` returns. Each step is logged at debug (`drain step`, with
the seconds since the drain began): `intake stopped`, `unstarted released`, `workers done`,
`settler flushed`, `source closed`; broker calls made while draining are bounded by
`billingd.sources.base.DRAIN_CALL_TIMEOUT`. `abort()` (at `drain_timeout`) cancels the
workers; what they held is released when the source closes (AMQP requeues unacked deliveries
with the channel; the SQS source releases every message it still holds), never acked.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from billingd.clients.errors import CURRENT_MESSAGE, DownstreamError
from billingd.clients.ledger.attempts import AttemptLedger
from billingd.config.model import AnySource
from billingd.handlers.kit.base import Handler
from billingd.handlers.kit.outcome import DeadLetter, Outcome, Retry
from billingd.sources.base import (
    Delivery,
    Disposition,
    Settlement,
    Source,
    SourceEvents,
    SourceMisconfigured,
    SourceUnavailable,
)
from billingd.supervisors import streams
from billingd.supervisors.backoff import full_jitter
from billingd.supervisors.breaker import BreakerBoard
from billingd.supervisors.lanes import Lanes
from billingd.supervisors.poison import PoisonLog
from billingd.supervisors.policy import outcome_of, settlement_of
from billingd.supervisors.reporter import SourceReporter
from billingd.supervisors.settler import run_settler
from billingd.supervisors.window import Window
from billingd.telemetry import SourceMetrics, SourceStatus


class SourceActor:
    """Runs one source until drained; its `reporter` is its transport's `SourceEvents`.

    Args:
        settings: the source's `[[sources]]` entry.
        source: makes its transport (not yet opened), given the actor as its `SourceEvents`.
        handler: the billing handler for its messages.
        board: the daemon's breakers.
        metrics: metrics with this source's labels bound.
        status: the `/readyz` record of this source, updated in place.
        reconnect: `(initial, maximum)` backoff in seconds while the broker is unreachable.
        poison: crash counts of this source's messages, kept across its actors' restarts.
        tracer: an OpenTelemetry tracer: each message handled in a CONSUMER span
            (`billingd.telemetry.spans`); None: no spans.
        attempts: where counted attempts are kept (`AttemptLedger`): a redelivered message's
            attempt is read from it before its handler runs, a counted retry is counted in it, a
            dead letter clears it. None: the transport's own count is taken as is (tests on the
            in-memory source).
    """

    def __init__(
        self,
        settings: AnySource,
        source: Callable[[SourceEvents], Source],
        handler: Handler,
        board: BreakerBoard,
        metrics: SourceMetrics,
        status: SourceStatus,
        reconnect: tuple[float, float],
        rng: random.Random | None = None,
        poison: PoisonLog | None = None,
        tracer: Any = None,
        attempts: AttemptLedger | None = None,
    ) -> None:
        self.settings = settings
        self._attempts = attempts
        self.reporter = SourceReporter(settings.name, settings.handler, metrics, status)
        self.source = source(self.reporter)
        self.handler = handler
        self.board = board
        self.metrics = metrics
        self.status = status
        self._reconnect = reconnect
        self._rng = rng or random.Random()
        self._stopping = anyio.Event()
        self._drain_began: float | None = None
        self._intake_scope = anyio.CancelScope()
        self._connecting: anyio.CancelScope | None = None
        self._workers_scope: anyio.CancelScope | None = None
        self._aborted = False
        self._window = Window(settings.prefetch)
        self._lanes = Lanes(
            settings.partition_by or self.source.partition_default, settings.workers, self.source.ordered
        )
        self._poison = poison or PoisonLog()
        self._tracer = tracer
        self._destination = str(getattr(settings, "queue", "") or getattr(settings, "queue_url", "").rsplit("/", 1)[-1])
        self._suspects: set[str] = set()
        """Message ids held by a stage that raised: recorded in `poison` if the actor crashes."""
        self._log = self.reporter.log

    # -- control -----------------------------------------------------------------------------

    def drain(self) -> None:
        """Stop intake; let in-flight handlers finish; `run()` returns when all is settled."""
        if self._stopping.is_set():
            return
        self._drain_began = anyio.current_time()
        self._stopping.set()
        self._intake_scope.cancel()
        if self._connecting is not None:
            self._connecting.cancel()

    def abort(self) -> None:
        """Cancel the workers; their messages are released when the source closes, never acked.
        Implies `drain()`."""
        self.drain()
        self._aborted = True
        if self._workers_scope is not None:
            self._workers_scope.cancel()

    @property
    def draining(self) -> bool:
        """Whether `drain()` was called."""
        return self._stopping.is_set()

    # -- run ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect (retrying forever while the broker is unreachable), run the pipeline, and
        return once drained. Any other exception is a crash for the supervisor."""
        failures = 0
        reported = ""
        initial, maximum = self._reconnect
        while not self._stopping.is_set():
            delay = 0.0
            with anyio.CancelScope() as self._connecting:
                try:
                    await self.source.open()
                except SourceUnavailable as exc:
                    self.reporter.connection_changed(False, str(exc))
                    delay = full_jitter(failures, initial, maximum, self._rng)
                    failures += 1
                except SourceMisconfigured as exc:
                    self.reporter.connection_changed(False, f"misconfigured: {exc}")
                    if str(exc) != reported:
                        self._log.error("source misconfigured", error=str(exc))
                        reported = str(exc)
                    delay = maximum
            self._connecting = None
            self.status.attempted.set()
            if delay or self._stopping.is_set():
                if not delay:  # opened (or cancelled mid-open) while a drain began: close what is open
                    await self.source.close()
                with anyio.move_on_after(delay):
                    await self._stopping.wait()
                continue
            try:
                await self._pipeline()
            except Exception as exc:
                self._poison.record(self._suspects, f"{type(exc).__name__}: {exc}"[:300])
                raise
            finally:
                await self.source.close()
                self._drain_step("source closed")
                self.reporter.stopped()
            return
        self.reporter.stopped()

    def _drain_step(self, step: str, **fields: object) -> None:
        """Log one step of a drain with the seconds since it began (debug)."""
        if self._drain_began is not None:
            self._log.debug("drain step", step=step, after=round(anyio.current_time() - self._drain_began, 3), **fields)

    async def _pipeline(self) -> None:
        s = self.settings
        settle_send, settle_recv = anyio.create_memory_object_stream[Settlement](s.prefetch + s.workers)
        lanes = [anyio.create_memory_object_stream[Delivery](s.prefetch) for _ in range(self._lanes.count)]
        linger = min(self.source.settle_linger, s.ack_flush)
        async with anyio.create_task_group() as outer:
            outer.start_soon(self.source.run_background)
            outer.start_soon(self._pauser)
            async with anyio.create_task_group() as pipeline:
                pipeline.start_soon(
                    run_settler, settle_recv, self.source, linger, self._settled, self._suspects, self._log
                )
                async with settle_send, anyio.create_task_group() as workers:
                    self._workers_scope = workers.cancel_scope
                    if self._aborted:
                        workers.cancel_scope.cancel()
                    for i in range(s.workers):
                        lane = lanes[i % self._lanes.count][1]
                        workers.start_soon(self._worker, lane.clone(), settle_send.clone())
                    for _, recv in lanes:
                        recv.close()
                    await self._intake([send for send, _ in lanes])
                self._drain_step("workers done")
            self._drain_step("settler flushed")
            outer.cancel_scope.cancel()

    def _settled(self, batch: list[Settlement]) -> None:
        self._window.release(len(batch))
        self._lanes.settled(batch)

    # -- receiver ----------------------------------------------------------------------------

    async def _intake(self, lanes: list[MemoryObjectSendStream[Delivery]]) -> None:
        try:
            with self._intake_scope:
                async with anyio.create_task_group() as receivers:
                    for _ in range(self.source.receivers):
                        receivers.start_soon(self._receiver, lanes)
        finally:
            self._stopping.set()  # intake has ended, however: workers release what is unstarted
            with anyio.CancelScope(shield=True):  # stop_intake bounds its own broker calls
                leftover = await self.source.stop_intake()
                self._drain_step("intake stopped", leftover=len(leftover))
                self._window.take(len(leftover))
                await self._dispatch(leftover, lanes)
                for lane in lanes:
                    await lane.aclose()
                self._drain_step("unstarted released")

    async def _receiver(self, lanes: list[MemoryObjectSendStream[Delivery]]) -> None:
        failures = 0
        initial, maximum = self._reconnect
        while True:
            wanted = await self._window.acquire(self.source.receive_max)
            try:
                batch = await self.source.receive(wanted)
            except SourceUnavailable as exc:
                self._window.release(wanted)
                self.reporter.connection_changed(False, str(exc))
                await anyio.sleep(full_jitter(failures, initial, maximum, self._rng))
                failures += 1
                continue
            failures = 0
            self._window.release(wanted - len(batch))
            with anyio.CancelScope(shield=True):  # a received batch always reaches a worker
                await self._dispatch(batch, lanes)

    async def _dispatch(self, batch: Sequence[Delivery], lanes: list[MemoryObjectSendStream[Delivery]]) -> None:
        if not batch:
            return
        self.metrics.received.inc(len(batch))
        for delivery in batch:
            if delivery.error is None and (verdict := self._poison.verdict(delivery.message_id)):
                delivery.error = verdict
        self._lanes.hold(batch)
        for delivery in batch:
            if not await streams.send(lanes[self._lanes.lane_of(delivery)], delivery):
                return

    # -- workers -----------------------------------------------------------------------------

    async def _worker(
        self, deliveries: MemoryObjectReceiveStream[Delivery], settled: MemoryObjectSendStream[Settlement]
    ) -> None:
        async with deliveries, settled:
            while True:
                try:
                    delivery = await streams.receive(deliveries)
                except anyio.EndOfStream:
                    return
                if self._stopping.is_set() or not self._lanes.may_start(delivery):
                    settlement = Settlement(delivery, Disposition.RELEASE)
                else:
                    try:
                        settlement = await self._handle(delivery)
                    except Exception:
                        self._suspects.add(delivery.message_id)
                        raise
                self._lanes.handled(settlement)
                if not await streams.send(settled, settlement):
                    return

    async def _handle(self, delivery: Delivery) -> Settlement:
        if delivery.redelivered and self._attempts is not None:
            await self._recall_attempts(delivery)
        if self._tracer is not None:
            return await self._handle_traced(delivery)
        outcome, seconds = await self._timed(delivery)
        self.metrics.duration.observe(seconds)
        settlement = await self._settlement(delivery, outcome)
        self.reporter.outcome(settlement)
        return settlement

    async def _recall_attempts(self, delivery: Delivery) -> None:
        """Set a redelivered message's attempt to billingd's own count (see `AttemptLedger`)."""
        assert self._attempts is not None
        try:
            delivery.attempt = await self._attempts.counted(self.settings.name, _identity(delivery)) + 1
        except DownstreamError:  # Redis is down: whatever happens next, it is not counted
            delivery.attempt = 1

    async def _settlement(self, delivery: Delivery, outcome: Outcome) -> Settlement:
        """The settlement of `outcome`: a counted retry is counted in the attempt ledger first
        (uncounted when Redis cannot take it: an outage is not the message's attempt); a dead
        letter forgets the message's count (a replay starts at attempt 1)."""
        ledger, name = self._attempts, self.settings.name
        recorded = delivery.redelivered
        if ledger is not None and isinstance(outcome, Retry) and outcome.counted:
            try:
                delivery.attempt = await ledger.count(name, _identity(delivery))
                recorded = True
            except DownstreamError as exc:
                outcome = Retry(f"{outcome.reason} (not counted: {exc})"[:1000], outcome.delay, counted=False)
        settlement = settlement_of(delivery, outcome, self.settings, self._rng)
        if ledger is not None and recorded and settlement.disposition is Disposition.DEAD_LETTER:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:
                    await ledger.clear(name, _identity(delivery))
                except DownstreamError:
                    pass  # kept until it expires: a replay then starts at the count it had
        return settlement

    async def _timed(self, delivery: Delivery) -> tuple[Outcome, float]:
        """The handler's outcome and how long it took (seconds), counted as in flight meanwhile."""
        metrics = self.metrics
        metrics.running += 1
        started = time.perf_counter()
        try:
            outcome = await self._call_handler(delivery)
        finally:
            metrics.running -= 1
        return outcome, time.perf_counter() - started

    async def _handle_traced(self, delivery: Delivery) -> Settlement:
        """`_handle` inside the message's CONSUMER span, its duration observed with the trace id as
        an exemplar."""
        from billingd.telemetry import spans

        try:
            attributes, carrier = self.source.trace_carrier(delivery)
        except Exception:  # noqa: BLE001 — a message whose context cannot be read is still handled
            attributes, carrier = {}, {}
        with spans.process_span(self._tracer, self._destination, attributes, carrier) as span:
            outcome, seconds = await self._timed(delivery)
            self.metrics.duration.observe(seconds, spans.exemplar(span))
            settlement = await self._settlement(delivery, outcome)
            spans.annotate(span, settlement.disposition.value, settlement.reason)
        self.reporter.outcome(settlement)
        return settlement

    async def _call_handler(self, delivery: Delivery) -> Outcome:
        if delivery.error is not None:
            return DeadLetter(delivery.error)
        token = CURRENT_MESSAGE.set(delivery.message_id)
        try:
            return await self.handler.handle(delivery)
        except Exception as exc:  # noqa: BLE001 — classified; a handler bug is a retry, never a crash
            outcome = outcome_of(exc, retry_initial=self.settings.retry_initial, rng=self._rng)
            if outcome is not None:
                return outcome
            self._log.exception("handler failed unexpectedly", message_id=delivery.message_id, attempt=delivery.attempt)
            return Retry(f"unexpected {type(exc).__name__}: {exc}")
        finally:
            CURRENT_MESSAGE.reset(token)

    # -- pauser ------------------------------------------------------------------------------

    async def _pauser(self) -> None:
        names = self.handler.downstreams
        if not names:
            return
        while True:
            blocking = await self.board.wait_blocking(names)
            self.status.paused_by = [b.name for b in blocking]
            self._log.warning("intake paused", breakers=self.status.paused_by)
            await self.source.pause()
            await self.board.wait_admitting(names)
            await self.source.resume()
            self.status.paused_by = []
            self._log.info("intake resumed")


def _identity(delivery: Delivery) -> str:
    """The name of `delivery`'s attempt count: its transport's identity, else its message id."""
    return delivery.identity or delivery.message_id
