"""The exit codes of `billingd` (sysexits.h names where one fits), in one place."""

from __future__ import annotations

EXIT_OK = 0
"""A clean stop after a drain."""
EXIT_FORCED = 1
"""A second signal, the stop's hard deadline, or the HTTP address could not be bound: unsettled
messages return to their queues."""
EXIT_USAGE = 64
"""(EX_USAGE) `dlq`, `publish`: no source of that name."""
EXIT_DATAERR = 65
"""(EX_DATAERR) `publish`: the file is not JSON."""
EXIT_UNAVAILABLE = 69
"""(EX_UNAVAILABLE) `dlq`, `publish`: the broker could not be reached or refused."""
EXIT_SOFTWARE = 70
"""(EX_SOFTWARE) supervisor escalation: an actor crashed too often; every actor was drained first."""
EXIT_CONFIG = 78
"""(EX_CONFIG) invalid configuration: nothing was started."""
