"""Entitlements, usage counters and usage-event idempotency (seeds 001 and 004) in Redis.

Keys (hash tag = the subject: a seed-001 `userId` or a seed-004 `workspace_id`):

* `billingd:ent:{subject}:<KEY>` — hash, one entitlement: `active` and `tracked` (0/1), `limit`
  (micro-units, -1 = unlimited), `period` (day/week/month/year/none), `period_start`,
  `period_end` (Unix seconds), `used` (micro-units in the current period), `version`
  (the `created` second of the Stripe event that wrote it; older writes are ignored);
* `billingd:usage:{subject}` — hash, the real-time usage counters other services read for
  enforcement: field `<KEY>` = micro-units in the current period, `<KEY>.period` = that
  period's start (Unix seconds); a counter from an older period reads as zero;
* `billingd:period:{subject}` — hash `start`, `end`, `interval`: the subject's billing period
  (from its Stripe subscription, rolled forward by `interval` once it has passed); counters
  without an entitlement use it, else the UTC calendar month;
* `billingd:customer:{subject}` — string: the subject's Stripe customer id;
* `billingd:usage-event:{subject}:<idempotency key>` (seed 004) or
  `billingd:ent-usage-event:{subject}:<length of the entitlement key>:<entitlement
  key>:<idempotency key>` (seed 001, whose keys are unique per entitlement) — hash recording that
  the Redis step of one usage event is done (`applied`, the `period` it counted in, `at`: when,
  `scope`), kept for `dedup_ttl` seconds; the Stripe step is recorded by the once ledger
  (`billingd:once:{subject}:meter:…`). A seed-001 record written before keys were scoped (no
  `scope` field) still counts as done.

Quantities are integer micro-units (1 unit = 1,000,000): amounts such as 2.5 AI credits stay exact.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from billingd.clients.ledger.base import LEDGER_MAX, RedisLedger, key
from billingd.clients.ledger.outbox import outbox_key
from billingd.clients.ledger.periods import FOREVER, PERIODS, calendar_month, period_containing
from billingd.clients.ledger.scripts import Script

MICROS = 1_000_000

_APPLY = """
local idem, counter, ent, period = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local mode, name, amount, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('HEXISTS', idem, 'applied') == 1 then
  local r = redis.call('HMGET', idem, 'period', 'at', 'scope', 'outbox')
  return {'duplicate', r[1] or '', r[2] or '', r[3] and '0' or '1', r[4] or '0'}
end
if redis.call('HEXISTS', KEYS[5], 'applied') == 1 and redis.call('HEXISTS', KEYS[5], 'scope') == 0 then
  local r = redis.call('HMGET', KEYS[5], 'period', 'at', 'outbox')  -- written before seed-001 keys were scoped
  return {'duplicate', r[1] or '', r[2] or '', '1', r[3] or '0'}
end
local start
if mode == 'consume' then
  if redis.call('EXISTS', ent) == 0 then return {'missing'} end
  local e = redis.call('HMGET', ent, 'active', 'tracked', 'limit', 'period', 'period_start', 'period_end', 'used')
  if e[1] ~= '1' then return {'inactive'} end
  if e[2] ~= '1' then return {'untracked'} end
  local used = tonumber(e[7] or '0')
  start = e[5]
  if e[4] ~= 'none' and now >= tonumber(e[6]) then
    if ARGV[6] == '' or ARGV[8] ~= e[5] then return {'reset', e[4], e[5]} end
    redis.call('HSET', ent, 'period_start', ARGV[6], 'period_end', ARGV[7], 'used', 0)
    used, start = 0, ARGV[6]
  end
  local limit = tonumber(e[3])
  if limit >= 0 and used + amount > limit then return {'over_limit', tostring(used), e[3]} end
  if amount > LEDGER_MAX - used then return {'overflow', 'entitlement'} end
else
  local p = redis.call('HMGET', period, 'start', 'end', 'interval')
  if p[1] and p[2] then
    start = p[1]
    if now >= tonumber(p[2]) then  -- the subject's billing period has passed: roll it forward
      if ARGV[6] == '' or ARGV[8] ~= p[1] then return {'reset', p[3] or 'month', p[1]} end
      redis.call('HSET', period, 'start', ARGV[6], 'end', ARGV[7])
      start = ARGV[6]
    end
  else
    start = ARGV[5]
  end
end
local mark = name .. '.period'
local current = 0
if redis.call('HGET', counter, mark) == start then
  current = tonumber(redis.call('HGET', counter, name) or '0') or LEDGER_MAX
