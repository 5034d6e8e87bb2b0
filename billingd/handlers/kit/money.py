"""Money as integers: `Decimal` amounts from messages → integer minor or micro-units, bounded.

Never via float (DESIGN §5). An amount that does not fit the unit exactly is refused rather
than rounded: rounding money silently is how ledgers drift. Every amount is checked against
documented limits *before* any effect (DESIGN §8):

* one message moves at most `MAX_UNITS` currency units (10⁹: far above any SMS price, usage
  quantity or invoice, and small enough that a counter can take 9,000 of them);
* integer minor units from Stripe and Razorpay envelopes are at most `MAX_MINOR_UNITS` (10¹²;
  Stripe itself takes at most 8 digits for most currencies);
* a ledger counter never exceeds `billingd.clients.ledger.base.LEDGER_MAX` micro-units (2⁵³ − 1, about 9 × 10⁹ units):
  the Lua scripts compare amounts as IEEE doubles, which are exact only up to 2⁵³, and Redis
  integers stop at 2⁶³. The scripts refuse an increment that would pass it (the ledger's
  `OVERFLOW` results), and the handler dead-letters that message alone.
"""

from __future__ import annotations

from decimal import (
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DecimalException,
    Inexact,
    InvalidOperation,
    Overflow,
    localcontext,
)

from billingd.handlers.kit.outcome import InvalidMessage

#: Most currency units one message may carry.
MAX_UNITS = Decimal(10**9)
#: Most integer minor units (cents, paise) a payment envelope may carry.
MAX_MINOR_UNITS = 10**12

#: Exact arithmetic: enough digits for MAX_UNITS at micro-unit precision and far beyond; any
#: rounding of a non-zero digit raises instead of happening silently.
_EXACT = Context(prec=60, Emax=10**6, Emin=-(10**6), traps=[Inexact, InvalidOperation, Overflow])
#: The same, for the one documented rounding (`to_micros_rounded`): rounding allowed, nothing else.
_ROUNDING = Context(prec=60, Emax=10**6, Emin=-(10**6), traps=[InvalidOperation, Overflow])


def to_units(amount: Decimal, decimals: int, what: str = "amount") -> int:
    """`amount` × 10**`decimals` as an int (6 → micro-units, 2 → cents).

    Raises:
        InvalidMessage: `amount` is negative, not finite, above `MAX_UNITS`, or has more than
            `decimals` decimal places.
    """
    if not amount.is_finite() or amount < 0:
        raise InvalidMessage(f"{what} must be a non-negative number, got {_show(amount)}")
    if amount > MAX_UNITS:
        raise InvalidMessage(f"{what} {_show(amount)} is above the limit of {MAX_UNITS} per message")
    try:
        with localcontext(_EXACT):
            scaled = amount.scaleb(decimals)
            integral = scaled.to_integral_value()
    except DecimalException:
        raise InvalidMessage(f"{what} {_show(amount)} has more than {decimals} decimal places") from None
    if scaled != integral:
        raise InvalidMessage(f"{what} {_show(amount)} has more than {decimals} decimal places")
    return int(integral)


def to_micros(amount: Decimal, what: str = "amount") -> int:
    """`amount` in micro-units (1 = 0.000001 of the currency unit). See `to_units`."""
    return to_units(amount, 6, what)


#: One micro-unit, the ledger's precision.
MICRO = Decimal("0.000001")


def to_micros_rounded(amount: Decimal, what: str = "amount") -> int:
    """`amount` in micro-units, rounded half-even at the ledger's precision (6 decimals).

    For producers that publish `str(float)` — Jasmin's `amount` header is `"0.0135"` or
    `"0.09000000000000001"` — the digits past the sixth decimal are float noise, not money:
    `0.09000000000000001` → 90000, `0.0000005` → 0, `0.0000015` → 2 (half-even). The rounding
    happens once, on the Decimal read from the message; stored values are integers.

    Raises:
        InvalidMessage: negative, not finite, or above `MAX_UNITS`.
    """
    if not amount.is_finite() or amount < 0:
        raise InvalidMessage(f"{what} must be a non-negative number, got {_show(amount)}")
    if amount > MAX_UNITS:
        raise InvalidMessage(f"{what} {_show(amount)} is above the limit of {MAX_UNITS} per message")
    with localcontext(_ROUNDING):
        rounded = amount.quantize(MICRO, rounding=ROUND_HALF_EVEN)
    return int(rounded.scaleb(6))


def _show(amount: Decimal) -> str:
    """An amount for a dead-letter reason, shortened when it is absurdly long."""
    text = str(amount)
    return text if len(text) <= 40 else f"{text[:20]}…({len(text)} characters)"
