"""The meter outbox and the usage journal in Redis (DESIGN §10; issue 25).

A usage event's meter event is written into its subject's outbox by the same Lua script as its
Redis step (`UsageLedger.apply`), so a message is acked as soon as that script ran — Stripe's
answer is not waited for. A sender per process (`billingd.metering.sender`) drains the outboxes
into Stripe's meter event stream and, once Stripe accepted a request, removes its events from the
outbox and adds their values to the journal in one script per subject (so an event is journaled
once however often it is re-sent).

Keys (`{subject}` is the usage event's subject, `{o<n>}` an outbox shard):

* `billingd:outbox:{subject}` — hash: meter `identifier` → the event (`OutboxEvent`, JSON);
* `billingd:outbox-index:{o<n>}` — sorted set: subjects with events waiting, scored by when
  their oldest waiting event was enqueued (Unix seconds); shard `n` = CRC32(subject) % `shards`;
* `billingd:outbox-lease:{o<n>}` — the process sending shard `n` (a token, `PX` lease): another
  process takes the shard over when a replica dies;
* `billingd:outbox-held:{subject}` — hash: events held out of the stream, for finance: too old
  for Stripe (35 days) or refused by Stripe itself; never dropped (`billingd meters`); the
  subjects with some are in `billingd:outbox-held-index:{held}`;
* `billingd:journal:{subject}:<day>` — hash: `<customer>|<meter>|<hour>` → the sum of values
  Stripe accepted from billingd for that customer, meter and hour (Unix hour = seconds / 3600)
  of the events' timestamps, and `<…>@` → when that sum last grew (reconciliation leaves a
  bucket alone until Stripe's summaries had `settle` to show it); kept `keep` seconds; events
  sent inline are journaled with their once-step;
* `billingd:journal-index:{<day>}` — set: subjects with a journal of that day (UTC day = Unix
  seconds / 86400), written before the journal itself;
* `billingd:sent:{h<n>}:<day>` — hash: 16 hex digits of an identifier → `<customer>|<meter>|<hour>`
  of the events sent that day, for 36 hours (about 80 bytes an event): ties the sample
  identifiers of Stripe's error reports to buckets;
* `billingd:outbox-meta:{meta}` — hash: `shards`, the most outbox shards any sender used (a
  smaller count later still reads the larger one's shards until their subjects moved);
* `billingd:lease:{<name>}`, `billingd:last-run:{<name>}` — the lease of a periodic job
  (`reconcile`) and when a replica last finished it.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec

from billingd.clients.ledger.base import RedisLedger, key
from billingd.clients.ledger.scripts import Script

#: How long the identifier → bucket index of sent events is kept (seconds): Stripe's error reports
#: come within hours of the validation.
SENT_TTL = 36 * 3600
#: Shards of the identifier → bucket index.
SENT_SHARDS = 64
#: How long the buckets of refused events are kept (seconds): reconciliation's longest reach.
REFUSED_TTL = 45 * 86400


class OutboxEvent(msgspec.Struct, array_like=True, frozen=True):
    """One meter event waiting in an outbox: Stripe's `event_name`, the customer, the whole
    `value`, its `timestamp` (Unix seconds), the producer's `key` (for people) and `enqueued`
    (Unix seconds)."""

    event_name: str
    customer: str
    value: int
    timestamp: int
    key: str
    enqueued: int

    @property
    def hour(self) -> int:
        """The Unix hour of the event's timestamp (seconds // 3600)."""
        return self.timestamp // 3600

    @property
    def bucket(self) -> str:
        """`<customer>|<meter>|<hour>`: the journal field the event counts in."""
        return f"{self.customer}|{self.event_name}|{self.hour}"


_ENCODE = msgspec.json.Encoder()
_DECODE = msgspec.json.Decoder(OutboxEvent)


def encode(event: OutboxEvent) -> bytes:
    """The stored form of `event`."""
    return _ENCODE.encode(event)


def decode(raw: bytes) -> OutboxEvent:
    """An event from its stored form (raises msgspec errors on a corrupt one)."""
    return _DECODE.decode(raw)