end
if amount > LEDGER_MAX - current then return {'overflow', 'counter'} end
if mode == 'consume' then redis.call('HINCRBY', ent, 'used', amount) end
if current == 0 then redis.call('HSET', counter, name, 0, mark, start) end
redis.call('HINCRBY', counter, name, amount)
redis.call('HSET', idem, 'applied', 1, 'period', start, 'at', ARGV[4], 'scope', ARGV[10])
if ARGV[11] ~= '' then  -- its meter event, into the subject's outbox: in the same step
  redis.call('HSET', KEYS[6], ARGV[11], ARGV[12])
  redis.call('HSET', idem, 'outbox', 1)
end
redis.call('EXPIRE', idem, tonumber(ARGV[9]))
return {'applied', start, ARGV[4]}
""".replace("LEDGER_MAX", str(LEDGER_MAX))

_PUT_ENTITLEMENT = """
local version = tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1')
if version < current then return 0 end
local used = redis.call('HGET', KEYS[1], 'used') or '0'
if redis.call('HGET', KEYS[1], 'period_start') ~= ARGV[6] then used = '0' end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'active', ARGV[2], 'tracked', ARGV[3], 'limit', ARGV[4],
           'period', ARGV[5], 'period_start', ARGV[6], 'period_end', ARGV[7], 'used', used)
return 1
"""


class Applied(enum.Enum):
    """What the Redis step of a usage event found."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    MISSING = "missing"
    INACTIVE = "inactive"
    UNTRACKED = "untracked"
    OVER_LIMIT = "over_limit"
    OVERFLOW = "overflow"
    """The increment would take a counter past `LEDGER_MAX`: nothing written."""


@dataclass(frozen=True, slots=True)
class UsageResult:
    """The outcome of `apply`; `at` is when the Redis step applied (Unix seconds, the same on
    every retry, so the Stripe step sends the same parameters every time)."""

    status: Applied
    period_start: int = 0
    at: int = 0
    used: int = 0
    limit: int = 0
    legacy: bool = False
    """A duplicate whose record an earlier billingd wrote (before keys and identifiers were
    scoped): its Stripe step goes by the names of then."""
    outboxed: bool = False
    """A duplicate whose meter event went into the outbox with its Redis step."""


