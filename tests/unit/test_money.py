"""Money and quantities: Decimal in, integer units out, readable units back."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billingd.handlers.money import to_micros
from billingd.handlers.outcome import InvalidMessage
from billingd.handlers.usage import _units


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