# KEYS: outbox, journal; ARGV: keep seconds, then identifiers. Each identifier still waiting is
# removed and journaled; one already gone (another sender, or an earlier ack) counts nothing.
_ACK = Script.of("""
local n = 0
local now = redis.call('TIME')[1]
for i = 2, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw then
    local e = cjson.decode(raw)
    local field = e[2] .. '|' .. e[1] .. '|' .. string.format('%.0f', math.floor(e[4] / 3600))
    redis.call('HINCRBY', KEYS[2], field, string.format('%.0f', e[3]))
    redis.call('HSET', KEYS[2], field .. '@', now)
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
if n > 0 then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
return n
""")
# KEYS: journal; ARGV: keep, field, value: one inline-sent event journaled (with its once step)
JOURNAL_ONE = """
local now = redis.call('TIME')[1]
redis.call('HINCRBY', KEYS[2], ARGV[3], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[3] .. '@', now)
redis.call('EXPIRE', KEYS[2], ARGV[5])
"""
# KEYS: outbox, held; ARGV: reason, identifiers: moved out of the stream, for finance.
_HOLD = Script.of("""
local n = 0
for i = 2, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw then
    redis.call('HSET', KEYS[2], ARGV[i], cjson.encode({raw, ARGV[1]}))
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
""")
_LEASE = Script.of("""
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
""")
_UNLEASE = Script.of("""
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
""")
_READ = Script.of("return redis.call('HGETALL', KEYS[1])")
_INDEX = Script.of("""
for i = 1, #ARGV, 2 do redis.call('ZADD', KEYS[1], 'NX', ARGV[i], ARGV[i + 1]) end
return 1
""")
# KEYS: index; ARGV: subject, the oldest enqueue time left (or '' when none is left)
_REINDEX = Script.of("""
if ARGV[2] == '' then redis.call('ZREM', KEYS[1], ARGV[1]) return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
""")
_PENDING = Script.of("""
local first = tonumber(ARGV[1])
return redis.call('ZRANGE', KEYS[1], first, first + tonumber(ARGV[2]) - 1, 'WITHSCORES')
""")
_SHARDS = Script.of("""
local used = tonumber(redis.call('HGET', KEYS[1], 'shards') or '0')
if tonumber(ARGV[1]) > used then redis.call('HSET', KEYS[1], 'shards', ARGV[1]) return tonumber(ARGV[1]) end
return used
""")
_ADD_KEPT = Script.of("""
for i = 1, #ARGV do redis.call('SADD', KEYS[1], ARGV[i]) end
return 1
""")
_OLDEST = Script.of("""
local r = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {r[2] or '', redis.call('ZCARD', KEYS[1])}
""")
_ADD = Script.of("""
for i = 2, #ARGV do redis.call('SADD', KEYS[1], ARGV[i]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
""")
_SENT = Script.of("""
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
""")
_SMEMBERS = Script.of("return redis.call('SMEMBERS', KEYS[1])")
_STAMP = Script.of("redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1")
_HLEN = Script.of("return redis.call('HLEN', KEYS[1])")
_HMGET = Script.of("return redis.call('HMGET', KEYS[1], unpack(ARGV))")


def outbox_key(subject: str) -> str:
    """The outbox of `subject`."""
    return key("outbox", tag=subject)


def journal_key(subject: str, day: int) -> str:
    """The journal of `subject` on UTC `day`."""
    return key("journal", str(day), tag=subject)


def shard_of(subject: str, shards: int) -> int:
    """The outbox shard of `subject`."""
    return zlib.crc32(subject.encode("utf-8", "surrogatepass")) % shards


def day_of(timestamp: int) -> int:
    """The UTC day (Unix seconds // 86400) of `timestamp`."""
    return timestamp // 86400


@dataclass(frozen=True, slots=True)
class Waiting:
    """A subject with events waiting, since `since` (Unix seconds: its oldest enqueue)."""

    subject: str
    since: float


