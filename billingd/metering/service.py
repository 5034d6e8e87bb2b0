"""The daemon's metering tasks: the outbox sender and the periodic reconciliation (DESIGN §10).

`run_metering` is started by the daemon beside the sources and cancelled with them. The sender
runs when a `usage` source reports to Stripe meters (in `inline` mode too: it drains what an
earlier outbox-mode deployment left waiting); the periodic reconciliation when `[reconcile]
interval` is set and Stripe meters are configured — one replica at a time: under the lease
`billingd:lease:{reconcile}` (renewed while a run lasts; a run whose renewal fails is
cancelled), and only when no replica finished a run within the interval
(`billingd:last-run:{reconcile}`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import anyio
import structlog

from billingd.clients import Clients
from billingd.clients.errors import DownstreamError
from billingd.config.model import Settings
from billingd.metering.reconcile import Reconciler, Report
from billingd.metering.sender import OutboxSender
from billingd.telemetry import Metrics

log = structlog.get_logger("billingd.metering")

#: Seconds the reconciliation lease lasts between renewals.
RECONCILE_LEASE = 60.0


def wants_sender(settings: Settings) -> bool:
    """Whether a `usage` source reports to Stripe meters (through the outbox, or inline with
    the sender draining what an outbox-mode deployment left)."""
    return bool(settings.stripe.meters) and any(s.handler == "usage" for s in settings.sources)


def wants_reconciler(settings: Settings) -> bool:
    """Whether the daemon reconciles periodically."""
    return bool(settings.reconcile.interval) and wants_sender(settings) and bool(settings.stripe.api_key)


def reconciler(settings: Settings, clients: Clients, metrics: Metrics | None) -> Reconciler:
    """The reconciler of these settings and clients."""
    r = settings.reconcile
    return Reconciler(
        clients.outbox,
        clients.stripe,
        clients.usage_ledger,
        settle=float(r.settle),
        correct_within=float(r.correct_within),
        keep=int(r.keep),
        metrics=metrics,
        meters=tuple(sorted(set(settings.stripe.meters.values()))),
    )


async def run_metering(
    settings: Settings, clients: Clients, metrics: Metrics, hold_open: Callable[[float], None]
) -> None:
    """Run the sender and the periodic reconciliation until cancelled."""
    async with anyio.create_task_group() as tg:
        if wants_sender(settings):
            sender = OutboxSender(
                clients.outbox,
                clients.stripe,
                shards=settings.stripe.outbox_shards,
                keep=int(settings.reconcile.keep),
                max_age=float(settings.stripe.max_outbox_age),
                hold_open=hold_open,
                metrics=metrics,
            )
            tg.start_soon(sender.run)
        if wants_reconciler(settings):
            tg.start_soon(_reconcile_forever, settings, clients, metrics)


async def _reconcile_forever(settings: Settings, clients: Clients, metrics: Metrics) -> None:
    r = settings.reconcile
    token = uuid.uuid4().hex
    runner = reconciler(settings, clients, metrics)
    interval = float(r.interval)
    while True:
        try:
            if not await clients.outbox.lease_named("reconcile", token, RECONCILE_LEASE):
                metrics.reconcile_runs.labels("skipped").inc()  # another replica is running
            elif (last := await clients.outbox.last_run("reconcile")) and time.time() - last < interval * 0.9:
                metrics.reconcile_runs.labels("skipped").inc()  # another replica ran within the interval
            else:
                await _one_run(runner, clients, token, float(r.window), r.fix)
                await clients.outbox.finished("reconcile", time.time(), int(interval) + 86400)
        except DownstreamError as exc:
            metrics.reconcile_runs.labels("error").inc()
            log.warning("reconciliation failed; next run at the next interval", error=str(exc)[:300])
        except LeaseLost:
            metrics.reconcile_runs.labels("error").inc()
            log.warning("reconciliation lease lost (Redis slow, or another replica took it); run cancelled")
        except Exception:  # a bug must not stop the daemon
            metrics.reconcile_runs.labels("error").inc()
            log.exception("reconciliation failed unexpectedly; next run at the next interval")
        await anyio.sleep(interval)


class LeaseLost(Exception):
    """The reconciliation lease could not be renewed: another replica may be running."""


async def _one_run(runner: Reconciler, clients: Clients, token: str, window: float, fix: bool) -> None:
    """One periodic run under the lease (renewed every third of it).

    Raises:
        LeaseLost: the lease could not be renewed; the run was cancelled.
        DownstreamError: Redis or Stripe unavailable."""
    now = int(time.time())
    lost = False
    failed: DownstreamError | None = None
    report: Report | None = None
    async with anyio.create_task_group() as tg:

        async def renew() -> None:
            nonlocal lost
            while True:
                await anyio.sleep(RECONCILE_LEASE / 3)
                try:
                    held = await clients.outbox.lease_named("reconcile", token, RECONCILE_LEASE)
                except DownstreamError:
                    held = False
                if not held:
                    lost = True
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(renew)
        try:
            report = await runner.run(since=now - int(window), until=now, fix=fix)
        except DownstreamError as exc:  # raised below, outside the task group (not as a group)
            failed = exc
        tg.cancel_scope.cancel()
    if lost:
        raise LeaseLost()
    if failed is not None:
        raise failed
    assert report is not None
    if runner.metrics is not None:
        runner.metrics.reconcile_runs.labels("ok").inc()
        runner.metrics.reconcile_success.set(time.time())
    drift = report.drift()
    log.info(
        "reconciliation",
        buckets=report.compared,
        differences=len(report.differences),
        drift=drift,
        fixed=sum(1 for d in report.differences if d.action in ("corrected", "cancelled")),
        credit_notes=sum(1 for d in report.differences if d.action == "needs a credit note"),
        failed=sum(1 for d in report.differences if d.action.startswith("failed")),
        unsettled=report.unsettled,
        skipped_meters=report.skipped,
        stripe_requests=report.requests,
        seconds=round(report.seconds, 2),
    )
