"""`billingd reconcile` and `billingd meters`: proving Stripe's meter totals, and the outbox's state.

* `billingd reconcile [--since 48h] [--until 1h] [--customer cus_…] [--meter NAME] [--json] [--fix]`
  compares billingd's journal with Stripe's event summaries per customer, meter and hour
  (`billingd.metering.reconcile`); `--fix` corrects the open periods. Times are durations before
  now (`48h`, `30m`) or ISO 8601 (`2026-12-05T10:00Z`). Exit 0 when nothing differs (or
  everything that differed was corrected or reported for a credit note), 1 when differences
  remain, 69 when Redis or Stripe cannot be reached.
* `billingd meters` prints the outbox: events waiting, the oldest, and every event held out of the
  stream (older than Stripe's window, refused by Stripe) for finance.
* `billingd meters identifier SUBJECT EVENT_TYPE KEY` prints the meter `identifier` billingd
  sends Stripe for a producer's key.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from typing import Any

import anyio
import msgspec

from billingd.config import ConfigError, Settings, load_config
from billingd.config.durations import parse_duration
from billingd.daemon.exits import EXIT_CONFIG, EXIT_UNAVAILABLE, EXIT_USAGE


def add_metering_commands(commands: argparse._SubParsersAction, config_help: str) -> None:  # type: ignore[type-arg]
    """Register `reconcile` and `meters` on the CLI's subcommands."""
    reconcile = commands.add_parser("reconcile", help="compare Stripe's meter totals with billingd's journal")
    reconcile.add_argument("--since", default="48h", help="start: a duration before now or ISO 8601 (default 48h)")
    reconcile.add_argument("--until", default="0s", help="end (default now; hours younger than settle are skipped)")
    reconcile.add_argument("--customer", default=None, help="only this Stripe customer (cus_…)")
    reconcile.add_argument("--meter", default=None, help="only this meter (its event_name)")
    reconcile.add_argument("--json", action="store_true", help="print the report as JSON")
    reconcile.add_argument("--fix", action="store_true", help="correct differences in open periods")
    meters = commands.add_parser("meters", help="the meter outbox: waiting and held events; identifiers")
    meters.add_argument("what", nargs="*", help="`identifier SUBJECT EVENT_TYPE KEY`: the identifier Stripe sees")
    for parser in (reconcile, meters):
        parser.add_argument("--config", "-c", default=None, help=config_help)


def run_metering_tool(args: argparse.Namespace, path: str) -> int:
    """Run `reconcile` or `meters`; returns the exit code."""
    if args.command == "meters" and args.what:
        if args.what[0] != "identifier" or len(args.what) != 4:
            print("billingd: usage: billingd meters identifier SUBJECT EVENT_TYPE KEY", file=sys.stderr)
            return EXIT_USAGE
        from billingd.clients.stripe_ids import meter_identifier

        print(meter_identifier(*args.what[1:]))
        return 0
    try:
        settings = load_config(path)
    except ConfigError as exc:
        print(f"billingd: invalid configuration in {path}:", *exc.errors, sep="\n  ", file=sys.stderr)
        return EXIT_CONFIG
    from billingd.daemon.logging import configure_logging

    configure_logging("warning", settings.daemon.log_format)  # on stderr: stdout is the report
    try:
        if args.command == "reconcile":
            since, until = _when(args.since), _when(args.until)
            return anyio.run(_reconcile, settings, args, since, until, backend="asyncio")
        return anyio.run(_meters, settings, backend="asyncio")
    except ValueError as exc:
        print(f"billingd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 — a tool reports what could not be reached and exits non-zero
        print(f"billingd: {args.command}: {type(exc).__name__}: {exc}"[:600], file=sys.stderr)
        return EXIT_UNAVAILABLE


def _when(text: str) -> int:
    """Unix seconds of a duration before now (`48h`) or an ISO 8601 time."""
    try:
        return int(time.time() - parse_duration(text))
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (48h) nor an ISO 8601 time") from None
    return int((when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp())


async def _reconcile(settings: Settings, args: argparse.Namespace, since: int, until: int) -> int:
    from billingd.clients import Clients, Unguarded
    from billingd.metering.service import reconciler

    clients = Clients(settings.redis, settings.stripe, Unguarded, redis_tls=settings.tls_of(settings.redis.tls))
    try:
        report = await reconciler(settings, clients, None).run(
            since=since, until=until, customer=args.customer, meter=args.meter, fix=args.fix
        )
    finally:
        await clients.aclose()
    if args.json:
        print(msgspec.json.encode(report.as_dict()).decode())
    else:
        _print_report(report)
    settled = ("corrected", "cancelled", "sent before", "needs a credit note", "needs an invoice item")
    return 0 if all(d.action in settled for d in report.differences) else 1


def _print_report(report: Any) -> None:
    drift = ", ".join(f"{m} {v:,}" for m, v in report.drift().items()) or "none"
    print(
        f"reconciled {_iso(report.since)} .. {_iso(report.until)}: {report.customers} customers, "
        f"{len(report.meters)} meters, {report.compared:,} hours compared, {len(report.differences)} differ; "
        f"drift: {drift} ({report.requests} Stripe requests, {report.seconds:.1f} s)"
    )
    if report.unsettled:
        print(f"  {report.unsettled:,} hours not settled yet (grown within `settle`, or events still in the outbox)")
    for name, why in report.skipped.items():
        print(f"  meter {name} not compared: {why}")
    if report.differences:
        print(
            f"  {'customer':<24} {'meter':<20} {'hour (UTC)':<17} {'billingd':>10} {'stripe':>10} {'diff':>9}  action"
        )
    for d in report.differences:
        refused = f"  refused: {', '.join(f'{i} ({c})' for i, c in d.refused[:3])}" if d.refused else ""
        print(f"  {d.customer:<24} {d.meter:<20} {_iso(d.hour * 3600):<17} {d.billingd:>10,} {d.stripe:>10,} "
              f"{d.diff:>+9,}  {d.action or '-'}{refused}")  # fmt: skip


async def _meters(settings: Settings) -> int:
    from billingd.clients import Clients, Unguarded

    clients = Clients(settings.redis, settings.stripe, Unguarded, redis_tls=settings.tls_of(settings.redis.tls))
    outbox, shards, now = clients.outbox, settings.stripe.outbox_shards, time.time()
    try:
        waiting, oldest = 0, None
        for shard in range(shards):
            since, _ = await outbox.oldest(shard)
            if since is not None:
                oldest = since if oldest is None else min(oldest, since)
            for w in await outbox.waiting(shard, 100_000):
                waiting += await outbox.count(w.subject)
        age = f"{now - oldest:.0f} s" if oldest is not None else "-"
        print(f"meter outbox ({settings.stripe.meter_delivery}): {waiting} event(s) waiting, oldest {age}")
        held = 0
        for subject in await outbox.held_subjects():
            for identifier, (event, reason) in (await outbox.held(subject)).items():
                if held == 0:
                    print("held for finance (never sent; bill by hand, or fix and replay):")
                held += 1
                print(f"  {subject}  {event.customer}  {event.event_name}  {event.value}  {_iso(event.timestamp)}  "
                      f"key={event.key!r}  identifier={identifier}  — {reason}")  # fmt: skip
        if not held:
            print("held for finance: none")
    finally:
        await clients.aclose()
    return 0


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%MZ")
