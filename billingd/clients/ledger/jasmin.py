"""What billingd keeps to follow Jasmin's native traffic (seed 002 with a real Jasmin) in Redis.

Keys (each script touches one hash slot):

* `billingd:submit:{msgid}` — hash, from the `submit.sm.<cid>` message of one submission: `uid`,
  `bid` (the SubmitSmBill's id), `early_micros` (the early share Jasmin charged at submit time,
  × parts), `resp_micros` (the rest, per part), `parts`, `connector`, `at`. First write wins;
* `billingd:smpp:{smpp_msgid}` — string: Jasmin's msgid for the SMSC's message id, from the
  `smpp_msgid` header of an `ESME_ROK` `dlr.submit_sm_resp` (a `dlr.deliver_sm` names only the
  SMSC's id);
* the CDR `billingd:cdr:{msgid}` (see `sms.py`) gains `attempts` (error receipts of `dlr.submit_sm_resp`)
  and `thrower_attempts` (the same from `dlr_thrower.*`), and `seen:<counter>:<delivery id>` and
  `seen:<counter>:<content digest>` per receipt counted (a redelivered copy is not counted again):
  Jasmin retries some submit errors (`submit_error_retrial`), publishing a receipt per attempt;
  an error is final once its attempts reach the retrial count, and only then is the CDR `failed`
  — a throttled attempt followed by `ESME_ROK` ends `submitted`.
"""

from __future__ import annotations

import enum
import time

from billingd.clients.ledger.base import RedisLedger, key
from billingd.clients.ledger.scripts import Script
from billingd.clients.ledger.sms import CDR_RANK

_RECORD_SUBMIT = Script.of("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'uid', ARGV[1], 'bid', ARGV[2], 'early_micros', ARGV[3], 'resp_micros', ARGV[4],
           'parts', ARGV[5], 'connector', ARGV[6], 'at', ARGV[7])
if tonumber(ARGV[8]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[8]) end
return 1
""")

# ARGV: jasmin status, ok (1/0), final_after (0 = final at once), smpp_msgid, now_ms, attempts field,
# retention seconds (0: kept), the delivery id, redelivered (1/0), the content digest, copied (1/0: a
# retry copy billingd published of this very delivery)
_SUBMIT_RESULT = Script.of(
    """
local rank = tonumber(redis.call('HGET', KEYS[1], 'rank') or '-1')
local function set(r, status)
  redis.call('HSET', KEYS[1], 'rank', r, 'status', status, 'jasmin_status', ARGV[1], 'pdu_type', 'submit_sm_resp',
             'updated_ms', ARGV[5])
end
local function result()
  local failed_by_submit = rank == FAILED and redis.call('HGET', KEYS[1], 'pdu_type') == 'submit_sm_resp'
  if ARGV[2] == '1' then
    if rank < SUBMITTED then
      set(SUBMITTED, 'submitted')
      redis.call('HSET', KEYS[1], 'smpp_msgid', ARGV[4])
      return {'submitted', 'submitted'}
    end
    if failed_by_submit then return {'conflict', redis.call('HGET', KEYS[1], 'attempts') or '0'} end
    return {'stale', redis.call('HGET', KEYS[1], 'status')}
  end
  local seen = 'seen:' .. ARGV[6] .. ':' .. ARGV[8]
  local same = 'seen:' .. ARGV[6] .. ':' .. ARGV[10]
  local known = ARGV[11] == '1' and seen or same  -- a broker's redelivery can be told only by its content
  if ARGV[9] == '1' and redis.call('HEXISTS', KEYS[1], known) == 1 then
    -- a copy of a receipt already counted (the broker's redelivery, billingd's retry): not an attempt
    local attempts = redis.call('HGET', KEYS[1], ARGV[6]) or '0'
    if failed_by_submit then return {'final', attempts} end
    if rank >= SUBMITTED then return {'stale', redis.call('HGET', KEYS[1], 'status')} end
    return {'retrying', attempts}
  end
  local attempts = redis.call('HINCRBY', KEYS[1], ARGV[6], 1)
  redis.call('HSET', KEYS[1], seen, 1, same, 1)
  if failed_by_submit then return {'final', tostring(attempts)} end
  if rank >= SUBMITTED then return {'stale', redis.call('HGET', KEYS[1], 'status')} end
  local after = tonumber(ARGV[3])
  if after == 0 or attempts >= after then
    set(FAILED, 'failed')
    return {'final', tostring(attempts)}
  end
  set(RETRYING, 'retrying')
  return {'retrying', tostring(attempts)}
