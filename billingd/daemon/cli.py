"""The `billingd` command: `run`, `check`, `version`, `dlq list|replay`, `publish`.

Exit codes: 0 ok, 1 forced stop, 64 unknown source, 65 not JSON, 69 broker unavailable,
70 supervisor escalation, 78 invalid config.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import anyio

from billingd import __version__
from billingd.config import ConfigError, Settings, load_config
from billingd.daemon.app import EXIT_CONFIG, Daemon
from billingd.daemon.logging import configure_logging
from billingd.daemon.notify import Notifier
from billingd.daemon.tools_cli import add_commands, run_tool
from billingd.handlers.registry import handler_errors


def default_config_path() -> str:
    """`$BILLINGD_CONFIG`, else `./billingd.toml`."""
    return os.environ.get("BILLINGD_CONFIG") or "billingd.toml"


def load_checked(path: str) -> Settings:
    """Load `path` and check handler names and options too.

    Raises:
        ConfigError: every error found, each with its TOML path.
    """
    settings = load_config(path)
    errors = handler_errors(settings)
    if errors:
        raise ConfigError(errors, path)
    return settings


CONFIG_HELP = "config file (default: $BILLINGD_CONFIG, else ./billingd.toml)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="billingd", description="Billing event worker daemon.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run the daemon until SIGTERM/SIGINT (SIGHUP reloads the config)"),
        ("check", "validate the config file and print every error"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", "-c", default=None, help=CONFIG_HELP)
    commands.add_parser("version", help="print the version")
    add_commands(commands, CONFIG_HELP)
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
    try:
        settings = load_checked(path)
    except ConfigError as exc:
        print(f"billingd: invalid configuration in {path}:", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        print(f"{path}: OK ({len(settings.sources)} sources: {', '.join(s.name for s in settings.sources)})")
        return 0
    configure_logging(settings.daemon.log_level, settings.daemon.log_format)
    try:
        return anyio.run(Daemon(settings, config_path=path, notifier=Notifier()).run, backend="asyncio")
    except OSError as exc:
        print(f"billingd: cannot serve HTTP on {settings.http.listen}: {exc}", file=sys.stderr)
        return 1
