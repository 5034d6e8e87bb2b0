"""Money as integers: `Decimal` amounts from messages → integer minor or micro-units.

Never via float (DESIGN §5). An amount that does not fit the unit exactly is refused rather
than rounded: rounding money silently is how ledgers drift.
"""

from __future__ import annotations

from decimal import Decimal

from billingd.handlers.outcome import InvalidMessage


def to_units(amount: Decimal, decimals: int, what: str = "amount") -> int:
    """`amount` × 10**`decimals` as an int (6 → micro-units, 2 → cents).

    Raises:
        InvalidMessage: `amount` is negative, not finite, or has more than `decimals` places.
    """
    if not amount.is_finite() or amount < 0:
        raise InvalidMessage(f"{what} must be a non-negative number, got {amount}")
    scaled = amount.scaleb(decimals)
    if scaled != scaled.to_integral_value():
        raise InvalidMessage(f"{what} {amount} has more than {decimals} decimal places")
    return int(scaled)


def to_micros(amount: Decimal, what: str = "amount") -> int:
    """`amount` in micro-units (1 = 0.000001 of the currency unit). See `to_units`."""
    return to_units(amount, 6, what)
