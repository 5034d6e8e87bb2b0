"""The `billingd` command: `run`, `check`, `version`, `dlq list|replay`, `publish`, `reconcile`, `meters`.

Exit codes: `billingd.daemon.exits`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import anyio

from billingd import __version__
from billingd.config import ConfigError, Settings
from billingd.config.secrets import secrets_of
from billingd.daemon.app import Daemon
from billingd.daemon.check import broker_warnings, describe, handler_lines, redis_durability, stripe_meter_check
from billingd.daemon.check_tls import connection_report
from billingd.daemon.exits import EXIT_CONFIG, EXIT_FORCED
from billingd.daemon.logging import configure_logging
from billingd.daemon.loop import loop_options
from billingd.daemon.metering_cli import add_metering_commands, run_metering_tool
from billingd.daemon.notify import Notifier
from billingd.daemon.tools_cli import add_commands, run_tool
from billingd.daemon.validation import validate
from billingd.handlers.registry import HandlerRegistry, discover
from billingd.telemetry.redact import Redactor
from billingd.telemetry.tracing import Tracing, TracingMisconfigured


def default_config_path() -> str:
    """`$BILLINGD_CONFIG`, else `./billingd.toml`."""
    return os.environ.get("BILLINGD_CONFIG") or "billingd.toml"


CONFIG_HELP = "config file (default: $BILLINGD_CONFIG, else ./billingd.toml)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="billingd", description="Billing event worker daemon.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run the daemon until SIGTERM/SIGINT (SIGHUP reloads the config)"),
        ("check", "validate the config file and print every error; then the meters and retention warnings"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", "-c", default=None, help=CONFIG_HELP)
        if name == "check":
            command.add_argument(
                "--offline", action="store_true", help="ask nothing of the brokers, Redis or Stripe (retention, meters)"
            )
    commands.add_parser("version", help="print the version")
    add_commands(commands, CONFIG_HELP)
    add_metering_commands(commands, CONFIG_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `billingd` script and `python -m billingd`."""
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"billingd {__version__}")
        return 0
    path = args.config or default_config_path()
    if args.command in ("dlq", "publish"):
        return run_tool(args, path)
    if args.command in ("reconcile", "meters"):
        return run_metering_tool(args, path)
    handlers = discover()  # the installed handlers; a plugin is imported only when a source uses it
    try:
        settings = validate(path, handlers)
    except ConfigError as exc:
        return _refuse(path, exc.errors)
    try:
        tracing = Tracing(__version__)
    except TracingMisconfigured as exc:
        print(f"billingd: invalid tracing configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        return _check(path, settings, handlers, tracing.enabled, offline=args.offline)
    redactor = Redactor(secrets_of(settings, os.environ))
    configure_logging(settings.daemon.log_level, settings.daemon.log_format, redactor=redactor)
    try:
        daemon = Daemon(
            settings,
            config_path=path,
            handlers=handlers,
            notifier=Notifier(),
            exit_process=os._exit,
            tracing=tracing,
            redactor=redactor,
        )
        return anyio.run(daemon.run, backend="asyncio", backend_options=loop_options(settings.daemon.uvloop))
    except OSError as exc:
        print(f"billingd: cannot serve HTTP on {settings.http.listen}: {exc}", file=sys.stderr)
        return EXIT_FORCED


def _check(path: str, settings: Settings, handlers: HandlerRegistry, traces: bool, *, offline: bool) -> int:
    """`billingd check` after the config validated: what it will do, then (online) every
    connection, the Stripe meters, the brokers' retention and Redis's durability. Returns 0, or
    `EXIT_CONFIG` for what the connections refuse."""
    print(f"{path}: OK ({len(settings.sources)} sources: {', '.join(s.name for s in settings.sources)})")
    print(f"  traces: {'on (OpenTelemetry, from the OTEL_* variables)' if traces else 'off'}")
    _print_lines(describe(settings, handlers) + handler_lines(settings, handlers))
    if offline:
        return 0
    connections, insecure, refused_tls = anyio.run(connection_report, settings, backend="asyncio")
    _print_lines(["connections:", *connections])
    _print_lines(insecure, "warnings (connections):")
    if refused_tls:
        return _refuse(path, refused_tls)
    meters, refused = anyio.run(stripe_meter_check, settings, backend="asyncio")
    _print_lines(meters)
    if refused:
        return _refuse(path, refused)
    warnings = anyio.run(broker_warnings, settings, handlers, backend="asyncio")
    _print_lines(warnings, "warnings (idempotency records vs. how long a message can wait):")
    durability, volatile = anyio.run(redis_durability, settings, backend="asyncio")
    _print_lines(durability, "warnings (the ledger's durability):")
    from billingd.metering.service import wants_sender

    outbox = wants_sender(settings) and settings.stripe.meter_delivery == "outbox"
    if volatile and outbox and not settings.stripe.outbox_on_volatile_redis:
        return _refuse(path, [
            "stripe.meter_delivery: the meter outbox lives in Redis, and this Redis has neither persistence nor "
            "replicas: a restart loses every meter event not yet sent. Turn on appendonly, add a replica, use "
            'meter_delivery = "inline", or set stripe.outbox_on_volatile_redis = true to accept it'
        ])  # fmt: skip
    return 0


def _print_lines(lines: Sequence[str], title: str = "") -> None:
    """`lines` on stdout, under `title` when there are any."""
    if lines and title:
        print(title)
    for line in lines:
        print(line)


def _refuse(path: str, errors: Sequence[str]) -> int:
    """Print `errors` as an invalid configuration of `path` on stderr; returns `EXIT_CONFIG`."""
    print(f"billingd: invalid configuration in {path}:", file=sys.stderr)
    for error in errors:
        print(f"  {error}", file=sys.stderr)
    return EXIT_CONFIG
