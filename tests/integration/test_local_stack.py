"""The local stack's scripts (issue #13, first run): queues on whichever SQS emulator answers,
and traffic that survives one failing sender."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.anyio

LOCAL = Path(__file__).resolve().parents[2] / "deploy" / "local"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"local_{name}", LOCAL / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def test_queues_are_created_on_an_emulator_that_has_none_twice_without_harm(sqs):
    """moto, not fauxqs: another account id (123456789012), so the redrive ARNs are rewritten."""
    queues = json.loads((LOCAL / "fauxqs-init.json").read_text())["queues"]
    ensure_queues = _load("sqs_queues").ensure_queues
    first = await ensure_queues(sqs.endpoint, queues)
    again = await ensure_queues(sqs.endpoint, queues)  # idempotent: a second stack.sh on the same emulator
    assert first == again and len(first) == len(queues) == 10
    for queue, url in zip(queues, first, strict=True):
        got = (await sqs.client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"]))["Attributes"]
        if queue["name"].endswith("-dlq"):
            assert "RedrivePolicy" not in got
            continue
        dlq_url = first[first.index(url) - 1]
        dlq_arn = (await sqs.client.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"]))["Attributes"][
            "QueueArn"
        ]
        policy = json.loads(got["RedrivePolicy"])
        assert policy["deadLetterTargetArn"] == dlq_arn  # this emulator's ARN, not the file's
        assert int(policy["maxReceiveCount"]) == 10
        assert got["VisibilityTimeout"] == "60"


async def test_one_failing_sender_says_what_failed_and_the_others_go_on(capsys):
    traffic = _load("traffic")
    delivered: list[int] = []

    async def broken(n: int) -> int:
        raise RuntimeError("QueueDoesNotExist: billing-usage-events")

    async def working(n: int) -> int:
        delivered.append(n)
        return 2

    failing = traffic.Sender("sqs billing-usage-events", broken)
    healthy = traffic.Sender("amqp seed-002 JSON", working)
    for sender in (failing, healthy):
        await sender.run(rate=1000, count=5)
    assert delivered == [1, 2, 3, 4, 5] and healthy.sent == 10 and not healthy.error
    assert failing.failures == 5 and failing.sent == 0
    err = capsys.readouterr().err
    # said once (not once per round), with the sender and the error
    assert err.count("[traffic] sqs billing-usage-events: failed: RuntimeError: QueueDoesNotExist") == 1
    assert "failing: RuntimeError" in failing.summary()
