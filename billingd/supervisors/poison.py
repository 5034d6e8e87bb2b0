"""Poison-message detection: the backstop for a message that crashes its actor (DESIGN §8).

Input is parsed defensively at the edge, so a message should never crash an actor; a crash means
a bug. Even then one message must not take its source (or, through escalation, the daemon) down:
when an actor crashes, the stage that failed names the messages it held (the delivery a worker
was handling, the settlements a settler could not apply one by one), and `PoisonLog` counts the
crashes per message id across restarts of the source's actor. Once a message has been in hand at
`POISON_AFTER` crashes, its next delivery is dead-lettered without calling the handler, with the
crash as the reason, so the supervisor restarts the actor at most `POISON_AFTER` times for it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

#: Crashes with a message in hand after which its next delivery is dead-lettered unhandled.
POISON_AFTER = 2
#: Message ids remembered per source (the oldest are forgotten first).
MEMORY = 1000


class PoisonLog:
    """Crash counts per message id of one source; outlives the source's actors."""

    def __init__(self, threshold: int = POISON_AFTER, memory: int = MEMORY) -> None:
        self.threshold = threshold
        self._memory = memory
        self._crashes: OrderedDict[str, tuple[int, str]] = OrderedDict()

    def record(self, message_ids: Iterable[str], error: str) -> None:
        """The actor crashed with `error` while these messages were in the failing stage."""
        for message_id in message_ids:
            count, _ = self._crashes.pop(message_id, (0, ""))
            self._crashes[message_id] = (count + 1, error)
        while len(self._crashes) > self._memory:
            self._crashes.popitem(last=False)

    def verdict(self, message_id: str) -> str | None:
        """The dead-letter reason for `message_id` once it crossed the threshold, else None."""
        if not self._crashes:
            return None
        count, error = self._crashes.get(message_id, (0, ""))
        if count < self.threshold:
            return None
        return f"poison message: its actor crashed {count} times while it was in hand (last: {error})"[:1000]