end
local reply = result()
if tonumber(ARGV[7]) > 0 and redis.call('EXISTS', KEYS[1]) == 1 then redis.call('EXPIRE', KEYS[1], ARGV[7]) end
return reply
""".replace("SUBMITTED", str(CDR_RANK["submitted"]))
    .replace("FAILED", str(CDR_RANK["failed"]))
    .replace("RETRYING", str(CDR_RANK["retrying"]))
)


_MAP = Script.of("""
if tonumber(ARGV[2]) > 0 then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else redis.call('SET', KEYS[1], ARGV[1]) end
return 1
""")


class SubmitOutcome(enum.Enum):
    """What a `dlr.submit_sm_resp` (or a `dlr_thrower` ESME status) did to its CDR."""

    SUBMITTED = "submitted"
    RETRYING = "retrying"  # an error Jasmin will retry
    FINAL = "final"  # an error Jasmin gives up on: the submission failed (again, for a replay)
    STALE = "stale"  # the CDR is already past this receipt (submitted, delivered, …)
    CONFLICT = "conflict"  # ESME_ROK for a submission already counted as finally failed


class JasminLedger(RedisLedger):
    """Submit records, the SMSC id → msgid map, and submit results on the CDR."""

    async def record_submit(
        self,
        msgid: str,
        *,
        uid: str,
        bid: str,
        early_micros: int,
        resp_micros: int,
        parts: int,
        connector: str,
        retention: int = 0,
    ) -> bool:
        """Keep what one `submit.sm` says (first write wins) for `retention` seconds (0: kept);
        returns whether it was new."""
        args = (uid, bid, early_micros, resp_micros, parts, connector, int(time.time()), retention)
        return bool(await self.run(_RECORD_SUBMIT, (key("submit", tag=msgid),), args))

    async def submit(self, msgid: str) -> dict[str, str]:
        """The submit record of `msgid` (empty when none)."""
        return await self.hgetall(key("submit", tag=msgid))

    async def map_smpp(self, smpp_msgid: str, msgid: str, retention: int = 0) -> None:
        """Remember for `retention` seconds (0: kept) that the SMSC calls Jasmin's `msgid` `smpp_msgid`."""
        await self.run(_MAP, (key("smpp", tag=smpp_msgid),), (msgid, retention))

    async def msgid_for(self, smpp_msgid: str) -> str | None:
        """Jasmin's msgid for the SMSC's `smpp_msgid`, if billingd has seen its `ESME_ROK`."""
        return await self.get_str(key("smpp", tag=smpp_msgid))

    async def submit_result(
        self,
        msgid: str,
        status: str,
        *,
        final_after: int,
        smpp_msgid: str = "",
        counter: str = "attempts",
        retention: int = 0,
        copy: tuple[str, bool, str, bool] = ("", False, "", False),
    ) -> tuple[SubmitOutcome, str]:
        """Apply one submit attempt's result to the CDR of `msgid`.

        `ESME_ROK` makes it `submitted` (unless it is already past that; `CONFLICT` when it had
        failed by a submit error). An error counts an attempt in field `counter`; with
        `final_after` = 0 (an error Jasmin does not retry) or once the attempts reach
        `final_after`, the CDR is `failed` (`FINAL` — also for any later error receipt of a
        submission that failed, so that a refund interrupted by a crash is completed), else
        `retrying`. Returns the outcome and the CDR status (`STALE`) or attempts (the others).

        `copy` = `(delivery id, redelivered, content digest, copied)` of the receipt's message: a
        redelivered receipt already counted is not counted again — billingd's own retry copy by
        its delivery id (so a second attempt's receipt whose first handling failed still counts),
        a broker's redelivery by its content (two attempts with identical receipts cannot be told
        apart then: documented). Jasmin's own next attempt is a new publish and counts.
        """
        ok = "1" if status == "ESME_ROK" else "0"
        now = int(time.time() * 1000)
        delivery_id, redelivered, digest, copied = copy
        args = (status, ok, final_after, smpp_msgid, now, counter, retention, delivery_id or digest,
                "1" if redelivered else "0", digest, "1" if copied else "0")  # fmt: skip
        reply = await self.run(_SUBMIT_RESULT, (key("cdr", tag=msgid),), args)
        return SubmitOutcome(reply[0].decode()), (reply[1] or b"").decode()
