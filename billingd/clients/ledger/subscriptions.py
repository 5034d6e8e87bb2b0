"""What Stripe says a subject is entitled to (seed 004: "Stripe is the source of truth"), in Redis.

Keys (hash tag = the subject), beside those of `billingd.clients.ledger.usage`:

* `billingd:sub:{subject}` — hash: `subscription`, `status`, `keys` (JSON list of the entitlement
  keys it grants), `period_start`, `period_end`, `interval`, `ended` (1 once the subscription was
  deleted), and the versions of the last writes: `version` (subscription events),
  `renewal_version` (renewals), `features_version`;
* `billingd:features:{subject}` — set: the active feature lookup keys (Stripe Entitlements);
* `billingd:subject:{customer}` — string: the subject of a Stripe customer (reverse mapping).

Every write carries a version — the `created` second of the Stripe event — and a write older
than the stored version changes nothing, so events arriving out of order never roll state back.
Three rules close the holes seconds leave (issue 24, item 9):

* a deleted subscription never comes back from an event that is not newer (`ended:<id>` keeps
  each subscription's deletion): an update in the same second as its deletion changes nothing;
* one subscription holds a subject at a time: an event of another subscription takes over only
  when that one was created later than the current one, or the current one ended (a customer
  moving to a new subscription and cancelling the old, in any order of the events);
* the read of the keys to grant or deactivate and the write are one step: each script checks the
  keys it was given are still the stored ones, else the client reads again (two events of one
  subject on two replicas cannot leave an entitlement active after a cancellation);
* the billing period only moves forward: a subscription event older than an applied renewal
  keeps the renewal's period and the usage counted in it (it never grants a period twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from billingd.clients.errors import Busy
from billingd.clients.ledger.base import RedisLedger, key
from billingd.clients.ledger.scripts import Script

# Every script compares the keys the client read (the last ARGV) with the stored ones and returns
# -1 when another event changed them meanwhile: the client reads again and retries, so the
# read-decide-write is one atomic step even across replicas.
_APPLY = Script.of("""
local version = tonumber(ARGV[1])
local cur = redis.call('HMGET', KEYS[1], 'version', 'ended', 'subscription', 'keys', 'created')
local ended = redis.call('HGET', KEYS[1], 'ended:' .. ARGV[3])
if ended and version <= tonumber(ended) then return 0 end  -- deleted: never back from an event not newer
if cur[3] and cur[3] ~= '' and cur[3] ~= ARGV[3] then
  -- another subscription holds the subject: an older one (created earlier) never displaces a live one
  if cur[2] ~= '1' and tonumber(ARGV[10]) < tonumber(cur[5] or '0') then return 0 end
elseif version < tonumber(cur[1] or '-1') then
  return 0
end
if (cur[4] or '') ~= ARGV[#ARGV] then return -1 end
local n = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'subscription', ARGV[3], 'status', ARGV[4], 'keys', ARGV[5], 'ended', 0,
           'created', ARGV[10])
if tonumber(ARGV[7]) >= tonumber(redis.call('HGET', KEYS[2], 'start') or '-1') then
  redis.call('HSET', KEYS[1], 'period_start', ARGV[7], 'period_end', ARGV[8], 'interval', ARGV[9])
  redis.call('HSET', KEYS[2], 'start', ARGV[7], 'end', ARGV[8], 'interval', ARGV[9])
end
for i = 1, n do
  local k, b = KEYS[2 + i], 10 + (i - 1) * 5
  local e = redis.call('HMGET', k, 'period_start', 'period_end', 'used', 'period')
  local start, stop, used = ARGV[b + 3], ARGV[b + 4], e[3] or '0'
  if e[1] ~= start then
    if e[1] and e[4] == ARGV[b + 2] and tonumber(e[1]) > tonumber(start) then
      start, stop = e[1], e[2]  -- a renewal already moved this period on: keep it and its usage
    else
      used = '0'
    end
  end
  redis.call('HSET', k, 'version', ARGV[1], 'active', ARGV[6], 'tracked', ARGV[b + 5], 'limit', ARGV[b + 1],
             'period', ARGV[b + 2], 'period_start', start, 'period_end', stop, 'used', used)
