"""A real Jasmin's traffic, replayed unchanged (`tests/fixtures/jasmin-0.11.1`), on real RabbitMQ
and Redis: charges, refunds and CDRs as the capture says happened; nothing Jasmin sent in good
faith dead-lettered; a second replay changes nothing; exchanges declared the way Jasmin does."""

from __future__ import annotations

import collections
import os
import pickle
from typing import Any

import aiormq
import anyio
import pytest

from billingd.clients import Unguarded
from billingd.clients.ledger import SmsLedger
from billingd.clients.ledger.jasmin import JasminLedger
from billingd.handlers.sms.jasmin_pickle import read_pickle
from tests.jasmin_capture import STOCK, Captured, declare_like_jasmin, load, micros, properties, replay
from tests.support import AMQP_URL, amqp_source, http_get, make_settings, running, scrape, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]

#: The captured Jasmin retried ESME_RTHROTTLED twice (5 s apart): its submit_error_retrial count is 2.
RETRIAL = {"ESME_RTHROTTLED": 2}
STATE = {"DELIVRD": "delivered", "UNDELIV": "failed", "EXPIRED": "expired", "REJECTD": "rejected", "ACCEPTD": "pending"}
RANK = ["pending", "failed", "expired", "rejected", "delivered"]


def _sources(amqp, billing: str, messaging: str, **dlr_options: Any) -> list[dict[str, Any]]:
    jasmin = {"exchange_declare": "transient", "prefetch": 20}
    return [
        amqp.track(
            amqp_source("sms_billing", exchange=billing, routing_keys=["bill_request.submit_sm_resp.#"], **jasmin)
        ),
        amqp.track(amqp_source("sms_billing", exchange=messaging, routing_keys=["submit.sm.*"], **jasmin)),
        amqp.track(
            amqp_source(
                "sms_dlr",
                exchange=messaging,
                routing_keys=["dlr.#"],
                partition_by="message_id",
                handler_options={"submit_error_retrial": RETRIAL, **dlr_options},
                **jasmin,
            )
        ),
    ]


def _expected(messages: list[Captured]) -> dict[str, Any]:
    """What the capture says happened, read independently of billingd's code."""
    charged = sum(micros(m.header("amount")) for m in messages if m.routing_key.startswith("bill_request."))
    smpp, cdr, parts, ok = {}, {}, {}, set()
    for m in messages:
        if m.routing_key.startswith("submit.sm.") and m.header("submit_sm_bill"):
            pdu, n = read_pickle(m.body), 1
            while pdu.get("nextPdu") is not None:
                pdu, n = pdu.get("nextPdu"), n + 1
            parts[m.message_id] = n
        elif m.routing_key == "dlr.submit_sm_resp":
            if m.body == b"ESME_ROK":
                ok.add(m.message_id)
                smpp[m.header("smpp_msgid")] = m.message_id
                cdr.setdefault(m.message_id, "submitted")
            else:
                cdr.setdefault(m.message_id, "failed")
        elif m.routing_key == "dlr.deliver_sm":
            msgid, state = smpp[m.message_id], STATE[m.body.decode()]
            if cdr[msgid] == "submitted" or RANK.index(state) > RANK.index(cdr[msgid]):
                cdr[msgid] = state
    failed = [msgid for msgid in cdr if msgid not in ok]
    refunds = sum(micros(0.0015 * parts[msgid]) for msgid in failed)
    return {"charged": charged, "cdr": cdr, "failed": failed, "refunds": refunds}


async def _publish(messages: list[Captured], exchanges: dict[str, str]) -> None:
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await replay(channel, messages, exchanges)
    finally:
        await connection.close()


def _settled(daemon, sources: list[dict[str, Any]], counts: list[int]) -> bool:
    processed = daemon.metrics.processed
    return all(
        sum(processed.labels(s["name"], o)._value.get() for o in ("ack", "dead_letter")) >= n
        for s, n in zip(sources, counts, strict=True)
    )


