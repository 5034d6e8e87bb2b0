"""Quorum queues as a first-class choice: the source queue, `.retry` and `.dlq` are all quorum;
what RabbitMQ removes itself (the delivery limit) lands in `.dlq` with its reason, is listed by
`billingd dlq list` and replays like any other letter."""

from __future__ import annotations

import pytest

from billingd.config import parse_config
from billingd.config.loader import ConfigError
from billingd.sources import queue_tools
from tests.flaky import Journal, registry
from tests.seed002 import dlr
from tests.support import amqp_source, cdr_ids, make_settings, rabbitmqctl, running, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def queue_types(prefix: str) -> dict[str, tuple[str, str]]:
    """`name → (type, arguments)` of the queues whose name starts with `prefix`."""
    out = await rabbitmqctl("list_queues", "-q", "--no-table-headers", "name", "type", "arguments")
    rows = [line.split("\t") for line in out.splitlines() if line.startswith(prefix)]
    return {row[0]: (row[1], row[2] if len(row) > 2 else "") for row in rows}


async def test_a_quorum_source_has_quorum_retry_and_dlq_and_retries_through_them(amqp):
    journal = Journal()
    source = amqp.track(amqp_source("flaky", queue_type="quorum", handler_options={"fail_attempts": 2}))
    async with running(make_settings([source]), registry(journal)) as daemon:
        for i in range(5):
            await amqp.publish(source["exchange"], "k", b"{}", message_id=f"q-{i}")
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 5, timeout=20, what="acked after two retries each")
    types = await queue_types(source["queue"])
    assert {name: kind for name, (kind, _) in types.items()} == {
        source["queue"]: "quorum",
        f"{source['queue']}.retry": "quorum",
        f"{source['queue']}.dlq": "quorum",
    }
    arguments = types[source["queue"]][1]
    assert "at-least-once" in arguments
    assert "reject-publish" in arguments
    assert f"{source['queue']}.dlq" in arguments  # RabbitMQ dead-letters into .dlq
    assert all(len(journal.calls[f"q-{i}"]) == 3 for i in range(5))


async def test_a_message_past_the_delivery_limit_lands_in_dlq_with_its_reason_and_replays(amqp, redis):
    source = amqp.track(
        amqp_source("sms_dlr", queue_type="quorum", queue_arguments={"x-delivery-limit": 2}, max_attempts=3)
    )
    settings = make_settings([source])
    message_id = unique("sms")
    async with running(settings):  # declares the topology
        pass
    # a consumer that dies holding the message, three times: RabbitMQ removes it past the limit
    await amqp.publish(source["exchange"], "dlr.x", dlr(message_id, "DELIVRD"), message_id=message_id)
    channel = await amqp.connection.channel()
    queue = await channel.declare_queue(source["queue"], passive=True)
    for _ in range(3):
        message = await queue.get(no_ack=False, fail=False)
        assert message is not None
        await message.nack(requeue=True)
    await channel.close()
    await wait_for(lambda: _depth_is(amqp, source["queue"] + ".dlq", 1), what="removed into .dlq")
    parsed = make_settings([source]).sources[0]
    async with queue_tools(parsed) as tools:
        [letter] = await tools.sample(10)
        assert letter.message_id == message_id
        assert "delivery_limit" in letter.reason
        assert letter.reason.startswith(f"dropped by RabbitMQ from {source['queue']}")
        assert await tools.replay(None) == 1
    async with running(settings) as daemon:
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 1, what="the replayed letter applied")
    assert message_id in await cdr_ids(redis)
    assert await amqp.depth(source["queue"] + ".dlq") == 0


async def _depth_is(amqp, queue: str, n: int) -> bool:
    return await amqp.depth(queue) == n


async def test_moving_a_classic_queue_to_quorum_is_a_clear_configuration_error(amqp):
    source = amqp.track(amqp_source("sms_dlr"))
    async with running(make_settings([source])):
        pass
    quorum = {**source, "queue_type": "quorum"}
    async with running(make_settings([quorum]), wait_ready=False) as daemon:
        status = daemon.statuses[source["name"]]
        await wait_for(lambda: "misconfigured" in (status.reason or ""), timeout=20, what="reported")
        assert "a queue's type cannot change in place" in status.reason
        assert f"{source['queue']}.q" in status.reason


def test_queue_type_and_x_queue_type_must_agree():
    base = (
        '[[sources]]\nname = "a"\ntype = "amqp"\nexchange = "e"\nqueue = "q"\nhandler = "sms_dlr"\n'
        'queue_type = "quorum"\n'
    )
    with pytest.raises(ConfigError) as refused:
        parse_config(base + 'queue_arguments = { "x-queue-type" = "classic" }\n')
    assert "sources[0].queue_type: 'quorum' but queue_arguments.\"x-queue-type\" is 'classic'" in str(refused.value)
    with pytest.raises(ConfigError) as stream:
        parse_config(base.replace('queue_type = "quorum"\n', 'queue_arguments = { "x-queue-type" = "stream" }\n'))
    assert "a stream is not a work queue" in str(stream.value)
    assert parse_config(base).sources[0].kind == "quorum"