end
for i = 3 + n, #KEYS do redis.call('HSET', KEYS[i], 'active', 0, 'version', ARGV[1]) end
return 1
""")

_DEACTIVATE = Script.of("""
local version = tonumber(ARGV[1])
if ARGV[4] == '1' then
  local ended = tonumber(redis.call('HGET', KEYS[1], 'ended:' .. ARGV[2]) or '-1')
  if version > ended then redis.call('HSET', KEYS[1], 'ended:' .. ARGV[2], ARGV[1]) end
end
local cur = redis.call('HMGET', KEYS[1], 'version', 'subscription', 'keys')
if cur[2] and cur[2] ~= '' and cur[2] ~= ARGV[2] then return 0 end  -- another subscription's end
if version < tonumber(cur[1] or '-1') then return 0 end
if (cur[3] or '') ~= ARGV[#ARGV] then return -1 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'subscription', ARGV[2], 'status', ARGV[3], 'ended', ARGV[4])
for i = 2, #KEYS do redis.call('HSET', KEYS[i], 'active', 0, 'version', ARGV[1]) end
return 1
""")

_RENEW = Script.of("""
local version, start, stop, interval = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
if version < tonumber(redis.call('HGET', KEYS[1], 'renewal_version') or '-1') then return 0 end
redis.call('HSET', KEYS[1], 'renewal_version', ARGV[1])
local current = redis.call('HGET', KEYS[2], 'start')
if (not current) or tonumber(current) <= start then
  redis.call('HSET', KEYS[2], 'start', ARGV[2], 'end', stop, 'interval', interval)
end
local fields = redis.call('HGETALL', KEYS[3])
for i = 1, #fields, 2 do
  local f = fields[i]
  if string.sub(f, -7) == '.period' and tonumber(fields[i + 1]) < start then
    redis.call('HSET', KEYS[3], string.sub(f, 1, -8), 0, f, ARGV[2])
  end
end
for i = 4, #KEYS do
  local e = redis.call('HMGET', KEYS[i], 'period', 'period_start')
  if e[1] == interval and e[2] and tonumber(e[2]) < start then
    redis.call('HSET', KEYS[i], 'used', 0, 'period_start', ARGV[2], 'period_end', stop)
  end
end
return 1
""")

_FEATURES = Script.of("""
local version = tonumber(ARGV[1])
if version < tonumber(redis.call('HGET', KEYS[1], 'features_version') or '-1') then return 0 end
redis.call('HSET', KEYS[1], 'features_version', ARGV[1])
redis.call('DEL', KEYS[2])
if #ARGV > 1 then redis.call('SADD', KEYS[2], unpack(ARGV, 2)) end
return 1
""")

_MEMBERS = Script.of("return redis.call('SMEMBERS', KEYS[1])")


@dataclass(frozen=True, slots=True)
class Grant:
    """One entitlement a subscription grants: `limit` in micro-units per `period` (None: unlimited);
    `tracked=False` for an access-only feature (no usage tracking); `start`/`end` of its current
    period (Unix seconds)."""

    key: str
    limit: int | None
    period: str
    start: int
    end: int
    tracked: bool = True


class SubscriptionLedger(RedisLedger):
    """Entitlements rebuilt from Stripe subscriptions; renewals; features; customer mapping."""

    async def apply_subscription(
        self,
        subject: str,
        *,
        version: int,
        subscription_id: str,
        status: str,
        active: bool,
        period_start: int,
        period_end: int,
        interval: str,
        grants: Sequence[Grant],
        created: int = 0,
    ) -> bool:
        """Replace the subject's entitlements with `grants` (active or not); keys it no longer
        grants are deactivated. `created` is the subscription's own creation time: one created
        before the subject's current, live subscription never displaces it. Usage is kept for an
        entitlement whose period is unchanged (or already moved on by a renewal). Returns False
        when a newer version is stored (nothing changed).

        Raises:
            Busy: other events of the subject kept changing its keys (retried, uncounted).
        """
        names = [g.key for g in grants]
        args: list[object] = [version, len(grants), subscription_id, status, msgspec.json.encode(names), int(active),
                              period_start, period_end, interval, created]  # fmt: skip
        for g in grants:
            args += [-1 if g.limit is None else g.limit, g.period, g.start, g.end, int(g.tracked)]

        def keys_for(previous: list[str]) -> list[str]:
            dropped = [k for k in previous if k not in names]
            return [key("sub", tag=subject), key("period", tag=subject)] + [
                key("ent", k, tag=subject) for k in [*names, *dropped]
            ]

        return await self._checked(subject, _APPLY, keys_for, args)

    async def deactivate(self, subject: str, *, version: int, subscription_id: str, status: str) -> bool:
        """Mark every entitlement of the subject's subscription inactive (deleted, paused); an
        event about another subscription than the stored one changes nothing."""
        ended = "1" if status in ENDED_STATUSES else "0"

        def keys_for(previous: list[str]) -> list[str]:
            return [key("sub", tag=subject), *(key("ent", k, tag=subject) for k in previous)]

        return await self._checked(subject, _DEACTIVATE, keys_for, [version, subscription_id, status, ended])

    async def _checked(self, subject: str, script: Script, keys_for: Any, args: list[object]) -> bool:
        """Run `script` with the keys derived from the stored ones, again while they changed meanwhile."""
        for _ in range(5):
            record = await self.subscription(subject)
            stored = record.get("keys", "")
            previous = list(msgspec.json.decode(stored)) if stored else []
            result = int(await self.run(script, keys_for(previous), [*args, stored]))
            if result >= 0:
                return bool(result)
        raise Busy(f"the entitlements of {subject} kept changing under this event")

    async def renew(self, subject: str, *, version: int, start: int, end: int, interval: str) -> bool:
        """A renewal (`invoice.paid`, `subscription_cycle`): the billing period becomes
        `[start, end)`; counters and `interval` entitlements still counting an older period
        start the new one at zero. Usage already counted in the new period is kept."""
        keys = [key("sub", tag=subject), key("period", tag=subject), key("usage", tag=subject)]
        keys += [key("ent", k, tag=subject) for k in await self._stored_keys(subject)]
        return bool(await self.run(_RENEW, keys, (version, start, end, interval)))

    async def set_features(self, subject: str, features: Sequence[str], *, version: int) -> bool:
        """Replace the subject's active features (Stripe Entitlements lookup keys)."""
        keys = (key("sub", tag=subject), key("features", tag=subject))
        return bool(await self.run(_FEATURES, keys, (version, *features)))

    async def features(self, subject: str) -> set[str]:
        """The subject's active features."""
        return {m.decode() for m in await self.run(_MEMBERS, (key("features", tag=subject),), ())}

    async def subscription(self, subject: str) -> dict[str, str]:
        """The subject's subscription record (empty when none)."""
        return await self.hgetall(key("sub", tag=subject))

    async def map_customer(self, subject: str, customer: str) -> None:
        """Record both directions of subject ↔ Stripe customer."""
        await self.set_str(key("customer", tag=subject), customer)
        await self.set_str(key("subject", tag=customer), subject)

    async def subject_of(self, customer: str) -> str | None:
        """The subject of a Stripe customer, if known."""
        return await self.get_str(key("subject", tag=customer))

    async def _stored_keys(self, subject: str) -> list[str]:
        record = await self.subscription(subject)
        return list(msgspec.json.decode(record["keys"])) if record.get("keys") else []


#: Subscription statuses after which it never grants again (Stripe: a canceled subscription
#: cannot be reactivated).
ENDED_STATUSES = frozenset({"canceled", "incomplete_expired"})