async def test_the_whole_capture_is_billed_refunded_and_recorded_as_it_happened_and_twice_changes_nothing(amqp, redis):
    messages = load()
    expected = _expected(messages)
    billing, messaging = unique("jasmin-billing"), unique("jasmin-messaging")
    amqp._exchanges += [billing, messaging]
    connection = await aiormq.connect(AMQP_URL)
    await declare_like_jasmin(await connection.channel(), billing, messaging)  # Jasmin first
    await connection.close()
    sources = _sources(amqp, billing, messaging)
    counts = [
        sum(m.routing_key.startswith("bill_request.") for m in messages),
        sum(m.routing_key.startswith("submit.sm.") and m.routing_key.count(".") == 2 for m in messages),
        sum(m.routing_key.startswith("dlr.") for m in messages),
    ]
    sms, submit_ledger = SmsLedger(redis, Unguarded("redis")), JasminLedger(redis, Unguarded("redis"))
    exchanges = {"billing": billing, "messaging": messaging}
    async with running(make_settings(sources)) as daemon:
        for replay_round in (1, 2):
            await _publish(messages, exchanges)
            await wait_for(
                lambda r=replay_round: _settled(daemon, sources, [n * r for n in counts]),
                timeout=60,
                what=f"replay {replay_round} settled",
            )
            dead = {s["name"]: daemon.metrics.processed.labels(s["name"], "dead_letter")._value.get() for s in sources}
            assert dead == {s["name"]: 0 for s in sources}, dead
            assert await sms.charged_micros("billuser01") == expected["charged"] == 486_000
            assert await sms.refunds_micros("billuser01") == expected["refunds"]
            for msgid, status in expected["cdr"].items():
                assert (await sms.cdr(msgid))["status"] == status, msgid
            for msgid in expected["failed"]:
                bid = (await submit_ledger.submit(msgid))["bid"]
                assert (await sms.charge("billuser01", bid))["state"] == "refunded"
    statuses = collections.Counter(expected["cdr"].values())
    print(f"capture: {len(messages)} messages, CDRs {dict(statuses)}, refunds {expected['refunds']} micro-units")
    assert statuses == {"delivered": 19, "failed": 18, "expired": 4, "rejected": 4}  # 13 of the failed: submits
    assert expected["refunds"] == 24_000  # 16 parts of 13 finally failed submissions × 0.0015


async def test_billingd_declaring_first_then_jasmin_both_keep_working_and_durable_is_refused_clearly(amqp, redis):
    messages = [m for m in load() if m.routing_key.startswith("bill_request.")][:3]
    billing, messaging = unique("jasmin-billing"), unique("jasmin-messaging")
    amqp._exchanges += [billing, messaging]
    sources = _sources(amqp, billing, messaging)
    async with running(make_settings(sources)) as daemon:  # billingd first: ready means declared
        connection = await aiormq.connect(AMQP_URL)
        await declare_like_jasmin(await connection.channel(), billing, messaging)  # then Jasmin: no error
        await connection.close()
        await _publish(messages, {"billing": billing, "messaging": messaging})
        acked = daemon.metrics.processed.labels(sources[0]["name"], "ack")
        await wait_for(lambda: acked._value.get() == 3, what="bills charged")
    assert await SmsLedger(redis, Unguarded("redis")).charged_micros("billuser01") == 3 * 13_500
    durable = amqp.track(amqp_source("sms_billing", exchange=billing, routing_keys=["bill_request.#"]))
    async with running(make_settings([durable]), wait_ready=False) as daemon:
        status = daemon.statuses[durable["name"]]
        await wait_for(lambda: "misconfigured" in status.reason, what="durable declaration refused")
        http_status, body = await http_get(daemon.settings.http.port, "/readyz")
    assert http_status == 503
    reason = body["sources"][durable["name"]]["reason"]
    assert "durable" in reason
    assert 'exchange_declare = "transient"' in reason


async def test_a_transient_exchange_lost_with_the_broker_comes_back_with_its_binding(amqp, redis):
    """A RabbitMQ restart drops non-durable exchanges (and their bindings): billingd declares
    its exchange again and rebinds when it reconnects, whoever declares first."""
    billing, messaging = unique("jasmin-billing"), unique("jasmin-messaging")
    amqp._exchanges += [billing, messaging]
    sources = _sources(amqp, billing, messaging)
    bill = [m for m in load() if m.routing_key.startswith("bill_request.")][:2]
    async with running(make_settings(sources)) as daemon:
        channel = await amqp.connection.channel()
        await channel.exchange_delete(billing)  # what a broker restart does to a transient exchange
        await channel.close()
        from tests.support import rabbitmqctl

        await rabbitmqctl("close_all_connections", "billingd test: broker restart")
        await wait_for(lambda: daemon.readiness()[0], timeout=30, what="reconnected")
        connection = await aiormq.connect(AMQP_URL)
        await declare_like_jasmin(await connection.channel(), billing)  # Jasmin redeclares too
        await connection.close()
        await _publish(bill, {"billing": billing})
        acked = daemon.metrics.processed.labels(sources[0]["name"], "ack")
        await wait_for(lambda: acked._value.get() == 2, timeout=20, what="bills after the restart")


async def test_a_passive_exchange_is_waited_for_then_bound(amqp):
    exchange = unique("jasmin-billing")
    amqp._exchanges.append(exchange)
    source = amqp.track(
        amqp_source("sms_billing", exchange=exchange, exchange_declare="passive", routing_keys=["bill_request.#"])
    )
    bill = [m for m in load() if m.routing_key.startswith("bill_request.")][:1]
    settings = make_settings([source], supervisor={"backoff_initial": "50ms", "backoff_max": "300ms"})
    async with running(settings, wait_ready=False) as daemon:
        status = daemon.statuses[source["name"]]
        await wait_for(lambda: "waiting for exchange" in status.reason, what="waiting reported")
        connection = await aiormq.connect(AMQP_URL)
        await declare_like_jasmin(await connection.channel(), exchange)
        await wait_for(lambda: status.up, timeout=10, what="bound once it exists")
        await _publish_on(connection, bill, exchange)
        await connection.close()
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 1, what="bill charged")


