"""`billingd dlq list|replay SOURCE` and `billingd publish SOURCE FILE`: operator tools."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from collections.abc import Iterator

import anyio
import msgspec

from billingd import __version__
from billingd.config import ConfigError, load_config
from billingd.daemon.exits import EXIT_CONFIG, EXIT_DATAERR, EXIT_UNAVAILABLE, EXIT_USAGE
from billingd.sources import queue_tools
from billingd.telemetry.redact import scrub
from billingd.telemetry.tracing import Tracing


def add_commands(commands: argparse._SubParsersAction, config_help: str) -> None:  # type: ignore[type-arg]
    """Register `dlq` and `publish` on the CLI's subcommands."""
    dlq = commands.add_parser("dlq", help="inspect or replay a source's dead-letter queue")
    actions = dlq.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="count dead letters and show their reasons")
    listing.add_argument("source")
    listing.add_argument("--limit", type=int, default=1000, help="letters to sample for reasons (default 1000)")
    replay = actions.add_parser("replay", help="move dead letters back to the source queue")
    replay.add_argument("source")
    replay.add_argument("--limit", type=int, default=None, help="at most this many (default: all there now)")
    publish = commands.add_parser("publish", help="send one JSON message to a source (like seed 000's SQSProducer)")
    publish.add_argument("source")
    publish.add_argument("file", help="a JSON file, or - for standard input")
    publish.add_argument("--routing-key", default=None, help="AMQP: publish to the exchange with this key")
    publish.add_argument("--encoding", default=None, help="content_encoding to apply: gzip, base64, gzip+base64")
    publish.add_argument("--group", default=None, help="SQS FIFO: the MessageGroupId")
    for parser in (listing, replay, publish):
        parser.add_argument("--config", "-c", default=None, help=config_help)


def run_tool(args: argparse.Namespace, path: str) -> int:
    """Run a `dlq` or `publish` command; returns the exit code."""
    try:
        settings = load_config(path)
        source = settings.source(args.source)
    except ConfigError as exc:
        print(f"billingd: invalid configuration in {path}:", *exc.errors, sep="\n  ", file=sys.stderr)
        return EXIT_CONFIG
    except KeyError:
        names = ", ".join(s.name for s in settings.sources)
        print(f"billingd: no source named {args.source!r} in {path} (sources: {names})", file=sys.stderr)
        return EXIT_USAGE
    body = b""
    if args.command == "publish":
        body = sys.stdin.buffer.read() if args.file == "-" else open(args.file, "rb").read()  # noqa: SIM115
        try:
            msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            print(f"billingd: {args.file} is not JSON: {exc}", file=sys.stderr)
            return EXIT_DATAERR

    async def main() -> int:
        async with queue_tools(source) as tools:
            if args.command == "publish":
                with producer_span(tracing, source.name) as trace:  # the message carries the context on
                    message_id = await tools.publish(
                        body, routing_key=args.routing_key, encoding=args.encoding, group=args.group, trace=trace
                    )
                print(f"published {message_id} to {source.name}")
            elif args.action == "list":
                total = await tools.dead_letter_count()
                letters = await tools.sample(min(args.limit, total)) if total else []
                print(f"{source.name}: {total} dead letter(s)")
                for reason, count in Counter(scrub(letter.reason) for letter in letters).most_common():
                    print(f"  {count:6d}  {reason}")
            else:
                moved = await tools.replay(args.limit)
                print(f"replayed {moved} dead letter(s) to {source.name}")
        return 0

    tracing = Tracing(__version__)
    try:
        return anyio.run(main, backend="asyncio")
    except Exception as exc:  # noqa: BLE001 — a tool reports the broker's answer and exits non-zero
        print(f"billingd: {args.command} {source.name}: {type(exc).__name__}: {scrub(str(exc))}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    finally:
        tracing.shutdown(2.0)


@contextlib.contextmanager
def producer_span(tracing: Tracing, destination: str) -> Iterator[dict[str, str]]:
    """A PRODUCER span `publish <destination>` and its context as W3C headers (empty: traces off)."""
    if not tracing.enabled:
        yield {}
        return
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    attributes = {"messaging.operation.type": "send", "messaging.destination.name": destination}
    with tracing.tracer.start_as_current_span(f"publish {destination}", kind=trace.SpanKind.PRODUCER,
                                              attributes=attributes):  # fmt: skip
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        yield carrier
