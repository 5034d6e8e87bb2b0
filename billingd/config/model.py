"""The typed shape of `billingd.toml` (DESIGN §4): msgspec Structs, unknown keys rejected.

Durations are `Duration` (float seconds) written as strings (`"30s"`). Every Struct is frozen:
a running daemon never mutates its settings; a reload builds new ones. Each subclass says
`frozen=True` again (msgspec inherits it; type checkers need to see it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, field

from billingd.config.durations import Duration

PositiveInt = Annotated[int, Meta(ge=1)]
SourceName = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="a name of letters, digits, '.', '_' or '-' (at most 63)",
    ),
]
BreakerName = Annotated[
    str,
    Meta(
        pattern=r"^(default|redis|stripe|razorpay|forward:[A-Za-z0-9_.-]+)$",
        description='a breaker name: default, redis, stripe, razorpay or "forward:<name>"',
    ),
]


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every table: unknown keys are errors, values are immutable."""


class DaemonSettings(_Section, frozen=True):
    """`[daemon]`: process lifecycle and logging."""

    drain_timeout: Duration = Duration(25)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    uvloop: bool = True
    """Run on uvloop where it is installed (Linux, macOS); `false` runs on asyncio's own loop."""


class HttpSettings(_Section, frozen=True):
    """`[http]`: the only HTTP surface, `/metrics`, `/healthz`, `/readyz`."""

    listen: Annotated[
        str,
        Meta(
            pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]*):\d{1,5}$",
            description='a "host:port" address such as "127.0.0.1:9464"',
        ),
    ] = "127.0.0.1:9464"

    @property
    def host(self) -> str:
        """The host part of `listen`, brackets of an IPv6 literal removed."""
        return self.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"

    @property
    def port(self) -> int:
        """The port part of `listen`."""
        return int(self.listen.rsplit(":", 1)[1])


class SupervisorSettings(_Section, frozen=True):
    """`[supervisor]`: one_for_one restart intensity and backoff (DESIGN §3)."""

    max_restarts: Annotated[int, Meta(ge=0)] = 5
    max_seconds: Annotated[float, Meta(gt=0)] = 60
    backoff_initial: Duration = Duration(0.5)
    backoff_max: Duration = Duration(30)


class TlsSettings(_Section, frozen=True):
    """A TLS client configuration: `[[sources]] tls`, `[redis] tls`, or a shared `[tls.<name>]`
    table that those name. TLS itself is chosen by the URL's scheme (`amqps://`, `rediss://`);
    this says how to verify the server and whether to present a client certificate.

    Every file is PEM and read again at each connection attempt (a renewed certificate is used
    without a restart; `billingd check` reads them all)."""

    ca_file: str = ""
    """The CA certificates the server's chain must end in; empty: the system's trust store."""
    cert_file: str = ""
    """A client certificate (mutual TLS), with `key_file`."""
    key_file: str = ""
    """The client certificate's private key (unencrypted PEM)."""
    server_name: str = ""
    """The name the server's certificate must carry (and sent as SNI); empty: the URL's host.
    For nodes reached by address (a Redis Cluster's announced IPs) whose certificate names a host."""
    verify: bool = True
    """Verify the server's chain and name. `false` encrypts without authenticating the server:
    anyone on the path can impersonate it (`billingd check` warns)."""


#: A `tls` key: a table of its own, or the name of a `[tls.<name>]` table.
TlsChoice = (
    TlsSettings | Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,63}$", description="a [tls.<name>] table's name")]
)


class RedisSettings(_Section, frozen=True):
    """`[redis]`: the ledger's Redis. `timeout` bounds connect and every command (seconds).

    `cluster = true`: `url` names any node of a Redis Cluster (database 0), the client discovers
    the others and follows MOVED/ASK redirections and failovers (redis-py's `RedisCluster`).
    `sentinels = ["host:port", …]`: a master found through Redis Sentinel (`sentinel_master`),
    followed across failovers (redis-py's `redis.asyncio.sentinel`).
    `min_replicas_acked = N`: writes must reach N replicas (`WAIT N wait_timeout`) before the
    message is acked, so a failover cannot lose an acked message's effect."""

    url: str = "redis://127.0.0.1:6379/0"
    """`redis://` (plain) or `rediss://` (TLS, verified by default: see `tls`), with the database,
    and optionally `user:password@` (or use `username` and `password`)."""
    username: str = ""
    """The ACL user (Redis 6+; ElastiCache RBAC); empty: the URL's, else `default`."""
    password: str = ""
    """The password of `username` (or the AUTH token); empty: the URL's. A secret: from the
    environment, a file or a credential (`${file:/run/secrets/redis}`)."""
    tls: TlsChoice | None = None
    """How TLS (`rediss://`) verifies Redis — every node of a Cluster, and the Sentinels and the
    master they name."""
    timeout: Duration = Duration(2)
    max_connections: PositiveInt = 64
    cluster: bool = False
    sentinels: list[Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.\[\]:-]+:\d{1,5}$")]] = field(default_factory=list)
    """Redis Sentinel: `host:port` of the sentinels; the master is asked of them (and again after
    a failover). `url` then gives only the database, user and password."""
    sentinel_master: str = "mymaster"
    """The name the sentinels monitor the master under."""
    min_replicas_acked: Annotated[int, Meta(ge=0, le=16)] = 0
    """Before a message is acked, wait until this many replicas of each node that took its
    writes have them (`WAIT`); 0: ack once the master has them."""
    wait_timeout: Duration = Duration(1)
    """The longest `WAIT` waits; past it the message is retried (transient), never acked."""


