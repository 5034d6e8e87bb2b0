"""How many counted attempts a message has had, across replicas and restarts (DESIGN §2, §10).

A broker's own count is not an attempt count: SQS's `ApproximateReceiveCount` also rises for
every release (a drain, a FIFO message held behind its group's retried head), every uncounted
retry (an outage, back-pressure) and every receive by another replica; an AMQP header can be set
by any producer. So billingd keeps its own: `billingd:attempts:{<message id>}:<source>`, an
integer incremented once per counted retry and deleted when the message is dead-lettered (a
replayed letter starts afresh), kept for `ATTEMPTS_TTL` seconds.
"""

from __future__ import annotations

from billingd.clients.ledger.base import RedisLedger, key
from billingd.clients.ledger.scripts import Script

#: How long an attempt count is kept after its last counted retry (seconds): SQS's longest
#: retention (14 days) and a day more.
ATTEMPTS_TTL = 15 * 86400

_COUNT = Script.of("""
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return n
""")
_READ = Script.of("return tonumber(redis.call('GET', KEYS[1]) or '0')")
_CLEAR = Script.of("return redis.call('DEL', KEYS[1])")


class AttemptLedger(RedisLedger):
    """Counted attempts per (source, message id) (see module docstring).

    Raises (every method): as `RedisLedger`.
    """

    async def counted(self, source: str, message_id: str) -> int:
        """The counted attempts `message_id` of `source` has had so far (0 when none)."""
        return int(await self.run(_READ, (_key(source, message_id),), ()))

    async def count(self, source: str, message_id: str) -> int:
        """Count one more attempt; returns the attempts counted so far, this one included."""
        return int(await self.run(_COUNT, (_key(source, message_id),), (ATTEMPTS_TTL,)))

    async def clear(self, source: str, message_id: str) -> None:
        """Forget the count (the message was dead-lettered: a replay starts at attempt 1)."""
        await self.run(_CLEAR, (_key(source, message_id),), ())


def _key(source: str, message_id: str) -> str:
    return key("attempts", source, tag=message_id)
