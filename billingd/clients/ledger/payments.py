"""Which payment billingd is paying (or paid) an invoice with, per invoice (seed 004, DESIGN §10).

`billingd:payment:{<invoice id>}` — hash:

* `who` (`<gateway>:<payment id>`) holding the invoice now, its `state` — `pending` (claimed; a
  pay call may follow, or ended with no known outcome), `paid` (Stripe answered it), `refused`
  (Stripe refused it: nothing happened) — and its lease, `token` and `until` (Unix ms);
* per payment that ever held it: `tries:<who>`, `first:<who>` (its first claim, Unix s),
  `key:<who>` (the `Idempotency-Key` of its latest pay call) and `sent:<who>` (when that call was
  made, Unix s) — kept when another payment takes the invoice over, so a payment's latest call
  can always be replayed to learn its outcome.

Every time comes from Redis (`TIME`): one clock for every replica. One record per invoice
serialises every payment of it: a copy of the same capture, or a second payment of the invoice,
waits (`busy`) while a lease is held. Kept `ttl` seconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from billingd.clients.ledger.base import RedisLedger, key
from billingd.clients.ledger.scripts import Script

_NOW = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# ARGV: who, token, lease ms, ttl, take over (the other payment whose stale claim may be replaced)
_CLAIM = Script.of(
    _NOW
    + """
local h = redis.call('HMGET', KEYS[1], 'who', 'state', 'until')
local leased = tonumber(h[3] or '0') > now_ms
if h[1] and h[1] ~= ARGV[1] then
  if h[2] == 'paid' then return {'other_paid', h[1]} end
  if leased then return {'busy', h[1]} end
  if h[2] ~= 'refused' and ARGV[5] ~= h[1] then return {'other_pending', h[1]} end
end
if h[1] == ARGV[1] and h[2] == 'paid' then return {'paid', h[1]} end
if h[1] == ARGV[1] and leased then return {'busy', h[1]} end
local tries = redis.call('HINCRBY', KEYS[1], 'tries:' .. ARGV[1], 1)
redis.call('HSETNX', KEYS[1], 'first:' .. ARGV[1], t[1])
redis.call('HSET', KEYS[1], 'who', ARGV[1], 'state', 'pending', 'token', ARGV[2], 'until', now_ms + tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {'claimed', tostring(tries)}
"""
)
# ARGV: who, token, lease ms, the pay call's Idempotency-Key: the claim is still this worker's —
# extend it and record the call about to be made; 0 when the lease was lost.
_SENDING = Script.of(
    _NOW
    + """
local h = redis.call('HMGET', KEYS[1], 'who', 'token', 'state')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] or h[3] ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'until', now_ms + tonumber(ARGV[3]), 'key:' .. ARGV[1], ARGV[4], 'sent:' .. ARGV[1], t[1])
return 1
"""
)
# ARGV: who, token ('' = any: Stripe's answer is proof), state, hold ms (the lease kept), ttl
_SETTLE = Script.of(
    _NOW
    + """
local h = redis.call('HMGET', KEYS[1], 'who', 'token', 'state')
if h[1] ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' and h[2] ~= ARGV[2] then return 0 end
if h[3] == 'paid' and ARGV[3] ~= 'paid' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'until', now_ms + tonumber(ARGV[4]))
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
)
# ARGV: the payment whose own fields are read
_READ = Script.of(
    _NOW
    + """
local h = redis.call('HMGET', KEYS[1], 'who', 'state', 'until', 'first:' .. ARGV[1], 'key:' .. ARGV[1],
                     'sent:' .. ARGV[1])
return {h[1] or '', h[2] or '', tostring(tonumber(h[3] or '0') > now_ms and 1 or 0), h[4] or '0', h[5] or '',
        h[6] or '0', t[1]}
"""
)


class Claim(enum.Enum):
    """What `PaymentLedger.claim` found."""

    CLAIMED = "claimed"  # this worker may pay now
    PAID = "paid"  # this payment already paid the invoice
    BUSY = "busy"  # a lease on the invoice is held elsewhere
    OTHER_PAID = "other_paid"  # another payment (`holder`) paid the invoice
    OTHER_PENDING = "other_pending"  # another payment's call ended with no known outcome


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """The record of an invoice as one payment (`mine`) sees it: who holds it (`who` empty:
    nobody), in which `state`, whether a lease is held now; `first`, `key` and `sent` are
    `mine`'s own (0 / empty when it never claimed or called); `now` is Redis's time (Unix s)."""

    who: str = ""
    state: str = ""
    leased: bool = False
    first: int = 0
    key: str = ""
    sent: int = 0
    now: int = 0


class PaymentLedger(RedisLedger):
    """Claims and outcomes of pay calls per invoice (see module docstring). Raises: as `RedisLedger`."""

    async def record(self, invoice: str, mine: str) -> PaymentRecord:
        """The invoice's record, with payment `mine`'s own fields."""
        who, state, leased, first, key_, sent, now = await self.run(_READ, (_key(invoice),), (mine,))
        return PaymentRecord(
            who.decode(), state.decode(), leased == b"1", int(first), key_.decode(), int(sent), int(now)
        )

    async def claim(
        self, invoice: str, who: str, token: str, *, lease: float, ttl: int, take_over: str = ""
    ) -> tuple[Claim, str, int]:
        """Claim the right to pay `invoice` with payment `who` for `lease` seconds.

        `take_over` names another payment whose claim ended with no known outcome that the caller
        proved harmless (the invoice is still open): the invoice goes to `who`. Returns `(claim,
        the payment holding the record, this payment's try number)`."""
        reply = await self.run(_CLAIM, (_key(invoice),), (who, token, int(lease * 1000), ttl, take_over))
        claim = Claim(reply[0].decode())
        if claim is Claim.CLAIMED:
            return claim, who, int(reply[1])
        return claim, reply[1].decode(), 0

    async def sending(self, invoice: str, who: str, token: str, *, lease: float, idempotency_key: str) -> bool:
        """Just before a pay call: extend the claim for `lease` seconds and record the call's key
        and time; False when the claim is no longer this worker's (do not pay)."""
        args = (who, token, int(lease * 1000), idempotency_key)
        return bool(await self.run(_SENDING, (_key(invoice),), args))

    async def settle(self, invoice: str, who: str, state: str, ttl: int, *, token: str = "", hold: float = 0) -> bool:
        """Record the outcome of `who`'s call: `paid` (Stripe's answer: whoever holds the lease),
        `refused`, or `pending` (unknown; the lease kept `hold` more seconds, as the call may
        still run). With `token`, only while that claim holds the record. Returns whether written."""
        args = (who, token, state, int(hold * 1000), ttl)
        return bool(await self.run(_SETTLE, (_key(invoice),), args))


def _key(invoice: str) -> str:
    return key("payment", tag=invoice)
