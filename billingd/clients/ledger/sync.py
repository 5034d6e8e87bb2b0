"""Organization billing status and marketplace submissions (seed 000) in Redis.

* `billingd:org:{organization_id}` — hash: `billing` (the last `billing_customer_update`
  message, JSON), `updated_at` (its own timestamp when it has one), `updated_ms`.

Marketplace submissions are once-only steps of the `OnceLedger` (`billingd:once:{org}:submit:<key>`).
"""

from __future__ import annotations

import time

from billingd.clients.ledger.base import RedisLedger, key
from billingd.clients.ledger.scripts import Script

_STORE = Script.of("""
local given = tonumber(ARGV[2])
local stored = tonumber(redis.call('HGET', KEYS[1], 'updated_at') or '0')
if given > 0 and given < stored then return 0 end
redis.call('HSET', KEYS[1], 'billing', ARGV[1], 'updated_at', ARGV[2], 'updated_ms', ARGV[3])
return 1
""")


class SyncLedger(RedisLedger):
    """Billing status per organization."""

    async def store_billing(self, organization: str, billing: bytes, updated_at: int = 0) -> bool:
        """Store `billing` (JSON) unless a newer update (by `updated_at`, Unix seconds) is stored."""
        args = (billing, updated_at, int(time.time() * 1000))
        return bool(await self.run(_STORE, (key("org", tag=organization),), args))

    async def billing(self, organization: str) -> dict[str, str]:
        """The stored billing status of `organization` (empty when none)."""
        return await self.hgetall(key("org", tag=organization))
