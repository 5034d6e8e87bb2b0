"""SMS charges and call detail records (seed 002) in Redis.

Keys (hash tag = the account `uid`, or the SMS `message_id` for a CDR):

* `billingd:sms:{uid}:charge:<bid>` — hash: `state` (confirmed | refunded | charged),
  `amount_micros`, `message_id`, `connector_id`, `esme_status`, `updated_ms`;
* `billingd:sms:{uid}:refunds` — integer micro-units refunded to the account (what the
  account is owed back; the api-gateway debited the charge before sending);
* `billingd:sms:{uid}:charged` — integer micro-units charged to the account by Jasmin's native
  bill requests (`bill_request.submit_sm_resp.<uid>`, billingd being the biller);
* `billingd:cdr:{message_id}` — hash: `status` (seed 002's CDR status), `rank`, `jasmin_status`,
  `pdu_type`, `smpp_msgid`, `dlr` (the DLR details as a JSON object), `updated_ms`.

Amounts are integer micro-units (1 unit = 1,000,000 micro-units): SMS prices are fractions of a
cent, so minor units would round them.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping

from billingd.clients.ledger.base import LEDGER_MAX, RedisLedger, key
from billingd.clients.ledger.scripts import Script

#: CDR statuses in precedence order. A CDR only ever moves up this order, so any arrival order
#: of DLRs ends in the same state, and a final status (rank ≥ 3) is never replaced by a pending
#: or submitted one. Among finals, the strongest evidence wins: a handset receipt (delivered).
CDR_RANK: Mapping[str, int] = {
    "retrying": 0,  # Jasmin's submit attempts so far ended in an error it retries (native receipts)
    "submitted": 1,
    "pending": 2,
    "failed": 3,
    "expired": 4,
    "rejected": 5,
    "delivered": 6,
}
FINAL_CDR_STATUSES = frozenset({"delivered", "expired", "failed", "rejected"})

_SETTLE_CHARGE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state then
  if state == ARGV[1] then return {0, state} end
  return {-1, state}
end
if ARGV[1] ~= 'confirmed' then
  local counted = tonumber(redis.call('GET', KEYS[2]) or '0') or LEDGER_MAX
  if tonumber(ARGV[2]) > LEDGER_MAX - counted then return {-2, tostring(counted)} end
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'amount_micros', ARGV[2], 'message_id', ARGV[3],
           'connector_id', ARGV[4], 'esme_status', ARGV[5], 'updated_ms', ARGV[6])
if tonumber(ARGV[7]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[7]) end
if ARGV[1] ~= 'confirmed' then
  redis.call('INCRBY', KEYS[2], ARGV[2])
end
return {1, ARGV[1]}
""".replace("LEDGER_MAX", str(LEDGER_MAX))

_RECORD_DLR = """
local current = tonumber(redis.call('HGET', KEYS[1], 'rank') or '-1')
if tonumber(ARGV[1]) <= current then return 0 end
redis.call('HSET', KEYS[1], 'rank', ARGV[1], 'status', ARGV[2], 'jasmin_status', ARGV[3],
           'pdu_type', ARGV[4], 'smpp_msgid', ARGV[5], 'dlr', ARGV[6], 'updated_ms', ARGV[7])
if tonumber(ARGV[8]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[8]) end
return 1
"""


class ChargeResult(enum.Enum):
    """What `settle_charge` did."""

    APPLIED = 1
    DUPLICATE = 0
    CONFLICT = -1
    OVERFLOW = -2
    """The refund would take the account's refund counter past `LEDGER_MAX`: nothing written."""


class SmsLedger(RedisLedger):
    """SMS charge confirmations, refunds and CDRs; every write is one idempotent Lua script."""

    _settle_charge = Script.of(_SETTLE_CHARGE)
    _record_dlr = Script.of(_RECORD_DLR)

    async def settle_charge(
        self,
        *,
        uid: str,
        bid: str,
        state: str,
        amount_micros: int,
        message_id: str,
        connector_id: str,
        esme_status: str,
        retention: int = 0,
    ) -> tuple[ChargeResult, str]:
        """Record bill `bid` of account `uid` as `confirmed`, `refunded` (adding `amount_micros` to
        the account's refunds) or `charged` (adding it to the account's charges).

        Exactly once per `(uid, bid)`: a repeat of the same state is `DUPLICATE`; a different
        state than the recorded one is `CONFLICT` and changes nothing; a refund that would take
        the account's refunds past `LEDGER_MAX` is `OVERFLOW` and changes nothing. Returns the
        result and the state now recorded (for `OVERFLOW`, the refunds so far, micro-units).
        The charge record expires `retention` seconds after it is written (0: kept); it is the
        bill's idempotency record, so it must outlive any redelivery or replay of the bill.
        """
        counter = "charged" if state == "charged" else "refunds"
        code, current = await self.run(
            self._settle_charge,
            (key("sms", "charge", bid, tag=uid), key("sms", counter, tag=uid)),
            (state, amount_micros, message_id, connector_id, esme_status, _now_ms(), retention),
        )
        return ChargeResult(int(code)), current.decode() if isinstance(current, bytes) else str(current)

    async def record_dlr(
        self,
        message_id: str,
        status: str,
        *,
        jasmin_status: str,
        pdu_type: str,
        smpp_msgid: str,
        details: bytes,
        retention: int = 0,
    ) -> bool:
        """Move CDR `message_id` to `status` unless it already holds a status of equal or higher
        precedence (`CDR_RANK`); `details` (JSON) and the Jasmin fields are stored with it. The
        CDR expires `retention` seconds after its last change (0: kept). Returns whether it changed."""
        args = (CDR_RANK[status], status, jasmin_status, pdu_type, smpp_msgid, details, _now_ms(), retention)
        return bool(await self.run(self._record_dlr, (key("cdr", tag=message_id),), args))

    async def charge(self, uid: str, bid: str) -> dict[str, str]:
        """The charge record of bill `bid` (empty when none)."""
        return await self.hgetall(key("sms", "charge", bid, tag=uid))

    async def refunds_micros(self, uid: str) -> int:
        """Micro-units refunded to account `uid` so far."""
        return await self.get_int(key("sms", "refunds", tag=uid))

    async def charged_micros(self, uid: str) -> int:
        """Micro-units charged to account `uid` by native bill requests so far."""
        return await self.get_int(key("sms", "charged", tag=uid))

    async def cdr(self, message_id: str) -> dict[str, str]:
        """The CDR of SMS `message_id` (empty when none)."""
        return await self.hgetall(key("cdr", tag=message_id))


def _now_ms() -> int:
    return int(time.time() * 1000)