async def _publish_on(connection: aiormq.abc.AbstractConnection, messages: list[Captured], exchange: str) -> None:
    channel = await connection.channel(publisher_confirms=True)
    await replay(channel, messages, {"billing": exchange, "messaging": exchange})


class _Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


async def test_a_pickle_naming_os_system_is_dead_lettered_and_nothing_runs(amqp, tmp_path):
    messaging = unique("jasmin-messaging")
    amqp._exchanges.append(messaging)
    source = amqp.track(
        amqp_source("sms_billing", exchange=messaging, exchange_declare="transient", routing_keys=["submit.sm.*"])
    )
    marker = tmp_path / "pwned"
    genuine = next(m for m in load() if m.routing_key == "submit.sm.fakesmsc")
    evil = Captured(
        0,
        "messaging",
        genuine.routing_key,
        "evil-1",
        {**genuine.headers, "submit_sm_bill": ("S", pickle.dumps(_Exploit(str(marker)), protocol=2))},
        genuine.body,
    )
    async with running(make_settings([source])) as daemon:
        connection = await aiormq.connect(AMQP_URL)
        channel = await connection.channel(publisher_confirms=True)
        await channel.basic_publish(
            evil.body, exchange=messaging, routing_key=evil.routing_key, properties=properties(evil)
        )
        await connection.close()
        dead = daemon.metrics.processed.labels(source["name"], "dead_letter")
        await wait_for(lambda: dead._value.get() == 1, what="dead-lettered")
    [letter] = await amqp.drain_queue(f"{source['queue']}.dlq")
    assert "posix.system" in letter.headers["x-billingd-reason"] or "os.system" in letter.headers["x-billingd-reason"]
    assert "allow-list" in letter.headers["x-billingd-reason"]
    await anyio.sleep(0.2)
    assert not marker.exists()


async def test_a_stock_jasmin_without_submit_receipts_dead_letters_its_receipts_visibly(amqp, redis):
    messages = load(STOCK)
    billing, messaging = unique("jasmin-billing"), unique("jasmin-messaging")
    amqp._exchanges += [billing, messaging]
    sources = _sources(amqp, billing, messaging)
    for s in sources:
        s.update(max_attempts=2, retry_initial="50ms", retry_max="100ms")
    receipts = sum(m.routing_key == "dlr.deliver_sm" for m in messages)
    async with running(make_settings(sources)) as daemon:
        await _publish(messages, {"billing": billing, "messaging": messaging})
        dead = daemon.metrics.processed.labels(sources[2]["name"], "dead_letter")
        await wait_for(lambda: dead._value.get() == receipts, timeout=30, what="receipts dead-lettered")
        samples = await scrape(daemon.settings.http.port)
    assert samples[("billingd_sms_receipts_unmapped_total", (("source", sources[2]["name"]),))] == receipts
    letters = await amqp.drain_queue(f"{sources[2]['queue']}.dlq")
    assert len(letters) == receipts
    assert all("smpp_msgid map" in m.headers["x-billingd-reason"] for m in letters)
    assert daemon.metrics.processed.labels(sources[1]["name"], "dead_letter")._value.get() == 0  # submits kept


async def test_dlr_thrower_receipts_alone_keep_cdrs_too(amqp, redis):
    """An operator may bind `dlr_thrower.#` instead of `dlr.#`: Jasmin's resolved receipts, by msgid."""
    messages = [m for m in load() if m.routing_key.startswith(("dlr_thrower.", "submit.sm."))]
    messaging = unique("jasmin-messaging")
    amqp._exchanges.append(messaging)
    source = amqp.track(
        amqp_source(
            "sms_dlr",
            exchange=messaging,
            exchange_declare="transient",
            routing_keys=["dlr_thrower.#"],
            handler_options={"submit_error_retrial": RETRIAL},
        )
    )
    thrown = [m for m in messages if m.routing_key.startswith("dlr_thrower.")]
    expected: dict[str, str] = {}
    order = ["retrying", "submitted", "pending", "failed", "expired", "rejected", "delivered"]
    for m in thrown:
        status = m.header("message_status")
        state = {"ESME_ROK": "submitted", "ESME_RTHROTTLED": "retrying"}.get(status) or STATE.get(status, "failed")
        if order.index(state) > order.index(expected.get(m.message_id, "retrying")):
            expected[m.message_id] = state
        expected.setdefault(m.message_id, state)
    submits = amqp.track(
        amqp_source("sms_billing", exchange=messaging, exchange_declare="transient", routing_keys=["submit.sm.*"])
    )
    async with running(make_settings([source, submits])) as daemon:
        await _publish(messages, {"messaging": messaging})
        processed = daemon.metrics.processed
        await wait_for(lambda: processed.labels(source["name"], "ack")._value.get() == len(thrown), what="settled")
        assert processed.labels(source["name"], "dead_letter")._value.get() == 0
    sms = SmsLedger(redis, Unguarded("redis"))
    for msgid, status in expected.items():
        assert (await sms.cdr(msgid))["status"] == status, msgid
    assert set(expected.values()) >= {"delivered", "failed", "submitted", "retrying"}