RequestRate = Annotated[float, Meta(ge=0, le=100_000)]


class StripeBudgets(_Section, frozen=True):
    """`[stripe.max_requests_per_second]` as a table: one figure per Stripe rate limit (requests
    per second for the whole Stripe account, shared by every replica; 0 = no budget). A figure
    left out takes its default for the key's mode (`StripeSettings.budgets`)."""

    basic: RequestRate | None = None
    """The basic API (invoices, customers, products, meter event sessions; in a sandbox also v1
    meter events). Stripe: 100/s live, 25/s sandbox."""
    meter_events: RequestRate | None = None
    """`POST /v1/billing/meter_events` in live mode. Stripe: 1,000/s."""
    meter_stream: RequestRate | None = None
    """`POST /v2/billing/meter_event_stream` requests (each up to 100 events). Stripe: 10,000/s live."""


#: Default budgets (requests/s) by key mode: below Stripe's limits (docs.stripe.com/rate-limits),
#: leaving room for whatever else the company sends with the same account.
LIVE_BUDGETS = {"basic": 80.0, "meter_events": 800.0, "meter_stream": 8000.0}
STRIPE_API_BASE = "https://api.stripe.com"
METER_EVENTS_BASE = "https://meter-events.stripe.com"
SANDBOX_BUDGETS = {"basic": 20.0, "meter_events": 20.0, "meter_stream": 800.0}


class StripeSettings(_Section, frozen=True):
    """`[stripe]`: API access; `meters` maps a usage event type to a Stripe meter `event_name`.

    Meter events go through the v2 meter event stream (`meter_api = "stream"`, batches of up to
    `meter_batch` events, gathered for at most `meter_linger`) or one `POST
    /v1/billing/meter_events` each (`"v1"`, at most one call in flight per customer and meter).
    `max_requests_per_second` is one budget for every replica (a number: one figure for all
    Stripe requests; a table: per rate limit); a request waits its turn for at most `max_wait`,
    then its message is retried later, uncounted."""

    api_key: str = ""
    api_base: str = "https://api.stripe.com"
    meter_events_base: str = ""
    """The v2 meter event stream's host; empty: `https://meter-events.stripe.com` with Stripe's
    own `api_base`, else `api_base` (a proxy or a double serving both)."""
    webhook_secret: str = ""
    webhook_tolerance: Duration = Duration(300)
    """The most time between Stripe signing a relayed webhook and the relay receiving it (the
    envelope's `received_at`): Stripe's own tolerance against replays at receipt."""
    webhook_max_age: Duration = Duration(30 * 86400)
    """The oldest signature accepted when the envelope carries no `received_at`: at least the
    queue's and its dead-letter queue's retention (`billingd check` compares them)."""
    timeout: Duration = Duration(10)
    meters: dict[str, str] = field(default_factory=dict)
    meter_api: Literal["stream", "v1"] = "stream"
    meter_batch: Annotated[int, Meta(ge=1, le=100)] = 100
    meter_linger: Duration = Duration(0.02)
    max_requests_per_second: RequestRate | StripeBudgets = field(default_factory=StripeBudgets)
    max_wait: Duration = Duration(10)
    meter_delivery: Literal["outbox", "inline"] = "outbox"
    """`outbox`: a usage event's meter event is written into a Redis outbox by the same script
    as its usage effect, its message acked at once, and a sender per process streams the
    outboxes to Stripe; `inline`: each message waits for its own Stripe request before its ack."""
    max_outbox_age: Duration = Duration(3600)
    """Past this age of the oldest waiting meter event, `usage` intake pauses (0: never)."""
    outbox_shards: Annotated[int, Meta(ge=1, le=1024)] = 16
    """Outbox shards: the units one process leases and drains (and another takes over)."""
    outbox_on_volatile_redis: bool = False
    """Allow the outbox on a Redis with neither persistence nor replicas (`billingd check`
    refuses it otherwise: a restart of that Redis loses every meter event not yet sent)."""

    @property
    def meter_events_url(self) -> str:
        """Where stream requests go (see `meter_events_base`)."""
        if self.meter_events_base:
            return self.meter_events_base
        return METER_EVENTS_BASE if self.api_base.rstrip("/") == STRIPE_API_BASE else self.api_base

    @property
    def sandbox(self) -> bool:
        """Whether the key is a sandbox (test mode) key, `sk_test_…` or `rk_test_…`; any other
        key is taken as live."""
        return self.api_key.startswith(("sk_test_", "rk_test_"))

    def budget(self, kind: str) -> tuple[str, float]:
        """`(bucket, requests/s)` that a request of `kind` (`basic`, `meter_events`,
        `meter_stream`) draws on; 0 requests/s = no budget. Requests of kinds with the same
        bucket share one budget.

        A single number is one budget for every kind (bucket `all`); a table fills what it leaves
        out from the defaults of the key's mode; in a sandbox, v1 meter events count against the
        basic limit (docs.stripe.com/rate-limits), so they share its bucket unless the table names
        `meter_events`."""
        table = self.max_requests_per_second
        if not isinstance(table, StripeBudgets):
            return "all", float(table)
        defaults = SANDBOX_BUDGETS if self.sandbox else LIVE_BUDGETS
        if kind == "meter_events" and self.sandbox and table.meter_events is None:
            kind = "basic"
        value = getattr(table, kind)
        return kind, float(value if value is not None else defaults[kind])


