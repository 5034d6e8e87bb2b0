"""The Redis ledger: idempotent billing effects as Lua scripts, keys hash-tagged per subject."""

from billingd.clients.ledger.base import RedisLedger, key
from billingd.clients.ledger.once import OnceLedger
from billingd.clients.ledger.sms import CDR_RANK, FINAL_CDR_STATUSES, ChargeResult, SmsLedger
from billingd.clients.ledger.usage import MICROS, Applied, UsageLedger, UsageResult

__all__ = [
    "CDR_RANK",
    "FINAL_CDR_STATUSES",
    "MICROS",
    "Applied",
    "ChargeResult",
    "OnceLedger",
    "RedisLedger",
    "SmsLedger",
    "UsageLedger",
    "UsageResult",
    "key",
]
