"""structlog setup: JSON lines (default) or console, one event per state change (DESIGN §6).

Library loggers (aio-pika, aiormq, botocore) go through the same renderer at WARNING and above,
so a broker-cancelled consumer logged by aiormq is a JSON line like billingd's own.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from billingd.telemetry.redact import Redactor

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(
    level: str = "info", fmt: str = "json", stream: TextIO | None = None, redactor: Redactor | None = None
) -> Redactor:
    """Route structlog and stdlib logging to `stream` (stderr) at `level`, as `fmt` (json|console),
    every event — its traceback included — scrubbed of secrets by `redactor` (a new one knowing
    only the structural rules when None); returns the redactor in use (a reload adds to it)."""
    stream = stream or sys.stderr
    redactor = redactor or Redactor()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # tracebacks are rendered as text first (never with local variables), then scrubbed
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    tail: list[structlog.types.Processor] = [structlog.processors.format_exc_info, redactor, renderer]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(_LEVELS[level], logging.WARNING))
    return redactor
