"""Steps that must happen once across workers and replicas (a POST, a Stripe call).

A step is keyed `billingd:once:{scope}:<key>`. Before running it, a worker *claims* the key
with a lease (`SET NX PX`, holding a token of its own); after the step succeeds it marks the key
`done` for `ttl` seconds; if the step fails it releases the lease so a retry can claim again.

* `done` → the step already happened: skip it;
* held by another worker → `Busy`: retry later, uncounted (DESIGN §2 "lock busy");
* a crash while holding the lease → the lease expires and a retry runs the step again; the
  downstream's idempotency key (Stripe `Idempotency-Key`, the forwarded `Idempotency-Key`
  header) absorbs that last window.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import anyio

from billingd.clients.errors import Busy
from billingd.clients.ledger.base import RedisLedger, key
from billingd.clients.ledger.scripts import Script

_CLAIM = Script.of("""
local v = redis.call('GET', KEYS[1])
if v == 'done' then return 'done' end
if v then return 'busy' end
redis.call('SET', KEYS[1], 'pending:' .. ARGV[1], 'PX', ARGV[2])
return 'claimed'
""")
_COMPLETE_BODY = """
local v = redis.call('GET', KEYS[1])
if v == 'done' or (v and v ~= 'pending:' .. ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], 'done', 'EX', ARGV[2])
"""
_COMPLETE = Script.of(_COMPLETE_BODY + "return 1")
_RELEASE = Script.of("""
if redis.call('GET', KEYS[1]) == 'pending:' .. ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
""")
_STATE = Script.of("return redis.call('GET', KEYS[1])")


class OnceLedger(RedisLedger):
    """Claims, completions and releases of once-only steps (see module docstring)."""

    async def run_once(
        self,
        scope: str,
        name: str,
        step: Callable[[], Awaitable[object]],
        *,
        lease: float,
        ttl: int,
        also: tuple[Script, str, tuple[object, ...]] | None = None,
    ) -> bool:
        """Run `step` unless it is done; returns whether it ran now. `also` = `(script, key,
        args)` is applied in the same script that marks the step done, once (a key of the same
        hash tag as `scope`; the script's body sees it as `KEYS[2]` and `args` after `ARGV[2]`),
        e.g. journaling an event sent inline.

        Raises:
            Busy: another worker holds the lease on this step.
            Exception: whatever `step` raised (the lease is released first).
        """
        token = uuid.uuid4().hex
        k = key("once", name, tag=scope)
        state = (await self.run(_CLAIM, (k,), (token, int(lease * 1000)))).decode()
        if state == "done":
            return False
        if state == "busy":
            raise Busy(f"{name} is being done by another worker")
        try:
            await step()
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.run(_RELEASE, (k,), (token,))
            raise
        if also is None:
            await self.run(_COMPLETE, (k,), (token, ttl))
        else:
            script, other, args = also
            await self.run(script, (k, other), (token, ttl, *args))
        return True

    @staticmethod
    def completing(body: str) -> Script:
        """The script marking a step done and applying `body` with it (see `run_once`'s `also`)."""
        return Script.of(_COMPLETE_BODY + body + "\nreturn 1")

    async def done(self, scope: str, name: str) -> bool:
        """Whether step `name` of `scope` is marked done."""
        return bool(await self.run(_STATE, (key("once", name, tag=scope),), ()) == b"done")
