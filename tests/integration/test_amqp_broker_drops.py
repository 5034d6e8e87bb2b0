"""Issue 10: RabbitMQ never drops a billing message silently. A queue whose arguments let it
expire or overflow messages dead-letters them into `<queue>.dlq`, where `billingd dlq list`
shows RabbitMQ's reason; `x-overflow = reject-publish` refuses the publisher instead."""

from __future__ import annotations

import aio_pika
import pytest

from tests.integration.test_dlq_tools import billingd
from tests.seed002 import dlr
from tests.support import amqp_source, make_settings, running, settings_tree, to_toml, wait_for

pytestmark = pytest.mark.anyio


async def _declared_then_stopped(amqp, **arguments) -> dict:
    """A source whose queue billingd declared, with intake stopped (the daemon drained)."""
    source = amqp.track(amqp_source("sms_dlr", queue_arguments=arguments))
    async with running(make_settings([source])):
        pass
    return source


async def test_a_message_that_expires_while_intake_is_stopped_lands_in_the_dlq_with_reason_expired(amqp, tmp_path):
    source = await _declared_then_stopped(amqp, **{"x-message-ttl": 2000})
    await amqp.publish(source["exchange"], "dlr.x", dlr("ttl-1", "DELIVRD"), message_id="ttl-1")
    dlq = f"{source['queue']}.dlq"
    await wait_for(lambda: _depth_is(amqp, dlq, 1), timeout=10, what="expired into the .dlq")
    config = tmp_path / "billingd.toml"
    config.write_text(to_toml(settings_tree(make_settings([source]))))
    listing = await billingd("dlq", "list", source["name"], "--config", str(config))
    assert "1  dropped by RabbitMQ from" in listing.stdout
    assert "expired (x-message-ttl)" in listing.stdout
    [letter] = await amqp.drain_queue(dlq)
    assert letter.message_id == "ttl-1"
    assert letter.headers["x-death"][0]["reason"] == "expired"


async def test_overflowing_x_max_length_puts_the_head_in_the_dlq_with_reason_maxlen(amqp):
    source = await _declared_then_stopped(amqp, **{"x-max-length": 2})
    for i in range(3):
        await amqp.publish(source["exchange"], "dlr.x", dlr(f"max-{i}", "DELIVRD"), message_id=f"max-{i}")
    dlq = f"{source['queue']}.dlq"
    await wait_for(lambda: _depth_is(amqp, dlq, 1), what="overflowed into the .dlq")
    [letter] = await amqp.drain_queue(dlq)
    assert letter.message_id == "max-0"  # the head
    assert letter.headers["x-death"][0]["reason"] == "maxlen"
    assert await amqp.depth(source["queue"]) == 2


async def test_reject_publish_refuses_the_publisher_instead_of_dropping(amqp):
    source = await _declared_then_stopped(amqp, **{"x-max-length": 1, "x-overflow": "reject-publish"})
    await amqp.publish(source["exchange"], "dlr.x", dlr("keep", "DELIVRD"))
    with pytest.raises(aio_pika.exceptions.DeliveryError):  # nack: the publisher knows and can retry
        await amqp.publish(source["exchange"], "dlr.x", dlr("refused", "DELIVRD"))
    assert await amqp.depth(f"{source['queue']}.dlq") == 0
    assert await amqp.depth(source["queue"]) == 1


async def test_a_queue_declared_before_the_dead_letter_route_is_a_clear_config_error(amqp):
    source = amqp.track(amqp_source("sms_dlr", queue_arguments={"x-message-ttl": 60000}))
    channel = await amqp.connection.channel()
    await channel.declare_queue(source["queue"], durable=True, arguments={"x-message-ttl": 60000})
    await channel.close()
    async with running(make_settings([source]), wait_ready=False) as daemon:
        status = daemon.statuses[source["name"]]
        await wait_for(lambda: "misconfigured" in status.reason, what="reported")
        reason = status.reason
    assert "x-dead-letter-exchange" in reason and "delete" in reason


async def _depth_is(amqp, queue: str, n: int) -> bool:
    return await amqp.depth(queue) == n
