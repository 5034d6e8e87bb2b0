"""`CallDeadlines`: how long a source's broker calls may take, shortened for every call, those
under way included, once a drain stops intake (issue: an idle drain held by a broker or proxy
that kept its answers)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import anyio

from billingd.sources.base import CALL_TIMEOUT, DRAIN_CALL_TIMEOUT


class CallDeadlines:
    """Each call `bound()` wraps takes at most `CALL_TIMEOUT` seconds (or its own bound), and at
    most `DRAIN_CALL_TIMEOUT` from the moment `stop()` is called."""

    def __init__(self) -> None:
        self.stopping = False
        self._scopes: set[anyio.CancelScope] = set()

    def stop(self) -> None:
        """Intake has stopped: bound every call, those under way included, by `DRAIN_CALL_TIMEOUT`."""
        self.stopping = True
        limit = anyio.current_time() + DRAIN_CALL_TIMEOUT
        for scope in self._scopes:
            scope.deadline = min(scope.deadline, limit)

    @contextlib.contextmanager
    def bound(self, what: str, seconds: float = CALL_TIMEOUT) -> Iterator[None]:
        """Run the block within its bound.

        Raises:
            TimeoutError: the bound passed (`what` names the call in the message).
        """
        limit = DRAIN_CALL_TIMEOUT if self.stopping else seconds
        scope = anyio.CancelScope(deadline=anyio.current_time() + limit)
        self._scopes.add(scope)
        try:
            with scope:
                yield
        finally:
            self._scopes.discard(scope)
        if scope.cancelled_caught:
            raise TimeoutError(f"{what} took more than {limit:g}s" + (" (draining)" if self.stopping else ""))
