"""Limits shared by every replica through Redis: request budgets (GCRA) and short leases.

**Budgets** — a request budget of `rate` requests per second for one Stripe account, whatever
the number of replicas, is the generic cell rate algorithm (GCRA, ATM Forum TM 4.0; the
"leaky bucket as a meter") in one Lua script on one key: the key holds the *theoretical arrival
time* (TAT, µs on Redis's own clock, so replicas need no clock agreement); a caller reserves the
next slot — `max(TAT, now)` — and the TAT moves one interval (`1/rate` s) on. The caller is
told how long to wait for its slot (0 when it is free now) and sleeps that long: requests wait
their turn instead of failing, in arrival order, with no polling. A slot further away than the
caller's `max_wait` is not reserved (the caller gives up, `Throttled`). There is no burst
allowance, and slots are spaced `SPACING_MARGIN` wider than `1/rate`: a request that wakes late
(a busy event loop, a slow network) then cannot bunch up with the next one into more than
`rate` requests in any one second at the downstream.

**Leases** — `SET NX PX` with a token of the holder's own, released only by that holder: at most
one holder across replicas for as long as the lease runs (v1 meter events allow one concurrent
call per customer and meter).

Keys carry a hash tag (`{account}`, `{customer}`): each script touches one slot (Redis Cluster).
"""

from __future__ import annotations

import uuid

import anyio

from billingd.clients.errors import Throttled
from billingd.clients.ledger.base import RedisLedger, key
from billingd.clients.ledger.scripts import Script

_RESERVE = Script.of("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - now
if wait > tonumber(ARGV[2]) then return -math.floor(wait) - 1 end
local interval = tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%.0f', tat + interval), 'PX', math.floor((wait + interval) / 1000) + 1000)
return math.floor(wait)
""")
_LEASE = Script.of("""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
""")
_UNLEASE = Script.of("""
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
""")

#: How much wider than `1/rate` budget slots are spaced (absorbs up to ~5 % of a second of
#: lateness per request; measured: a busy 2-core machine wakes sleepers up to ~40 ms late).
SPACING_MARGIN = 1.05
#: How often a caller asks again for a lease another replica holds (seconds).
LEASE_POLL = 0.01


class SharedLimits(RedisLedger):
    """Budgets and leases in Redis (see module docstring). Errors: as `RedisLedger`."""

    async def reserve(self, account: str, bucket: str, rate: float, max_wait: float) -> float:
        """Reserve the next slot of budget `bucket` of `account` (`rate` requests/s) and return
        the seconds to wait for it (0.0: now).

        Raises:
            Throttled: the slot is more than `max_wait` seconds away (nothing reserved).
        """
        interval = max(1, round(1_000_000 * SPACING_MARGIN / rate))
        wait = int(
            await self.run(_RESERVE, (key("budget", bucket, tag=account),), (interval, int(max_wait * 1_000_000)))
        )
        if wait < 0:
            behind = (-wait - 1) / 1_000_000
            raise Throttled(
                "stripe",
                f"request budget {bucket} ({rate:g}/s for all replicas) is {behind:.1f}s behind, over max_wait",
                retry_after=min(behind, 60.0),
            )
        return wait / 1_000_000

    async def lease(self, scope: str, name: str, ttl: float, max_wait: float) -> str:
        """Hold lease `name` of `scope` for at most `ttl` seconds; wait up to `max_wait` for it.
        Returns the token to `unlease` with.

        Raises:
            Throttled: another holder kept it past `max_wait`.
        """
        token = uuid.uuid4().hex
        k = key("lease", name, tag=scope)
        with anyio.move_on_after(max_wait):
            # held by another replica: there is no event to await, so ask again shortly
            while not await self.run(_LEASE, (k,), (token, max(1, int(ttl * 1000)))):  # noqa: ASYNC110
                await anyio.sleep(LEASE_POLL)
            return token
        raise Throttled("stripe", f"{name} of {scope} stayed busy for {max_wait:g}s", retry_after=1.0)

    async def unlease(self, scope: str, name: str, token: str) -> None:
        """Give lease `name` of `scope` back (a no-op when `token` no longer holds it)."""
        await self.run(_UNLEASE, (key("lease", name, tag=scope),), (token,))