class UsageLedger(RedisLedger):
    """Entitlement consumption and usage counters (see module docstring)."""

    _apply = Script.of(_APPLY)
    _put = Script.of(_PUT_ENTITLEMENT)

    async def apply(
        self,
        subject: str,
        name: str,
        amount: int,
        idempotency_key: str,
        *,
        consume: bool,
        now: int,
        dedup_ttl: int,
        outbox: tuple[str, bytes] | None = None,
    ) -> UsageResult:
        """The Redis step of one usage event, atomically and once per idempotency key: consume
        entitlement `name` of `subject` by `amount` micro-units (when `consume`, seed 001: the key
        is unique per entitlement), with the lazy period reset of seed 001, and add `amount` to
        the subject's usage counter (seed 004: the key is unique per subject). With `outbox`
        (`(identifier, stored event)`), its meter event goes into the subject's outbox in the
        same script (`billingd.clients.ledger.outbox`)."""
        keys = [
            _scoped_event_key(subject, name, idempotency_key) if consume else _event_key(subject, idempotency_key),
            key("usage", tag=subject),
            key("ent", name, tag=subject),
            key("period", tag=subject),
            _event_key(subject, idempotency_key),  # seed 001: a record of before keys were scoped
            outbox_key(subject),
        ]
        default_start = calendar_month(now)[0]
        base = ["consume" if consume else "count", name, amount, now, default_start]
        scope = name if consume else ""
        tail = [dedup_ttl, scope, *(outbox or ("", b""))]
        reply = await self.run(self._apply, keys, [*base, "", "", "", *tail])
        if reply[0] == b"reset":  # a period has passed: compute the current one here (calendar math), then retry
            period, old_start = reply[1].decode(), reply[2].decode()
            start, end = period_containing(period, int(old_start), now)
            reply = await self.run(self._apply, keys, [*base, start, end, old_start, *tail])
        status = Applied(reply[0].decode())
        if status is Applied.OVER_LIMIT:
            return UsageResult(status, used=int(reply[1]), limit=int(reply[2]))
        if status is Applied.DUPLICATE:
            legacy, outboxed = reply[3] == b"1", reply[4] == b"1"
            return UsageResult(status, int(reply[1] or 0), at=int(reply[2] or now), legacy=legacy, outboxed=outboxed)
        if status is Applied.APPLIED:
            return UsageResult(status, int(reply[1] or 0), at=int(reply[2] or now))
        return UsageResult(status)

    async def put_entitlement(
        self,
        subject: str,
        name: str,
        *,
        limit: int | None,
        period: str,
        period_start: int,
        period_end: int | None = None,
        active: bool = True,
        tracked: bool = True,
        version: int = 0,
    ) -> bool:
        """Create or replace an entitlement (`limit` in micro-units, None = unlimited). Usage is
        kept while the period is unchanged. A write older than the stored `version` is ignored;
        returns whether it was written.

        Raises:
            ValueError: unknown `period`.
        """
        if period not in PERIODS:
            raise ValueError(f"unknown period {period!r}: expected one of {', '.join(PERIODS)}")
        if period_end is None:
            period_end = FOREVER if period == "none" else period_containing(period, period_start, period_start)[1]
        args = (version, int(active), int(tracked), -1 if limit is None else limit, period, period_start, period_end)
        return bool(await self.run(self._put, (key("ent", name, tag=subject),), args))

    async def entitlement(self, subject: str, name: str) -> dict[str, str]:
        """The entitlement record (empty when none)."""
        return await self.hgetall(key("ent", name, tag=subject))

    async def counter(self, subject: str, name: str) -> tuple[int, int]:
        """`(micro-units, period start)` of the usage counter `name` of `subject` ((0, 0) when none)."""
        record = await self.hgetall(key("usage", tag=subject))
        return int(record.get(name, 0)), int(record.get(f"{name}.period", 0))

    async def event(self, subject: str, idempotency_key: str, entitlement: str | None = None) -> dict[str, str]:
        """The idempotency record of one usage event (seed 001: of `entitlement`; empty when none
        or expired)."""
        if entitlement is not None:
            return await self.hgetall(_scoped_event_key(subject, entitlement, idempotency_key))
        return await self.hgetall(_event_key(subject, idempotency_key))

    async def set_customer(self, subject: str, customer_id: str) -> None:
        """Map `subject` (workspace or user) to its Stripe customer."""
        await self.set_str(key("customer", tag=subject), customer_id)

    async def customer(self, subject: str) -> str | None:
        """The Stripe customer of `subject`, if known."""
        return await self.get_str(key("customer", tag=subject))

    async def enqueue_late(
        self, subject: str, name: str, idempotency_key: str, *, consume: bool, legacy: bool, outbox: tuple[str, bytes]
    ) -> bool:
        """Put the meter event of a usage event whose Redis step was done without it (by an
        earlier billingd, or inline) into the outbox, once; returns whether it was put."""
        record = (
            _scoped_event_key(subject, name, idempotency_key)
            if consume and not legacy
            else _event_key(subject, idempotency_key)
        )
        return bool(await self.run(_ENQUEUE, (record, outbox_key(subject)), outbox))

    async def period(self, subject: str, now: int | None = None) -> tuple[int, int] | None:
        """The subject's billing period `(start, end)` (Unix seconds, end exclusive) at `now`
        (default: the present), if billingd knows one: a stored period that has passed is rolled
        forward by its `interval`, as the usage script rolls it on the next event."""
        record = await self.hgetall(key("period", tag=subject))
        if "start" not in record or "end" not in record:
            return None
        start, end = int(record["start"]), int(record["end"])
        now = int(time.time()) if now is None else now
        interval = record.get("interval", "month")
        if end <= now and interval in PERIODS and interval != "none":
            return period_containing(interval, start, now)
        return start, end

    async def set_period(self, subject: str, start: int, end: int, interval: str = "month") -> None:
        """Set the subject's billing period (Unix seconds, end exclusive; rolled by `interval`)."""
        await self.run(_SET_PERIOD, (key("period", tag=subject),), (start, end, interval))


_ENQUEUE = Script.of("""
if redis.call('HEXISTS', KEYS[1], 'outbox') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'outbox', 1)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
""")


def _event_key(subject: str, idempotency_key: str) -> str:
    return key("usage-event", idempotency_key, tag=subject)


def _scoped_event_key(subject: str, entitlement: str, idempotency_key: str) -> str:
    """Seed 001's record key: the entitlement's length first, so no two (entitlement, key) pairs
    share a key."""
    return key("ent-usage-event", str(len(entitlement)), entitlement, idempotency_key, tag=subject)


_SET_PERIOD = Script.of("redis.call('HSET', KEYS[1], 'start', ARGV[1], 'end', ARGV[2], 'interval', ARGV[3]) return 1")