class OutboxLedger(RedisLedger):
    """The outboxes, their shard indexes and leases, the held events and the journal (see module
    docstring). Raises: as `RedisLedger`."""

    # -- the outbox ------------------------------------------------------------------------

    async def index(self, subject: str, enqueued: int, shards: int) -> None:
        """Name `subject` in its shard's index (kept when already there: the oldest time stays)."""
        await self.run(_INDEX, (self._index(shard_of(subject, shards)),), (enqueued, subject))

    async def waiting(self, shard: int, limit: int, start: int = 0) -> list[Waiting]:
        """Up to `limit` subjects of `shard` with events waiting, the longest-waiting first,
        from the `start`-th on."""
        reply = await self.run(_PENDING, (self._index(shard),), (start, limit))
        return [Waiting(reply[i].decode(), float(reply[i + 1])) for i in range(0, len(reply), 2)]

    async def index_at(self, subject: str, shard: int, oldest: int) -> None:
        """Name `subject` in `shard`'s index at `oldest` (its oldest waiting event)."""
        await self.run(_REINDEX, (self._index(shard),), (subject, oldest))

    async def unindex(self, subject: str, shard: int) -> None:
        """Take `subject` out of `shard`'s index."""
        await self.run(_REINDEX, (self._index(shard),), (subject, ""))

    async def shards_used(self, configured: int) -> int:
        """The most shards any sender was configured with (recording `configured`): subjects
        indexed under a larger count than today's are still read until they move."""
        return int(await self.run(_SHARDS, (key("outbox-meta", tag="meta"),), (configured,)))

    async def oldest(self, shard: int) -> tuple[float | None, int]:
        """`(enqueue time of the longest-waiting subject or None, subjects waiting)` of `shard`."""
        since, count = await self.run(_OLDEST, (self._index(shard),), ())
        return (float(since) if since else None), int(count)

    async def count(self, subject: str) -> int:
        """How many events wait in `subject`'s outbox."""
        return int(await self.run(_HLEN, (outbox_key(subject),), ()))

    async def events(self, subject: str) -> dict[str, bytes]:
        """`identifier → stored event` of every event waiting in `subject`'s outbox."""
        reply = await self.run(_READ, (outbox_key(subject),), ())
        return {reply[i].decode(): reply[i + 1] for i in range(0, len(reply), 2)}

    async def reindex(self, subject: str, shards: int, oldest: int | None) -> None:
        """Set `subject`'s place in its shard's index to `oldest` (None: nothing waits: removed)."""
        await self.run(_REINDEX, (self._index(shard_of(subject, shards)),), (subject, "" if oldest is None else oldest))

    async def acknowledge(self, subject: str, events: Sequence[tuple[str, OutboxEvent]], keep: int) -> int:
        """Stripe accepted `events` of `subject`: index their day (first), then remove them from
        the outbox and add them to the journal in one script, and remember which bucket each
        identifier went to. Returns how many were still waiting (each journaled exactly once)."""
        by_day: dict[int, list[str]] = {}
        for identifier, event in events:
            by_day.setdefault(day_of(event.timestamp), []).append(identifier)
        for day in by_day:
            await self.run(_ADD, (key("journal-index", tag=str(day)),), (keep, subject))
        done = 0
        for day, identifiers in by_day.items():
            keys = (outbox_key(subject), journal_key(subject, day))
            done += int(await self.run(_ACK, keys, (keep, *identifiers)))
        await self._remember_sent(events)
        return done

    async def hold(self, subject: str, identifiers: Iterable[str], reason: str) -> int:
        """Move events out of the stream into `subject`'s held events, with `reason` (and name the
        subject in `billingd:outbox-held-index` for `billingd meters`)."""
        await self.run(_ADD_KEPT, (key("outbox-held-index", tag="held"),), (subject,))  # kept as long as they are
        keys = (outbox_key(subject), key("outbox-held", tag=subject))
        return int(await self.run(_HOLD, keys, (reason, *identifiers)))

    async def held_subjects(self) -> list[str]:
        """Subjects with held events."""
        return [m.decode() for m in await self.run(_SMEMBERS, (key("outbox-held-index", tag="held"),), ())]

    async def held(self, subject: str) -> dict[str, tuple[OutboxEvent, str]]:
        """`identifier → (event, reason)` of `subject`'s held events."""
        reply = await self.run(_READ, (key("outbox-held", tag=subject),), ())
        out: dict[str, tuple[OutboxEvent, str]] = {}
        for i in range(0, len(reply), 2):
            raw, reason = msgspec.json.decode(reply[i + 1])
            out[reply[i].decode()] = (decode(raw.encode()), str(reason))
        return out

    # -- leases ----------------------------------------------------------------------------

    async def lease(self, shard: int, token: str, ttl: float) -> bool:
        """Take or renew the lease of `shard` for `ttl` seconds; False when another holds it."""
        return bool(await self.run(_LEASE, (key("outbox-lease", tag=f"o{shard}"),), (token, int(ttl * 1000))))

    async def lease_named(self, name: str, token: str, ttl: float) -> bool:
        """Take or renew the lease `billingd:lease:{<name>}` (one holder across replicas)."""
        return bool(await self.run(_LEASE, (key("lease", tag=name),), (token, int(ttl * 1000))))

    async def last_run(self, name: str) -> float | None:
        """When the periodic job `name` (e.g. `reconcile`) last finished, by any replica (Unix s)."""
        raw = await self.get_str(key("last-run", tag=name))
        return float(raw) if raw else None

    async def finished(self, name: str, at: float, keep: int) -> None:
        """Record that the periodic job `name` finished at `at` (kept `keep` seconds)."""
        await self.run(_STAMP, (key("last-run", tag=name),), (repr(at), keep))

    async def unlease(self, shard: int, token: str) -> None:
        """Give `shard` back (a no-op when `token` no longer holds it)."""
        await self.run(_UNLEASE, (key("outbox-lease", tag=f"o{shard}"),), (token,))

    # -- the journal -----------------------------------------------------------------------

    async def journal_subjects(self, day: int) -> list[str]:
        """Subjects with a journal of `day`."""
        return [m.decode() for m in await self.run(_SMEMBERS, (key("journal-index", tag=str(day)),), ())]

    async def journal(self, subject: str, day: int) -> dict[str, tuple[int, int]]:
        """`<customer>|<meter>|<hour>` → `(value Stripe accepted, when it last grew)` (Unix s),
        for `subject` on `day`."""
        reply = await self.run(_READ, (journal_key(subject, day),), ())
        fields = {reply[i].decode(): int(reply[i + 1]) for i in range(0, len(reply), 2)}
        return {f: (v, fields.get(f + "@", 0)) for f, v in fields.items() if not f.endswith("@")}

    async def index_journal_day(self, subject: str, day: int, keep: int) -> None:
        """Name `subject` in the journal index of `day` (before its journal is written)."""
        await self.run(_ADD, (key("journal-index", tag=str(day)),), (keep, subject))

    async def buckets_of(self, identifiers: Sequence[str], days: Iterable[int]) -> dict[str, str]:
        """`identifier → <customer>|<meter>|<hour>` of sent events (within `SENT_TTL`)."""
        found: dict[str, str] = {}
        for day in days:
            by_shard: dict[int, list[str]] = {}
            for identifier in identifiers:
                if identifier not in found:
                    by_shard.setdefault(_sent_shard(identifier), []).append(identifier)
            for shard, names in by_shard.items():
                values = await self.run(_HMGET, (_sent_key(shard, day),), [_sent_field(n) for n in names])
                found.update({n: v.decode() for n, v in zip(names, values, strict=True) if v is not None})
        return found

    async def refused(self, samples: Sequence[tuple[str, str]], days: Iterable[int]) -> int:
        """Tie Stripe's sample `(identifier, code)` pairs of refused events to the buckets they
        were sent in (`billingd:refused:{<day>}`, read by reconciliation); returns how many were
        found (a sample sent more than `SENT_TTL` ago, or not by billingd's outbox, is not)."""
        buckets = await self.buckets_of([identifier for identifier, _ in samples], days)
        found = 0
        for identifier, code in samples:
            bucket = buckets.get(identifier)
            if bucket is None:
                continue
            customer, rest = bucket.split("|", 1)
            meter, hour = rest.rsplit("|", 1)
            member = "\x1f".join((customer, meter, hour, identifier, code))
            await self.run(_ADD, (key("refused", tag=str(int(hour) * 3600 // 86400)),), (REFUSED_TTL, member))
            found += 1
        return found

    async def _remember_sent(self, events: Sequence[tuple[str, OutboxEvent]]) -> None:
        day = day_of(int(time.time()))
        by_shard: dict[int, list[str]] = {}
        for identifier, event in events:
            by_shard.setdefault(_sent_shard(identifier), []).extend((_sent_field(identifier), event.bucket))
        for shard, pairs in by_shard.items():
            await self.run(_SENT, (_sent_key(shard, day),), (SENT_TTL, *pairs))

    @staticmethod
    def _index(shard: int) -> str:
        return key("outbox-index", tag=f"o{shard}")


def _sent_field(identifier: str) -> str:
    """A compact name of an identifier in the sent index: 16 hex digits of its SHA-256 (a
    `bd1-` identifier's own), about 80 bytes an event with its bucket."""
    if identifier.startswith("bd1-") and len(identifier) >= 20:
        return identifier[4:20]
    return hashlib.sha256(identifier.encode()).hexdigest()[:16]


def _sent_shard(identifier: str) -> int:
    return zlib.crc32(identifier.encode()) % SENT_SHARDS


def _sent_key(shard: int, day: int) -> str:
    return key("sent", str(day), tag=f"h{shard}")
