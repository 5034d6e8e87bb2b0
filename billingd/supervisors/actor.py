"""The source actor (DESIGN §2): receiver → workers → settler, the shape of Broadway's producer →
processors → acknowledger, joined by bounded anyio memory streams.

* receiver: takes slots from the `prefetch` window, receives, hands deliveries to worker lanes;
* workers (`concurrency`): call the handler, turn its `Outcome` into a `Settlement`;
* settler: batches settlements (up to the transport's `settle_batch`, lingering at most
  `settle_linger`, ≤ `ack_flush`) and gives the window back;
* pauser: stops intake while a breaker the handler uses is open.

`drain()` stops intake at once; unstarted deliveries are released, in-flight handlers finish,
settlements are flushed, and `run()` returns. `abort()` (at `drain_timeout`) cancels the
workers; what they held is released when the source closes (AMQP requeues unacked deliveries
with the channel; the SQS source releases every message it still holds), never acked.

Stream hops use `send_nowait`/`receive_nowait` and only await when a stream is full or empty:
anyio's awaiting `send`/`receive` yield to the event loop on every item, which is most of the
per-message cost of a pipeline whose handler does little.
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from billingd.clients.errors import Busy, CircuitOpen, DownstreamRejected, DownstreamUnavailable
from billingd.config.model import AnySource
from billingd.handlers.base import Handler
from billingd.handlers.outcome import ACK, DeadLetter, InvalidMessage, Outcome, Retry
from billingd.sources.base import (
    Delivery,
    Disposition,
    Settlement,
    Source,
    SourceEvents,
    SourceMisconfigured,
    SourceUnavailable,
)
from billingd.supervisors.backoff import full_jitter
from billingd.supervisors.breaker import BreakerBoard
from billingd.supervisors.metrics import SourceMetrics
from billingd.supervisors.status import SourceStatus
from billingd.supervisors.window import Window

log = structlog.get_logger("billingd.actor")


class SourceActor:
    """Runs one source until drained. Implements `SourceEvents` for its transport.

    Args:
        settings: the source's `[[sources]]` entry.
        source: makes its transport (not yet opened), given the actor as its `SourceEvents`.
        handler: the billing handler for its messages.
        board: the daemon's breakers.
        metrics: metrics with this source's labels bound.
        status: the `/readyz` record of this source, updated in place.
        reconnect: `(initial, maximum)` backoff in seconds while the broker is unreachable.
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
    ) -> None:
        self.settings = settings
        self.source = source(self)
        self.handler = handler
        self.board = board
        self.metrics = metrics
        self.status = status
        self._reconnect = reconnect
        self._rng = rng or random.Random()
        self._stopping = anyio.Event()
        self._intake_scope = anyio.CancelScope()
        self._connecting: anyio.CancelScope | None = None
        self._workers_scope: anyio.CancelScope | None = None
        self._aborted = False
        self._window = Window(settings.prefetch)
        self._partition = settings.partition_by or self.source.partition_default
        self._lanes = settings.workers if self._partition else 1
        self._ordered = self.source.ordered
        self._held_keys: dict[str, int] = {}
        self._blocked: set[str] = set()
        self._log = log.bind(source=settings.name)

    # -- control -----------------------------------------------------------------------------

    def drain(self) -> None:
        """Stop intake; let in-flight handlers finish; `run()` returns when all is settled."""
        if self._stopping.is_set():
            return
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

    # -- SourceEvents ------------------------------------------------------------------------

    def connection_changed(self, up: bool, reason: str) -> None:
        """Record a connection change for `/readyz`, the `billingd_source_up` gauge and the log."""
        if up == self.status.up and (up or reason == self.status.reason):
            return
        self.status.up, self.status.reason = up, ("" if up else reason)
        self.metrics.up.set(1 if up else 0)
        if up:
            self._log.info("source connected")
        else:
            self._log.warning("source disconnected", reason=reason)

    def broker_request(self, operation: str, count: int = 1) -> None:
        """Count broker calls in `billingd_broker_requests_total`."""
        self.metrics.broker_request(operation, count)

    def queue_depth(self, messages: int) -> None:
        """Export the sampled queue depth as `billingd_queue_depth`."""
        self.metrics.queue_depth.set(messages)

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
                    self.connection_changed(False, str(exc))
                    delay = full_jitter(failures, initial, maximum, self._rng)
                    failures += 1
                except SourceMisconfigured as exc:
                    self.connection_changed(False, f"misconfigured: {exc}")
                    if str(exc) != reported:
                        self._log.error("source misconfigured", error=str(exc))
                        reported = str(exc)
                    delay = maximum
            self._connecting = None
            self.status.attempted.set()
            if delay or self._stopping.is_set():
                with anyio.move_on_after(delay):
                    await self._stopping.wait()
                continue
            try:
                await self._pipeline()
            finally:
                await self.source.close()
                self.metrics.up.set(0)
                self.status.up, self.status.reason = False, "stopped"
            return

    async def _pipeline(self) -> None:
        s = self.settings
        settle_send, settle_recv = anyio.create_memory_object_stream[Settlement](s.prefetch + s.workers)
        lanes = [anyio.create_memory_object_stream[Delivery](s.prefetch) for _ in range(self._lanes)]
        async with anyio.create_task_group() as outer:
            outer.start_soon(self.source.run_background)
            outer.start_soon(self._pauser)
            async with anyio.create_task_group() as pipeline:
                pipeline.start_soon(self._settler, settle_recv)
                async with settle_send, anyio.create_task_group() as workers:
                    self._workers_scope = workers.cancel_scope
                    if self._aborted:
                        workers.cancel_scope.cancel()
                    for i in range(s.workers):
                        workers.start_soon(self._worker, lanes[i % self._lanes][1].clone(), settle_send.clone())
                    for _, recv in lanes:
                        recv.close()
                    await self._intake([send for send, _ in lanes])
            outer.cancel_scope.cancel()

    # -- receiver ----------------------------------------------------------------------------

    async def _intake(self, lanes: list[ObjectSendStream[Delivery]]) -> None:
        try:
            with self._intake_scope:
                async with anyio.create_task_group() as receivers:
                    for _ in range(self.source.receivers):
                        receivers.start_soon(self._receiver, lanes)
        finally:
            self._stopping.set()  # intake has ended, however: workers release what is unstarted
            with anyio.CancelScope(shield=True):
                leftover = await self.source.stop_intake()
                self._window.take(len(leftover))
                await self._dispatch(leftover, lanes)
                for lane in lanes:
                    await lane.aclose()

    async def _receiver(self, lanes: list[ObjectSendStream[Delivery]]) -> None:
        failures = 0
        initial, maximum = self._reconnect
        while True:
            wanted = await self._window.acquire(self.source.receive_max)
            try:
                batch = await self.source.receive(wanted)
            except SourceUnavailable as exc:
                self._window.release(wanted)
                self.connection_changed(False, str(exc))
                await anyio.sleep(full_jitter(failures, initial, maximum, self._rng))
                failures += 1
                continue
            failures = 0
            self._window.release(wanted - len(batch))
            with anyio.CancelScope(shield=True):  # a received batch always reaches a worker
                await self._dispatch(batch, lanes)

    async def _dispatch(self, batch: Sequence[Delivery], lanes: list[ObjectSendStream[Delivery]]) -> None:
        if not batch:
            return
        self.metrics.received.inc(len(batch))
        if self._ordered:
            for delivery in batch:
                key = delivery.partition_key or ""
                self._held_keys[key] = self._held_keys.get(key, 0) + 1
        if len(lanes) == 1:
            for delivery in batch:
                if not await _send(lanes[0], delivery):
                    return
            return
        for delivery in batch:
            if not await _send(lanes[zlib.crc32(self._partition_key(delivery).encode()) % len(lanes)], delivery):
                return

    def _partition_key(self, delivery: Delivery) -> str:
        field = self._partition or ""
        if field == "MessageGroupId":
            return delivery.partition_key or ""
        try:
            value: Any = msgspec.json.decode(delivery.body)
            for part in field.split("."):
                value = value[part]
        except (msgspec.DecodeError, KeyError, TypeError, IndexError):
            return ""  # unpartitionable: lane 0; the handler will dead-letter it if it is invalid
        return str(value)

    # -- workers -----------------------------------------------------------------------------

    async def _worker(self, deliveries: ObjectReceiveStream[Delivery], settled: ObjectSendStream[Settlement]) -> None:
        async with deliveries, settled:
            while True:
                try:
                    delivery = deliveries.receive_nowait()
                except anyio.WouldBlock:
                    try:
                        delivery = await deliveries.receive()
                    except anyio.EndOfStream:
                        return
                except anyio.EndOfStream:
                    return
                key = delivery.partition_key or ""
                if self._stopping.is_set() or (self._ordered and key in self._blocked):
                    settlement = Settlement(delivery, Disposition.RELEASE)
                else:
                    settlement = await self._handle(delivery)
                if self._ordered and settlement.disposition in (Disposition.RETRY, Disposition.RELEASE):
                    self._blocked.add(key)  # later messages of this group must not overtake it
                if not await _send(settled, settlement):
                    return

    async def _handle(self, delivery: Delivery) -> Settlement:
        metrics = self.metrics
        metrics.running += 1
        started = time.perf_counter()
        try:
            outcome = await self._call_handler(delivery)
        finally:
            metrics.running -= 1
        metrics.duration.observe(time.perf_counter() - started)
        return self._settlement(delivery, outcome)

    async def _call_handler(self, delivery: Delivery) -> Outcome:
        if delivery.error is not None:
            return DeadLetter(delivery.error)
        try:
            return await self.handler.handle(delivery)
        except InvalidMessage as exc:
            return DeadLetter(exc.reason)
        except CircuitOpen as exc:
            return Retry(
                str(exc), delay=exc.retry_after + self._rng.uniform(0, self.settings.retry_initial), counted=False
            )
        except DownstreamUnavailable as exc:
            return Retry(str(exc), counted=not self.board.get(exc.downstream).blocking)
        except DownstreamRejected as exc:
            return DeadLetter(str(exc))
        except Busy as exc:  # a duplicate of work in progress: come back later, uncounted
            return Retry(f"busy: {exc}", delay=self.settings.retry_initial, counted=False)
        except Exception as exc:  # noqa: BLE001 — a handler bug is a retry, never a crash (DESIGN §2)
            self._log.exception("handler failed unexpectedly", message_id=delivery.message_id, attempt=delivery.attempt)
            return Retry(f"unexpected {type(exc).__name__}: {exc}")

    def _settlement(self, delivery: Delivery, outcome: Outcome) -> Settlement:
        s = self.settings
        if outcome is ACK:
            self.metrics.processed["ack"].inc()
            return Settlement(delivery, Disposition.ACK)
        if isinstance(outcome, Retry):
            if not outcome.counted or delivery.attempt < s.max_attempts:
                delay = outcome.delay
                if delay is None:
                    delay = full_jitter(delivery.attempt - 1, s.retry_initial, s.retry_max, self._rng)
                self.metrics.processed["retry"].inc()
                self._log.debug(
                    "retry",
                    message_id=delivery.message_id,
                    attempt=delivery.attempt,
                    delay=round(delay, 3),
                    counted=outcome.counted,
                    reason=outcome.reason,
                )
                return Settlement(delivery, Disposition.RETRY, outcome.reason, delay, outcome.counted)
            reason = f"gave up after {delivery.attempt} attempts: {outcome.reason}"
        else:
            assert isinstance(outcome, DeadLetter)
            reason = outcome.reason
        self.metrics.processed["dead_letter"].inc()
        self._log.warning(
            "dead-letter", message_id=delivery.message_id, attempt=delivery.attempt, handler=s.handler, reason=reason
        )
        return Settlement(delivery, Disposition.DEAD_LETTER, reason)

    # -- settler -----------------------------------------------------------------------------

    async def _settler(self, settlements: ObjectReceiveStream[Settlement]) -> None:
        source = self.source
        linger = min(source.settle_linger, self.settings.ack_flush)
        async with settlements:
            while True:
                try:
                    batch = [await settlements.receive()]
                except anyio.EndOfStream:
                    return
                deadline = anyio.current_time() + linger
                while len(batch) < source.settle_batch:
                    try:
                        batch.append(settlements.receive_nowait())
                        continue
                    except anyio.WouldBlock:
                        pass
                    except anyio.EndOfStream:
                        break
                    remaining = deadline - anyio.current_time()
                    if remaining <= 0:
                        break
                    with anyio.move_on_after(remaining):
                        try:
                            batch.append(await settlements.receive())
                        except anyio.EndOfStream:
                            break
                await source.settle(batch)
                self._window.release(len(batch))
                if self._ordered:
                    self._unhold(batch)

    def _unhold(self, batch: list[Settlement]) -> None:
        for settlement in batch:
            key = settlement.delivery.partition_key or ""
            left = self._held_keys.get(key, 1) - 1
            if left > 0:
                self._held_keys[key] = left
            else:
                self._held_keys.pop(key, None)
                self._blocked.discard(key)  # nothing of the group in hand: SQS orders the rest

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


async def _send(stream: ObjectSendStream[Any], item: Any) -> bool:
    """Send without yielding to the event loop when the stream has room. False when the receiving
    side is gone: the pipeline is being torn down (cancelled), and what was not handed on goes
    back to the broker when the source closes."""
    try:
        stream.send_nowait(item)
    except anyio.WouldBlock:
        try:
            await stream.send(item)
        except anyio.BrokenResourceError:
            return False
    except anyio.BrokenResourceError:
        return False
    return True
