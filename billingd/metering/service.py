"""The daemon's metering tasks: the outbox sender and the periodic reconciliation (DESIGN §10).

`run_metering` is started by the daemon beside the sources and cancelled with them. The sender
runs when a `usage` source reports to Stripe meters in outbox mode; the periodic reconciliation
when `[reconcile] interval` is set and Stripe meters are configured — one replica at a time
(`billingd:lease:{reconcile}`, renewed while a run lasts).
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
from billingd.metering.reconcile import Reconciler
from billingd.metering.sender import OutboxSender
from billingd.telemetry import Metrics

log = structlog.get_logger("billingd.metering")

#: Seconds the reconciliation lease lasts between renewals.
RECONCILE_LEASE = 60.0


def wants_sender(settings: Settings) -> bool:
    """Whether a `usage` source sends meter events through the outbox."""
    return (
        settings.stripe.meter_delivery == "outbox"
        and bool(settings.stripe.meters)
        and any(s.handler == "usage" for s in settings.sources)
    )


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
    while True:
        try:
            if await clients.outbox.lease_named("reconcile", token, RECONCILE_LEASE):
                await _one_run(runner, clients, token, float(r.window), r.fix)
        except DownstreamError as exc:
            metrics.reconcile_runs.labels("error").inc()
            log.warning("reconciliation failed; next run at the next interval", error=str(exc)[:300])
        except Exception:  # a bug must not stop the daemon
            metrics.reconcile_runs.labels("error").inc()
            log.exception("reconciliation failed unexpectedly; next run at the next interval")
        await anyio.sleep(float(r.interval))


async def _one_run(runner: Reconciler, clients: Clients, token: str, window: float, fix: bool) -> None:
    now = int(time.time())
    async with anyio.create_task_group() as tg:

        async def renew() -> None:
            while True:
                await anyio.sleep(RECONCILE_LEASE / 3)
                await clients.outbox.lease_named("reconcile", token, RECONCILE_LEASE)

        tg.start_soon(renew)
        report = await runner.run(since=now - int(window), until=now, fix=fix)
        tg.cancel_scope.cancel()
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
        stripe_requests=report.requests,
        seconds=round(report.seconds, 2),
    )
