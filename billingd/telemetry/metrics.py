"""The Prometheus metrics of one daemon (DESIGN §6), on a registry of its own (no global state)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

#: Handling latency buckets (seconds): from a Redis script (~1 ms) to a slow Stripe call.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

OUTCOMES = ("ack", "retry", "dead_letter")


class Metrics:
    """Every billingd metric, labelled by `source`, `outcome`, `breaker`, `operation`, `result`
    — never by user or customer ids (cardinality)."""

    def __init__(self, version: str) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.received = Counter(
            "billingd_messages_received", "Messages received from the broker.", ["source"], registry=r
        )
        self.processed = Counter(
            "billingd_messages_processed",
            "Messages handled, by outcome (ack, retry, dead_letter).",
            ["source", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "billingd_message_duration_seconds",
            "Time from handler start to outcome.",
            ["source"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("billingd_messages_in_flight", "Messages being handled now.", ["source"], registry=r)
        self.source_up = Gauge(
            "billingd_source_up", "1 when the source's broker connection is up.", ["source"], registry=r
        )
        self.restarts = Counter(
            "billingd_actor_restarts", "Source actor restarts after a crash.", ["source"], registry=r
        )
        self.breaker_state = Gauge(
            "billingd_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["breaker"],
            registry=r,
        )
        self.broker_requests = Counter(
            "billingd_broker_requests",
            "Broker API calls (SQS requests, AMQP acks/publishes), by operation.",
            ["source", "operation"],
            registry=r,
        )
        self.broker_blocked = Gauge(
            "billingd_broker_blocked",
            "1 while the broker blocks this source's publishing (RabbitMQ connection.blocked: a memory or disk alarm).",
            ["source"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "billingd_queue_depth",
            "Messages waiting in the source's queue (SQS ApproximateNumberOfMessages, AMQP ready), sampled.",
            ["source"],
            registry=r,
        )
        self.draining = Gauge("billingd_draining", "1 while a graceful drain is in progress.", registry=r)
        self.config_reloads = Counter(
            "billingd_config_reloads", "SIGHUP config reloads, by result (ok, error).", ["result"], registry=r
        )
        self.build_info = Gauge("billingd_build_info", "Build information.", ["version"], registry=r)
        self.build_info.labels(version).set(1)
        for result in ("ok", "error"):
            self.config_reloads.labels(result)
        self.sources: dict[str, SourceMetrics] = {}
        """The bound metrics of every source, by name (the latest binding of a restarted source)."""
        self._counters: dict[str, Counter] = {}
        # Stripe's contract (DESIGN §9): declared up front, since alerts and dashboards use them
        self.meter_errors = self.counter(
            "billingd_meter_errors",
            "Meter events Stripe reported invalid after accepting them (never billed), by meter and error code.",
            ["source", "meter", "code"],
        )
        self.stripe_duplicates = self.counter(
            "billingd_stripe_duplicates",
            "Meter events Stripe proved it already held (400 'An event already exists'): acked.",
            ["source"],
        )
        self.stripe_throttled = self.counter(
            "billingd_stripe_throttled_seconds",
            "Seconds Stripe requests waited for a slot of the shared request budget, by budget.",
            ["budget"],
        )
        self.stripe_rate_limited = self.counter(
            "billingd_stripe_rate_limited", "Stripe requests answered 429, by API.", ["api"]
        )
        # the meter outbox and reconciliation (DESIGN §10)
        self.outbox_events = Gauge(
            "billingd_meter_outbox_events",
            "Meter events waiting in the outbox (every shard: the same on every replica).",
            registry=r,
        )
        self.outbox_oldest = Gauge(
            "billingd_meter_outbox_oldest_seconds", "Age of the oldest meter event waiting in the outbox.", registry=r
        )
        self.outbox_held_total = Counter(
            "billingd_meter_outbox_held",
            "Meter events held out of the stream for finance (older than Stripe's window, refused by Stripe).",
            registry=r,
        )
        self.outbox_sent = Counter(
            "billingd_meter_outbox_sent", "Meter events Stripe accepted from this replica's outbox sender.", registry=r
        )
        self.meter_drift = Gauge(
            "billingd_meter_drift_units",
            "The absolute differences between billingd's journal and Stripe's summaries, summed over the "
            "closed hours of the last reconciliation, by meter.",
            ["meter"],
            registry=r,
        )
        self.meter_corrections = Counter(
            "billingd_meter_corrections",
            "Corrections of meter drift, by meter and kind (event, negative, cancel, credit_note, invoice_item).",
            ["meter", "kind"],
            registry=r,
        )
        self.reconcile_runs = Counter(
            "billingd_reconcile_runs",
            "Reconciliation runs, by result (ok, error, skipped: another replica runs or ran within the interval).",
            ["result"],
            registry=r,
        )
        self.reconcile_success = Gauge(
            "billingd_reconcile_last_success_timestamp_seconds",
            "When the last reconciliation run succeeded (Unix seconds).",
            registry=r,
        )
        for result in ("ok", "error", "skipped"):
            self.reconcile_runs.labels(result)

    def counter(self, name: str, documentation: str, labels: Sequence[str]) -> Counter:
        """A counter on this registry, created once however many handlers ask for it (the
        handler-specific metrics: `billingd_usage_unmetered_total`, …)."""
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = Counter(name, documentation, list(labels), registry=self.registry)
        return counter

    def for_source(self, source: str) -> SourceMetrics:
        """Label children of one source, bound once (the per-message path skips label lookups)."""
        bound = self.sources[source] = SourceMetrics(self, source)
        return bound


class SourceMetrics:
    """The metrics of one source with labels pre-bound."""

    def __init__(self, metrics: Metrics, source: str) -> None:
        self._metrics = metrics
        self._source = source
        self.received = metrics.received.labels(source)
        self.processed = {outcome: metrics.processed.labels(source, outcome) for outcome in OUTCOMES}
        self.duration = metrics.duration.labels(source)
        self.running = 0
        """Handler calls running now: a plain counter, read by `billingd_messages_in_flight` at scrape."""
        metrics.in_flight.labels(source).set_function(lambda: self.running)
        self.up = metrics.source_up.labels(source)
        self.queue_depth = metrics.queue_depth.labels(source)
        self.blocked = metrics.broker_blocked.labels(source)
        self.restarts = metrics.restarts.labels(source)
        self._requests: dict[str, Counter] = {}

    def broker_request(self, operation: str, count: int = 1) -> None:
        """Count `count` broker calls of kind `operation`."""
        child = self._requests.get(operation)
        if child is None:
            child = self._requests[operation] = self._metrics.broker_requests.labels(self._source, operation)
        child.inc(count)


class SourceCounter:
    """A counter whose first label, `source`, is bound: `.labels(*rest)` gives the child.

    Label values after `source` must come from a bounded set (Stripe event types, gateways):
    never a user, account or message id (DESIGN §6)."""

    __slots__ = ("_counter", "_source")

    def __init__(self, counter: Counter, source: str) -> None:
        self._counter, self._source = counter, source

    def labels(self, *rest: str) -> Any:
        """The counter child for `(source, *rest)`."""
        return self._counter.labels(self._source, *rest)
