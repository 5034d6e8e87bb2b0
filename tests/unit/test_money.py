"""Money and quantities: Decimal in, integer units out, readable units back."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billingd.handlers.kit.money import MAX_UNITS, to_micros
from billingd.handlers.kit.outcome import InvalidMessage
from billingd.handlers.usage.usage import _units


@given(st.decimals(min_value=0, max_value=10**9, places=6, allow_nan=False, allow_infinity=False))
def test_micro_units_are_exact_and_read_back_without_exponents(amount):
    micros = to_micros(amount)
    assert Decimal(micros).scaleb(-6) == amount
    assert "E" not in _units(micros)
    assert Decimal(_units(micros)) == amount


def test_round_numbers_read_as_people_write_them():
    assert (_units(50_000_000), _units(2_500_000), _units(0), _units(10_000)) == ("50", "2.5", "0", "0.01")


@pytest.mark.parametrize("amount", ["0.0000001", "-1", "NaN", "Infinity"])
def test_what_does_not_fit_is_refused_not_rounded(amount):
    with pytest.raises(InvalidMessage):
        to_micros(Decimal(amount))


@pytest.mark.parametrize(
    ("amount", "reason"),
    [
        ("1e400", "above the limit"),
        ("1E+999999999", "above the limit"),
        ("1" + "0" * 5000, "above the limit"),
        ("1000000000.000001", "above the limit"),
        ("0." + "0" * 5000 + "1", "decimal places"),
        ("1e-999999999", "decimal places"),
        ("0.09000000000000001", "decimal places"),  # Jasmin's str(float) artefact, refused here
    ],
)
def test_absurd_amounts_are_refused_before_any_effect(amount, reason):
    with pytest.raises(InvalidMessage, match=reason) as refused:
        to_micros(Decimal(amount))
    assert len(refused.value.reason) < 200  # a 5,000-digit amount is not copied into the reason


def test_the_per_message_limit_itself_is_accepted():
    assert to_micros(MAX_UNITS) == 10**15
    assert to_micros(Decimal("1." + "0" * 5000)) == 1_000_000  # trailing zeros change nothing