class ReconcileSettings(_Section, frozen=True):
    """`[reconcile]`: proving Stripe's meter totals against billingd's journal (DESIGN §10)."""

    interval: Duration = Duration(3600)
    """How often the daemon reconciles (one replica at a time, under a Redis lease); 0: never."""
    window: Duration = Duration(48 * 3600)
    """How far back each periodic run looks."""
    settle: Duration = Duration(3600)
    """How long after an hour ends it is compared: Stripe's summaries are eventually consistent."""
    keep: Duration = Duration(45 * 86400)
    """How long the journal (and the corrections) are kept: at least 35 days + the invoice grace."""
    fix: bool = False
    """Whether the periodic run corrects what it finds (`billingd reconcile --fix` always can)."""
    correct_within: Duration = Duration(72 * 3600)
    """A customer whose billing period billingd does not know counts as open for buckets younger
    than this (Stripe's longest invoice grace period)."""


class RazorpaySettings(_Section, frozen=True):
    """`[razorpay]`: API keys and the webhook secret used to verify `X-Razorpay-Signature`."""

    key_id: str = ""
    key_secret: str = ""
    webhook_secret: str = ""
    api_base: str = "https://api.razorpay.com"


class BreakerSettings(_Section, frozen=True):
    """`[breakers.<name>]`: a circuit breaker (DESIGN §3). Missing keys fall back to `default`."""

    failure_threshold: PositiveInt | None = None
    reset_timeout: Duration | None = None
    reset_timeout_max: Duration | None = None


class ResolvedBreaker(msgspec.Struct, frozen=True):
    """A breaker's effective settings after merging `[breakers.<name>]` over `[breakers.default]`."""

    failure_threshold: int = 5
    reset_timeout: float = 5.0
    reset_timeout_max: float = 60.0


class SourceSettings(_Section, frozen=True, tag_field="type"):
    """Keys shared by every `[[sources]]` entry (DESIGN §4)."""

    name: SourceName
    handler: str
    prefetch: Annotated[int, Meta(ge=1, le=10000)] = 20  # the knee of bench/compare.py curves
    concurrency: PositiveInt | None = None
    max_attempts: PositiveInt = 5
    retry_initial: Duration = Duration(1)
    retry_max: Duration = Duration(300)
    partition_by: str | None = None
    ack_flush: Duration = Duration(0.1)
    handler_options: dict[str, Any] = field(default_factory=dict)
    tls: TlsChoice | None = None
    """How TLS verifies the broker (an `amqps://` URL, or an SQS `endpoint_url` over `https://`)."""

    @property
    def workers(self) -> int:
        """The number of concurrent handler calls: `concurrency`, else `prefetch`."""
        return self.concurrency or self.prefetch


#: SQS's own limits (Amazon SQS Developer Guide, "Quotas"): the longest long poll (seconds), the
#: longest visibility timeout (seconds), the most entries of a batch call.
SQS_MAX_WAIT = 20
SQS_MAX_VISIBILITY = 43_200
SQS_MAX_BATCH = 10


