"""What a source actor tells the world: connection changes, broker calls and queue depth (it is
its transport's `SourceEvents`), and each message's outcome, as metrics, `/readyz` status and
log lines (DESIGN §6: one line per state change and per dead letter; retries at debug)."""

from __future__ import annotations

import structlog

from billingd.sources.base import Disposition, Settlement
from billingd.telemetry import SourceMetrics, SourceStatus


class SourceReporter:
    """Reports for one source; satisfies `billingd.sources.base.SourceEvents`."""

    def __init__(self, name: str, handler: str, metrics: SourceMetrics, status: SourceStatus) -> None:
        self.metrics = metrics
        self.status = status
        self._handler = handler
        self.log = structlog.get_logger("billingd.actor").bind(source=name)

    def connection_changed(self, up: bool, reason: str) -> None:
        """Record a connection change for `/readyz`, the `billingd_source_up` gauge and the log."""
        if up == self.status.up and (up or reason == self.status.reason):
            return
        self.status.up, self.status.reason = up, ("" if up else reason)
        self.metrics.up.set(1 if up else 0)
        if up:
            self.log.info("source connected")
        else:
            self.log.warning("source disconnected", reason=reason)

    def node_changed(self, node: str) -> None:
        """Record the broker node in use (shown by `/readyz`, logged)."""
        if node != self.status.node:
            self.status.node = node
            self.log.info("source using broker node", node=node)

    def blocked_changed(self, reason: str | None) -> None:
        """Record a broker's publishing block (`billingd_broker_blocked`, `/readyz`)."""
        self.status.blocked = reason or ""
        self.metrics.blocked.set(1 if reason else 0)
        if reason:
            self.log.warning("broker blocks publishing: retries and dead letters wait", reason=reason)
        else:
            self.log.info("broker publishing unblocked")

    def broker_request(self, operation: str, count: int = 1) -> None:
        """Count broker calls in `billingd_broker_requests_total`."""
        self.metrics.broker_request(operation, count)

    def queue_depth(self, messages: int) -> None:
        """Export the sampled queue depth as `billingd_queue_depth`."""
        self.metrics.queue_depth.set(messages)

    def stopped(self) -> None:
        """The source is closed (drained or crashed)."""
        self.metrics.up.set(0)
        self.status.up, self.status.reason = False, "stopped"

    def outcome(self, settlement: Settlement) -> None:
        """Count a handled message in `billingd_messages_processed_total`; log a dead letter."""
        delivery = settlement.delivery
        if settlement.disposition is Disposition.ACK:
            self.metrics.processed["ack"].inc()
        elif settlement.disposition is Disposition.RETRY:
            self.metrics.processed["retry"].inc()
            self.log.debug(
                "retry",
                message_id=delivery.message_id,
                attempt=delivery.attempt,
                delay=round(settlement.delay, 3),
                counted=settlement.counted,
                reason=settlement.reason,
            )
        else:
            self.metrics.processed["dead_letter"].inc()
            self.log.warning(
                "dead-letter",
                message_id=delivery.message_id,
                attempt=delivery.attempt,
                handler=self._handler,
                reason=settlement.reason,
            )
