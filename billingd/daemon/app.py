"""The daemon: wires settings into breakers, clients, actors and the supervisor, serves HTTP,
and runs the lifecycle (DESIGN §3): signals, graceful drain, drain timeout, config reload,
systemd notifications, exit codes.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import structlog

from billingd import __version__
from billingd.clients import Clients
from billingd.config import ConfigError, Settings
from billingd.config.model import AnySource
from billingd.config.secrets import secrets_of
from billingd.daemon.exits import EXIT_FORCED, EXIT_OK, EXIT_SOFTWARE
from billingd.daemon.http import start_http
from billingd.daemon.loop import loop_name
from billingd.daemon.notify import Notifier
from billingd.daemon.reload import plan_reload
from billingd.daemon.validation import validate
from billingd.handlers.kit.base import HandlerContext, HandlerSpec
from billingd.handlers.registry import build_handler, discover
from billingd.sources import make_source
from billingd.supervisors.actor import SourceActor
from billingd.supervisors.breaker import BreakerBoard
from billingd.supervisors.poison import PoisonLog
from billingd.supervisors.supervisor import Child, Supervisor
from billingd.telemetry.metrics import Metrics
from billingd.telemetry.redact import Redactor
from billingd.telemetry.status import SourceStatus
from billingd.telemetry.tracing import Tracing

log = structlog.get_logger("billingd.daemon")


#: The longest the spans still queued at exit may take to reach the collector (seconds).
TRACE_FLUSH = 2.0
#: After `drain_timeout`, handlers are cancelled; this long later everything is.
ABORT_GRACE = 5.0
#: Seconds within which the same signal again is a duplicate, not a second request: a terminal's
#: Ctrl-C reaches the whole process group and `uv run` forwards it once more ~200 ms later.
DUPLICATE_SIGNAL_WINDOW = 1.0
#: The hard bound: `drain_timeout` + this many seconds after a stop begins (SIGTERM or an
#: escalation), a watchdog thread ends the process whatever the event loop is doing (a library
#: that does not honour cancellation, a blocked loop). Above ABORT_GRACE so the orderly path wins.
STOP_GRACE = 8.0
#: `/healthz` fails when the event loop has not ticked for this long (seconds).
TICK_STALE = 10.0
#: While draining, systemd's stop timeout is extended by this much at a time (seconds).
EXTEND_STEP = 10.0


class Daemon:
    """One billingd process. `await Daemon(settings).run()` returns its exit code.

    `config_path` is re-read on SIGHUP (or `reload()`); `handlers` replaces the handler registry
    (tests); `handle_signals=False` leaves signals to the caller, who stops the daemon with
    `request_drain()`. `exit_process` (`os._exit` for the real process) arms the stop watchdog:
    once a stop has run `drain_timeout` + `STOP_GRACE` seconds, a thread calls it with the exit
    code; without it (in-process tests) the deadline is only reported by `/healthz`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        config_path: str | None = None,
        handlers: Mapping[str, HandlerSpec[Any]] | None = None,
        handle_signals: bool = True,
        notifier: Notifier | None = None,
        rng: random.Random | None = None,
        exit_process: Callable[[int], None] | None = None,
        tracing: Tracing | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self.settings = settings
        self.redactor = redactor or Redactor(secrets_of(settings, os.environ))
        """Masks the configuration's secrets in `/readyz` (and, given by the CLI, in the logs)."""
        self.config_path = config_path
        self.handlers = handlers if handlers is not None else discover()
        """The handlers by name: the installed entry points (`discover()`) unless given."""
        self.handle_signals = handle_signals
        self.notifier = notifier or Notifier({})
        self.metrics = Metrics(__version__)
        self.tracing = tracing or Tracing(__version__)
        self.registry = self.metrics.registry
        self.board = BreakerBoard(settings, self.metrics)
        self.clients = Clients(
            settings.redis,
            settings.stripe,
            self.board.get,
            self.metrics,
            self.tracing.tracer,
            redis_tls=settings.tls_of(settings.redis.tls),
        )
        self.supervisor = Supervisor(settings.supervisor, rng=rng, on_escalate=self._on_escalate)
        self.statuses: dict[str, SourceStatus] = {s.name: SourceStatus(s.name) for s in settings.sources}
        self.draining = False
        self.stopped = anyio.Event()
        self.exit_code = EXIT_OK
        self._rng = rng or random.Random()
        self._tg: anyio.abc.TaskGroup | None = None
        self._reloading = anyio.Lock()
        self._last_tick = 0.0
        self._exit_process = exit_process
        self._stop_deadline: float | None = None
        self._watchdog: threading.Timer | None = None

    # -- wiring ------------------------------------------------------------------------------

    def child(self, source: AnySource) -> Child:
        """A supervisor child running `source` with its handler."""
        status = self.statuses[source.name] = self.statuses.get(source.name) or SourceStatus(source.name)
        metrics = self.metrics.for_source(source.name)
        metrics.up.set(0)
        for outcome in metrics.processed.values():
            outcome.inc(0)
        reconnect = (self.settings.supervisor.backoff_initial, self.settings.supervisor.backoff_max)
        poison = PoisonLog()  # outlives the actors: crash counts per message across restarts

        context = HandlerContext(
            source,
            self.clients,
            self.settings.stripe,
            self.settings.razorpay,
            self.metrics,
            float(self.settings.reconcile.keep),
        )

        def factory() -> SourceActor:
            handler = build_handler(context, self.handlers)
            return SourceActor(
                source,
                lambda events: make_source(source, events),
                handler,
                self.board,
                metrics,
                status,
                reconnect,
                self._rng,
                poison,
                self.tracing.tracer,
                self.clients.attempts,
            )

        return Child(source.name, factory, on_restart=metrics.restarts.inc)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve HTTP, run every source until drained, and return the exit code."""
        self._last_tick = anyio.current_time()
        http = self.settings.http
        runner = await start_http(self, http.host, http.port)
        log.info(
            "billingd started",
            version=__version__,
            listen=http.listen,
            sources=[s.name for s in self.settings.sources],
            loop=loop_name(),
        )
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._tick)
                if self.handle_signals:
                    tg.start_soon(self._watch_signals)
                tg.start_soon(self._announce)
                tg.start_soon(self._metering)
                await self.supervisor.run([self.child(s) for s in self.settings.sources])
                if self.supervisor.escalated:
                    self.exit_code = EXIT_SOFTWARE
                tg.cancel_scope.cancel()
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True), anyio.move_on_after(ABORT_GRACE):
                await runner.cleanup()
                await self.clients.aclose()
                # the spans still queued, within a bound of their own (a collector may be down)
                await anyio.to_thread.run_sync(self.tracing.shutdown, TRACE_FLUSH, abandon_on_cancel=True)
            self.notifier.close()
            self.stopped.set()
        log.info("billingd stopped", exit_code=self.exit_code)
        return self.exit_code

    async def _metering(self) -> None:
        """The meter outbox sender and the periodic reconciliation (`billingd.metering`), for
        the settings the daemon started with (a reload changes the sources, not these)."""
        from billingd.metering.service import run_metering, wants_sender

        if wants_sender(self.settings):
            await run_metering(self.settings, self.clients, self.metrics, self.board.get("stripe-outbox").hold_open)

    async def _announce(self) -> None:
        """READY=1 once every actor has made its first connection attempt; then STATUS= lines
        and, under a systemd watchdog, WATCHDOG=1 while healthy."""
        for status in list(self.statuses.values()):
            await status.attempted.wait()
        if not self.draining:
            self.notifier.send("READY=1", f"STATUS={self.summary()}")
            log.info("ready", sources={n: s.up for n, s in self.statuses.items()})
        interval = self.notifier.watchdog_interval
        sent_status = 0.0
        while True:
            await anyio.sleep(interval if interval else 5.0)
            if interval and self.health()[0]:
                self.notifier.send("WATCHDOG=1")
            if anyio.current_time() - sent_status >= 5.0:
                sent_status = anyio.current_time()
                self.notifier.send(f"STATUS={self.summary()}")

    def summary(self) -> str:
        """The one-line STATUS= for systemd: sources up, messages processed, draining."""
        up = sum(status.up for status in self.statuses.values())
        processed = sum(
            sample.value
            for metric in self.metrics.processed.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        )
        state = "draining" if self.draining else "running"
        return f"{state}: {up}/{len(self.statuses)} sources up, {int(processed)} messages processed"

    def request_drain(self, reason: str = "requested") -> None:
        """Begin the graceful drain: `/readyz` 503, intake stops, in-flight work finishes; the
        process ends within `drain_timeout` + `STOP_GRACE` whatever happens (see `exit_process`)."""
        if self.draining:
            return
        self.draining = True
        timeout = float(self.settings.daemon.drain_timeout)
        self._stop_deadline = anyio.current_time() + timeout + STOP_GRACE
        if self._exit_process is not None:
            self._watchdog = threading.Timer(timeout + STOP_GRACE, self._past_deadline)
            self._watchdog.daemon = True
            self._watchdog.start()
        self.metrics.draining.set(1)
        self.notifier.send("STOPPING=1", f"STATUS={self.summary()}")
        log.info("drain started", reason=reason, drain_timeout=timeout)
        self.supervisor.drain()
        if self._tg is not None:
            self._tg.start_soon(self._drain_deadline)

    def disarm(self) -> None:
        """Cancel the stop watchdog. The real process never does: it stays armed through the
        event loop's own teardown (executor threads, a stuck DNS lookup) until the process ends."""
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _on_escalate(self, reason: str) -> None:
        self.exit_code = EXIT_SOFTWARE
        self.request_drain(f"supervisor escalation: {reason}")

    def _past_deadline(self) -> None:
        """The stop watchdog (a thread): the event loop did not finish the stop in time."""
        code = self.exit_code if self.exit_code != EXIT_OK else EXIT_FORCED
        in_flight = {name: m.running for name, m in self.metrics.sources.items() if m.running}
        log.critical(
            "stop deadline passed: exiting now; unsettled messages return to their queues",
            deadline=float(self.settings.daemon.drain_timeout) + STOP_GRACE,
            in_flight=in_flight,
            exit_code=code,
        )
        assert self._exit_process is not None
        self._exit_process(code)

    def stop_now(self, reason: str = "second signal") -> None:
        """Cancel everything at once; unsettled messages return to their queues."""
        log.warning("stopping at once", reason=reason)
        if self.exit_code == EXIT_OK:
            self.exit_code = EXIT_FORCED
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def _drain_deadline(self) -> None:
        timeout = float(self.settings.daemon.drain_timeout)
        deadline = anyio.current_time() + timeout
        while (remaining := deadline - anyio.current_time()) > 0:
            # tell systemd the stop is progressing, so TimeoutStopSec does not cut a long drain short
            self.notifier.send(
                f"EXTEND_TIMEOUT_USEC={int((min(remaining, EXTEND_STEP) + ABORT_GRACE) * 1e6)}",
                f"STATUS={self.summary()}",
            )
            await anyio.sleep(min(remaining, EXTEND_STEP / 2))
        log.warning("drain timeout: cancelling in-flight handlers; their messages are released")
        self.supervisor.abort()
        await anyio.sleep(ABORT_GRACE)
        self.stop_now("abort grace exceeded")

    async def _watch_signals(self) -> None:
        """SIGHUP reloads; the first SIGTERM/SIGINT drains; the same signal again within
        `DUPLICATE_SIGNAL_WINDOW` seconds is that one delivered twice (ignored); any later one, or
        a different one, stops at once."""
        first: tuple[int, float] | None = None
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                now = anyio.current_time()
                if signum == signal.SIGHUP:
                    if self._tg is not None:
                        self._tg.start_soon(self.reload)
                elif first is None and not self.draining:
                    first = (signum, now)
                    self.request_drain(name)
                elif first is not None and first[0] == signum and now - first[1] < DUPLICATE_SIGNAL_WINDOW:
                    log.info("duplicate signal ignored", signal=name, after=round(now - first[1], 3))
                else:
                    self.stop_now(f"second {name}")

    async def _tick(self) -> None:
        while True:
            self._last_tick = anyio.current_time()
            await anyio.sleep(1)

    # -- reload ------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read `config_path`: an invalid file changes nothing (errors logged, counted); a valid
        one drains and restarts only the sources whose settings changed, starts added ones and
        drains removed ones. Returns whether the new config was applied."""
        async with self._reloading:
            if self.draining or self.config_path is None:
                return False
            try:
                new = validate(self.config_path, self.handlers)
            except ConfigError as exc:
                self.metrics.config_reloads.labels("error").inc()
                log.error("config reload rejected: still running the previous config", errors=exc.errors)
                return False
            self.redactor.add(secrets_of(new, os.environ))  # before anything about it is logged
            plan = plan_reload(self.settings, new)
            if plan.needs_restart:
                log.warning("config reload: these sections take effect after a restart", sections=plan.needs_restart)
            self.settings = Settings(
                **{**{f: getattr(self.settings, f) for f in self.settings.__struct_fields__}, "sources": new.sources}
            )
            async with anyio.create_task_group() as tg:
                for name in plan.removed:
                    tg.start_soon(self._stop_source, name)
                for source in plan.changed:
                    tg.start_soon(self._restart_source, source)
            for source in plan.added:
                self.supervisor.start_child(self.child(source))
            self.metrics.config_reloads.labels("ok").inc()
            log.info(
                "config reloaded",
                added=[s.name for s in plan.added],
                removed=plan.removed,
                restarted=[s.name for s in plan.changed],
                unchanged=plan.unchanged,
            )
            return True

    async def _stop_source(self, name: str) -> None:
        await self.supervisor.stop_child(name)
        self.statuses.pop(name, None)
        self.metrics.source_up.labels(name).set(0)

    async def _restart_source(self, source: AnySource) -> None:
        await self.supervisor.stop_child(source.name)
        self.supervisor.start_child(self.child(source))

    # -- observability -----------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, object]]:
        """Alive while the supervisor runs and the event loop ticks — and not once the supervisor
        escalated or a stop has passed its deadline (DESIGN §8: a stuck stop must not look alive)."""
        now = anyio.current_time()
        lag = now - self._last_tick
        overdue = self._stop_deadline is not None and now > self._stop_deadline
        escalated = self.supervisor.escalated is not None
        alive = self.supervisor.alive and lag < TICK_STALE and not overdue and not escalated
        body: dict[str, object] = {"alive": alive, "supervisor": self.supervisor.alive}
        body["loop_lag_seconds"] = round(lag, 3)
        if escalated:
            body["escalated"] = self.supervisor.escalated
        if overdue:
            body["stop_overdue_seconds"] = round(now - (self._stop_deadline or now), 3)
        return alive, body

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready when not draining and every source is connected."""
        sources = {name: status.as_dict() for name, status in self.statuses.items()}
        ready = not self.draining and self.supervisor.alive and all(s.up for s in self.statuses.values())
        body: dict[str, object] = self.redactor.scrub_obj(
            {"ready": ready, "draining": self.draining, "sources": sources}
        )
        return ready, body