class SqsSourceSettings(SourceSettings, frozen=True, tag="sqs", kw_only=True):
    """An SQS queue (`type = "sqs"`)."""

    queue_url: str
    dead_letter_queue_url: str = ""
    region: str = "us-east-1"
    endpoint_url: str = ""
    wait_time: Duration = Duration(20)
    visibility_timeout: Duration = Duration(60)
    sqs_client: Literal["lean", "botocore"] = "lean"
    """Which client sends the calls that carry the traffic (receive, delete and visibility
    batches): `lean` (signed by botocore, sent over aiohttp: `billingd.sources.sqs_lean`) or
    `botocore` (the plain aiobotocore client, for every call)."""

    @property
    def fifo(self) -> bool:
        """Whether the queue is a FIFO queue (SQS names them `….fifo`)."""
        return self.queue_url.endswith(".fifo")

    @property
    def dead_letter_fifo(self) -> bool:
        """Whether the dead-letter queue is a FIFO queue."""
        return self.dead_letter_queue_url.endswith(".fifo")


class AmqpSourceSettings(SourceSettings, frozen=True, tag="amqp", kw_only=True):
    """A RabbitMQ queue bound to an exchange (`type = "amqp"`)."""

    url: str | Annotated[list[str], Meta(min_length=1)] = "amqp://guest:guest@127.0.0.1:5672/"
    """The broker, or the nodes of a RabbitMQ cluster (a list): billingd connects to one and
    moves to the next when it is lost. `amqps://` is TLS (port 5671 by default; see `tls`)."""
    exchange: str
    exchange_type: Literal["topic", "direct", "fanout", "headers"] = "topic"
    exchange_declare: Literal["durable", "transient", "passive"] = "durable"
    """How the exchange is declared: `durable`; `transient` (durable = false, auto-delete off: as
    Jasmin declares `billing` and `messaging`, so either may declare first); `passive` (it must
    exist: billingd waits for it, then binds)."""
    queue: Annotated[str, Meta(min_length=1, max_length=250)]
    routing_keys: list[str] = field(default_factory=list)
    queue_arguments: dict[str, Any] = field(default_factory=dict)
    queue_type: Literal["classic", "quorum"] | None = None
    """The queue's type, and its `.retry` and `.dlq`'s: `quorum` (replicated over the cluster's
    nodes: survives the death of one) or `classic`. Unset: `queue_arguments."x-queue-type"`, else
    classic."""

    @property
    def urls(self) -> list[str]:
        """`url` as a list of node URLs."""
        return [self.url] if isinstance(self.url, str) else list(self.url)

    @property
    def kind(self) -> str:
        """The effective queue type: `quorum` or `classic`."""
        return self.queue_type or str(self.queue_arguments.get("x-queue-type") or "classic")


AnySource = SqsSourceSettings | AmqpSourceSettings


class Settings(_Section, frozen=True):
    """The whole of `billingd.toml`."""

    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    supervisor: SupervisorSettings = field(default_factory=SupervisorSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    stripe: StripeSettings = field(default_factory=StripeSettings)
    razorpay: RazorpaySettings = field(default_factory=RazorpaySettings)
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)
    breakers: dict[BreakerName, BreakerSettings] = field(default_factory=dict)
    tls: dict[Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,63}$")], TlsSettings] = field(default_factory=dict)
    """Shared TLS configurations, named by `tls = "<name>"` in `[[sources]]` and `[redis]`."""
    sources: list[AnySource] = field(default_factory=list)

    def tls_of(self, choice: TlsSettings | str | None) -> TlsSettings | None:
        """The TLS configuration a `tls` key gives (its own table, or the `[tls.<name>]` table it
        names — the loader has already put the table in its place); None when unset. Raises
        KeyError for an unknown name (the loader refuses it)."""
        if isinstance(choice, str):
            return self.tls[choice]
        return choice

    def breaker(self, name: str) -> ResolvedBreaker:
        """Effective settings of breaker `name` (`redis`, `stripe`, `forward:<x>`, …)."""
        base = ResolvedBreaker()
        for table in (self.breakers.get("default"), self.breakers.get(name)):
            if table is None:
                continue
            base = ResolvedBreaker(
                failure_threshold=table.failure_threshold or base.failure_threshold,
                reset_timeout=table.reset_timeout if table.reset_timeout is not None else base.reset_timeout,
                reset_timeout_max=(
                    table.reset_timeout_max if table.reset_timeout_max is not None else base.reset_timeout_max
                ),
            )
        return base

    def source(self, name: str) -> AnySource:
        """The source named `name`. Raises KeyError when there is none."""
        for source in self.sources:
            if source.name == name:
                return source
        raise KeyError(name)
