"""Which payment billingd is paying (or paid) an invoice with, per invoice (seed 004, DESIGN §10).

`billingd:payment:{<invoice id>}` — hash: `who` (`<gateway>:<payment id>`), `state`
(`pending` while a pay call may be under way or its outcome is unknown, `paid` once Stripe
answered it, `refused` when Stripe refused it: nothing happened), `token` and `until` (the lease
of the worker paying now, Unix milliseconds), `first` (when the first pay call of `who` began,
Unix seconds), `tries` (pay calls made). Kept `ttl` seconds.

One record per invoice serialises every payment of it: a duplicate of the same capture, or a
second payment of the invoice, waits (`busy`) while a pay call is under way, and afterwards
finds out who paid from the record and the invoice — so a retry after a lost reply is never taken
for somebody else's payment.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from billingd.clients.ledger.base import RedisLedger, key
from billingd.clients.ledger.scripts import Script

_CLAIM = Script.of("""
local h = redis.call('HMGET', KEYS[1], 'who', 'state', 'until', 'tries', 'first')
local now = tonumber(ARGV[4])
local leased = tonumber(h[3] or '0') > now
if h[1] and h[1] ~= ARGV[1] then
  if h[2] == 'paid' then return {'other_paid', h[1]} end
  if h[2] == 'pending' and (leased or ARGV[6] ~= h[1]) then return {leased and 'busy' or 'other_pending', h[1]} end
end
if h[1] == ARGV[1] and h[2] == 'paid' then return {'paid', h[1]} end
if h[1] == ARGV[1] and leased then return {'busy', h[1]} end
local tries = (h[1] == ARGV[1] and tonumber(h[4] or '0') or 0) + 1
local first = (h[1] == ARGV[1] and h[5]) or tostring(math.floor(now / 1000))
redis.call('HSET', KEYS[1], 'who', ARGV[1], 'state', 'pending', 'token', ARGV[2], 'until', now + tonumber(ARGV[3]),
           'tries', tries, 'first', first)
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {'claimed', tostring(tries), first}
""")
_SETTLE = Script.of("""
if redis.call('HGET', KEYS[1], 'who') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'until', 0)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
""")
_READ = Script.of("return redis.call('HMGET', KEYS[1], 'who', 'state', 'until', 'tries', 'first')")


class Claim(enum.Enum):
    """What `PaymentLedger.claim` found."""

    CLAIMED = "claimed"  # this worker may pay now (`tries` says which pay call this is)
    PAID = "paid"  # this payment already paid the invoice
    BUSY = "busy"  # a pay call for this invoice is under way elsewhere
    OTHER_PAID = "other_paid"  # another payment (`who`) paid the invoice
    OTHER_PENDING = "other_pending"  # another payment's call ended with no known outcome


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """The record of an invoice (`who` empty: none). `first`: Unix seconds of the first pay call."""

    who: str = ""
    state: str = ""
    leased: bool = False
    tries: int = 0
    first: int = 0


class PaymentLedger(RedisLedger):
    """Claims and outcomes of pay calls per invoice (see module docstring). Raises: as `RedisLedger`."""

    async def record(self, invoice: str) -> PaymentRecord:
        """The invoice's record (empty when none)."""
        who, state, until, tries, first = await self.run(_READ, (key("payment", tag=invoice),), ())
        if who is None:
            return PaymentRecord()
        return PaymentRecord(
            who.decode(), (state or b"").decode(), int(until or 0) > _now_ms(), int(tries or 0), int(first or 0)
        )

    async def claim(
        self, invoice: str, who: str, token: str, *, lease: float, ttl: int, take_over: str = ""
    ) -> tuple[Claim, str, int, int]:
        """Claim the right to pay `invoice` with payment `who` for `lease` seconds.

        `take_over` names another payment whose call ended with no known outcome that the caller
        proved harmless (the invoice is still open): its record is replaced. Returns `(claim, who
        holds the record, tries, first)` — `tries` and `first` of this payment when CLAIMED."""
        args = (who, token, int(lease * 1000), _now_ms(), ttl, take_over)
        reply = await self.run(_CLAIM, (key("payment", tag=invoice),), args)
        claim = Claim(reply[0].decode())
        if claim is Claim.CLAIMED:
            return claim, who, int(reply[1]), int(reply[2])
        return claim, reply[1].decode(), 0, 0

    async def settle(self, invoice: str, who: str, state: str, ttl: int) -> None:
        """Record the outcome of `who`'s pay call: `paid` (Stripe answered it) or `refused`."""
        await self.run(_SETTLE, (key("payment", tag=invoice),), (who, state, ttl))


def _now_ms() -> int:
    return int(time.time() * 1000)
