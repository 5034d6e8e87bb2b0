"""Properties of the seed-002 handlers on real Redis, explored with hypothesis."""

from __future__ import annotations

import itertools
import uuid

import anyio
import msgspec
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billingd.clients import Unguarded
from billingd.clients.ledger import CDR_RANK, FINAL_CDR_STATUSES, SmsLedger
from billingd.clients.ledger.jasmin import JasminLedger
from billingd.handlers.kit.outcome import ACK, InvalidMessage
from billingd.handlers.sms.sms_billing import SmsBillingHandler
from billingd.handlers.sms.sms_dlr import SmsDlrHandler
from billingd.sources.base import Delivery
from tests.seed002 import STATUS_TABLE, dlr
from tests.support import REDIS_URL

_ids = itertools.count()
_RUN = uuid.uuid4().hex[:8]  # Redis keeps keys between sessions: ids of this session only


def delivery(body: bytes | dict) -> Delivery:
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return Delivery(data, f"d-{_RUN}-{next(_ids)}", 1, {}, None)


def run_with_ledger(test):
    """Run `test(ledger)` in a fresh event loop against the test Redis."""

    async def main():
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            await test(SmsLedger(client, Unguarded("redis")))
        finally:
            await client.aclose()

    anyio.run(main, backend="asyncio")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(sorted(STATUS_TABLE)), min_size=1, max_size=8))
def test_out_of_order_dlrs_never_regress_a_final_status(statuses):
    message_id = f"ooo-{_RUN}-{next(_ids)}"

    async def check(ledger: SmsLedger) -> None:
        handler = SmsDlrHandler(ledger)
        seen_final = False
        for status in statuses:
            assert await handler.handle(delivery(dlr(message_id, status))) is ACK
            cdr = (await ledger.cdr(message_id))["status"]
            seen_final |= STATUS_TABLE[status] in FINAL_CDR_STATUSES
            if seen_final:
                assert cdr in FINAL_CDR_STATUSES
        # every ordering of the same receipts ends in the same state: the highest precedence
        expected = max((STATUS_TABLE[s] for s in statuses), key=CDR_RANK.__getitem__)
        assert (await ledger.cdr(message_id))["status"] == expected

    run_with_ledger(check)


@settings(max_examples=40, deadline=None)
@given(st.permutations(["ACCEPTD", "DELIVRD", "ESME_ROK", "ACCEPTD", "DELIVRD"]))
def test_every_permutation_of_a_delivery_ends_delivered(order):
    message_id = f"perm-{_RUN}-{next(_ids)}"

    async def check(ledger: SmsLedger) -> None:
        handler = SmsDlrHandler(ledger)
        for status in order:
            await handler.handle(delivery(dlr(message_id, status)))
        assert (await ledger.cdr(message_id))["status"] == "delivered"

    run_with_ledger(check)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
bill_like = st.fixed_dictionaries(
    {},
    optional={
        "bid": st.text(max_size=5) | st.integers(),
        "user": st.fixed_dictionaries({}, optional={"uid": st.text(max_size=5) | st.none()}),
        "amounts": st.fixed_dictionaries(
            {}, optional={"submit_sm_resp": st.decimals(allow_nan=True).map(str) | st.floats() | st.text(max_size=4)}
        ),
        "status": st.sampled_from(["ESME_ROK", "ESME_RX", "DELIVRD", ""]) | st.text(max_size=6),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=64), json_values.map(msgspec.json.encode), bill_like.map(msgspec.json.encode)))
def test_any_body_is_applied_or_refused_with_a_reason(body):
    async def check(ledger: SmsLedger) -> None:
        for handler in (
            SmsBillingHandler(ledger, JasminLedger(ledger.redis, Unguarded("redis"))),
            SmsDlrHandler(ledger),
        ):
            try:
                outcome = await handler.handle(delivery(body))
            except InvalidMessage as exc:
                assert exc.reason
            else:
                assert outcome is ACK or outcome.reason

    run_with_ledger(check)


header_values = st.one_of(
    st.text(max_size=12), st.binary(max_size=12), st.integers(), st.none(), st.sampled_from(["0.0135", "ESME_ROK"])
)
native_headers = st.dictionaries(
    st.sampled_from(["user-id", "amount", "type", "smpp_msgid", "message_status", "submit_sm_bill", "dlr_stat", "cid"]),
    header_values | st.sampled_from(["submit_sm_resp", "deliver_sm", "1e400", "NaN", "-1", "9" * 300]),
    max_size=6,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(native_headers, st.binary(max_size=40) | st.sampled_from([b"ESME_ROK", b"DELIVRD", b"\x80\x02."]))
def test_any_native_looking_message_is_applied_or_refused_with_a_reason(headers, body):
    """Headers of any type where Jasmin's go: a bill, a submit, a receipt, or a reasoned refusal."""

    async def check(ledger: SmsLedger) -> None:
        from billingd.handlers.kit.base import HandlerContext
        from billingd.handlers.sms.sms_dlr import DlrOptions, _build
        from billingd.telemetry import Metrics
        from tests.support import amqp_source, make_settings

        submits = JasminLedger(ledger.redis, Unguarded("redis"))
        clients = _FakeClients(ledger, submits)
        settings = make_settings([amqp_source("sms_dlr")])
        context = HandlerContext(settings.sources[0], clients, settings.stripe, settings.razorpay, Metrics("test"))
        for handler in (SmsBillingHandler(ledger, submits), _build(context, DlrOptions())):
            message = Delivery(body, f"n-{_RUN}-{next(_ids)}", 1, headers, None)
            try:
                outcome = await handler.handle(message)
            except InvalidMessage as exc:
                assert exc.reason
            else:
                assert outcome is ACK or outcome.reason

    run_with_ledger(check)


class _FakeClients:
    """The two ledgers: what `sms_dlr`'s build takes from `Clients`."""

    def __init__(self, sms: SmsLedger, submits: JasminLedger) -> None:
        self.sms_ledger, self.jasmin_ledger = sms, submits