async def test_a_redelivered_submit_error_receipt_is_not_a_second_attempt(amqp, redis):
    """Issue 24, item 10. A throttled submission (`submit_error_retrial` 2): its receipt comes back
    once more (billingd's retry copy of it), then Jasmin's own next attempt succeeds. Before: the
    copy counted as the second attempt — the early share was refunded while Jasmin still retried,
    and its `ESME_ROK` was dead-lettered as a conflict."""
    import dataclasses

    messages = load()
    msgid = next(
        m.message_id for m in messages if m.routing_key == "dlr.submit_sm_resp" and m.body == b"ESME_RTHROTTLED"
    )
    submit = next(m for m in messages if m.routing_key.startswith("submit.sm.") and m.message_id == msgid)
    throttled = next(m for m in messages if m.routing_key == "dlr.submit_sm_resp" and m.message_id == msgid)
    copy = dataclasses.replace(throttled, headers={**throttled.headers, "x-billingd-attempts": ("I", 1)})
    ok = dataclasses.replace(throttled, body=b"ESME_ROK", headers={**throttled.headers, "smpp_msgid": ("S", "SMSC-1")})
    billing, messaging = unique("jasmin-billing"), unique("jasmin-messaging")
    amqp._exchanges += [billing, messaging]
    sources = _sources(amqp, billing, messaging)
    sms = SmsLedger(redis, Unguarded("redis"))
    exchanges = {"billing": billing, "messaging": messaging}
    async with running(make_settings(sources)) as daemon:
        dlr_acked = daemon.metrics.processed.labels(sources[2]["name"], "ack")
        await _publish([submit, throttled, copy], exchanges)
        await wait_for(lambda: dlr_acked._value.get() == 2, what="the receipt and its copy")
        assert (await sms.cdr(msgid))["status"] == "retrying"  # one attempt: Jasmin retries
        assert await sms.refunds_micros("billuser01") == 0
        await _publish([ok], exchanges)
        await wait_for(lambda: dlr_acked._value.get() == 3, what="the successful attempt")
        assert daemon.metrics.processed.labels(sources[2]["name"], "dead_letter")._value.get() == 0
    assert (await sms.cdr(msgid))["status"] == "submitted"
    assert await sms.refunds_micros("billuser01") == 0


async def test_a_second_identical_receipt_retried_by_billingd_still_counts(amqp, redis):
    """The review of issue 24: Jasmin's two error receipts of one submission are identical. If the
    second one's first handling fails (Redis), billingd's retry copy of it must still count —
    it is a copy of a delivery never counted — and the early share must be refunded."""
    import dataclasses

    messages = load()
    msgid = next(
        m.message_id for m in messages if m.routing_key == "dlr.submit_sm_resp" and m.body == b"ESME_RTHROTTLED"
    )
    submit = next(m for m in messages if m.routing_key.startswith("submit.sm.") and m.message_id == msgid)
    first = next(m for m in messages if m.routing_key == "dlr.submit_sm_resp" and m.message_id == msgid)
    retried = dataclasses.replace(first, headers={**first.headers, "x-billingd-attempts": ("I", 0),
                                                  "x-billingd-delivery-id": ("S", "second-attempt")})  # fmt: skip
    billing, messaging = unique("jasmin-billing"), unique("jasmin-messaging")
    amqp._exchanges += [billing, messaging]
    sources = _sources(amqp, billing, messaging)
    sms, submits = SmsLedger(redis, Unguarded("redis")), JasminLedger(redis, Unguarded("redis"))
    async with running(make_settings(sources)) as daemon:
        dlr_acked = daemon.metrics.processed.labels(sources[2]["name"], "ack")
        await _publish([submit, first, retried], {"billing": billing, "messaging": messaging})
        await wait_for(lambda: dlr_acked._value.get() == 2, what="both receipts")
    assert (await sms.cdr(msgid))["status"] == "failed"  # two attempts: Jasmin gave up
    record = await submits.submit(msgid)
    assert await sms.refunds_micros("billuser01") == int(record["early_micros"]) > 0
