"""The lean SQS path against botocore: the same cases through both clients, on moto and fauxqs,
give the same answers and the same errors (`billingd.sources.sqs_lean`).

Each case runs once per client on its own fresh queue and compares what came back (message ids
and receipt handles aside). Credentials and throttling go through `SqsGate`, since the
emulators check neither."""

from __future__ import annotations

import contextlib
import datetime
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from botocore.exceptions import BotoCoreError, ClientError

from billingd.config.model import SqsSourceSettings
from billingd.sources.sqs import _snake
from billingd.sources.sqs_client import open_source_clients
from tests.doubles.sqs_gate import SqsGate

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

KINDS = ("botocore", "lean")
Call = Callable[..., Awaitable[dict[str, Any]]]
RECEIVE = {
    "MaxNumberOfMessages": 10,
    "WaitTimeSeconds": 1,
    "MessageAttributeNames": ["All"],
    "MessageSystemAttributeNames": ["ApproximateReceiveCount", "MessageGroupId"],
}
#: One message attribute of every DataType SQS has, custom types included (SQS Developer Guide,
#: "Message attribute data types").
EVERY_DATATYPE = {
    "text": {"DataType": "String", "StringValue": "héllo ✓ \U0001f4b8"},
    "amount": {"DataType": "Number", "StringValue": "-12.500"},
    "blob": {"DataType": "Binary", "BinaryValue": b"\x00\xff\x10\x80"},
    "label": {"DataType": "String.custom", "StringValue": "x"},
    "count": {"DataType": "Number.int", "StringValue": "42"},
    "image": {"DataType": "Binary.png", "BinaryValue": b"\x89PNG\r\n"},
}


@pytest.fixture(params=["moto", "fauxqs"])
def emulator(request: pytest.FixtureRequest) -> str:
    """The endpoint of each emulator in turn."""
    name = "moto_endpoint" if request.param == "moto" else "fauxqs_endpoint"
    return str(request.getfixturevalue(name))


@contextlib.asynccontextmanager
async def clients(endpoint: str) -> AsyncIterator[dict[str, Call]]:
    """`{"botocore": call, "lean": call}` as an SQS source makes them for `endpoint`; each call
    takes `(operation, **params)` and returns the answer without `ResponseMetadata`."""
    settings = SqsSourceSettings(name="contract", handler="usage", queue_url="unused", endpoint_url=endpoint)
    async with contextlib.AsyncExitStack() as stack:
        client, lean = await open_source_clients(stack, settings, connections=4)
        assert lean is not None

        def stripped(send: Call) -> Call:
            async def call(operation: str, **params: Any) -> dict[str, Any]:
                answer = await send(operation, **params)
                return {k: v for k, v in answer.items() if k != "ResponseMetadata"}

            return call

        async def botocore(operation: str, **params: Any) -> dict[str, Any]:
            answer: dict[str, Any] = await getattr(client, _snake(operation))(**params)
            return answer

        yield {"botocore": stripped(botocore), "lean": stripped(lean.call), "admin": stripped(botocore)}


async def new_queue(admin: Call, fifo: bool = False) -> str:
    name = f"contract-{uuid.uuid4().hex[:8]}" + (".fifo" if fifo else "")
    attributes = {"FifoQueue": "true", "ContentBasedDeduplication": "true"} if fifo else {}
    return str((await admin("CreateQueue", QueueName=name, Attributes=attributes))["QueueUrl"])


def without_ids(answer: dict[str, Any]) -> dict[str, Any]:
    """`answer` with what differs between two queues removed (ids, receipt handles)."""
    messages = [{k: v for k, v in m.items() if k not in ("MessageId", "ReceiptHandle")} for m in answer["Messages"]]
    return {**answer, "Messages": messages}


async def error_of(call: Awaitable[Any]) -> tuple[str, dict[str, Any], int]:
    """`(exception class, Error, HTTP status)` of a call that must fail."""
    with pytest.raises(ClientError) as caught:
        await call
    response = caught.value.response
    return type(caught.value).__name__, response["Error"], response["ResponseMetadata"]["HTTPStatusCode"]


async def test_attributes_of_every_datatype_come_back_the_same(emulator: str) -> None:
    results = {}
    async with clients(emulator) as c:
        for kind in KINDS:
            url = await new_queue(c["admin"])
            await c["admin"]("SendMessage", QueueUrl=url, MessageBody='{"n": 1}', MessageAttributes=EVERY_DATATYPE)
            results[kind] = without_ids(await c[kind]("ReceiveMessage", QueueUrl=url, **RECEIVE))
    assert results["lean"] == results["botocore"]
    (message,) = results["lean"]["Messages"]
    assert message["Body"] == '{"n": 1}'
    assert message["MessageAttributes"] == EVERY_DATATYPE  # Binary values as bytes, as botocore gives them
    assert message["Attributes"]["ApproximateReceiveCount"] == "1"


async def test_fifo_order_and_group_come_back_the_same(emulator: str) -> None:
    results = {}
    async with clients(emulator) as c:
        for kind in KINDS:
            url = await new_queue(c["admin"], fifo=True)
            for n in range(3):
                await c["admin"]("SendMessage", QueueUrl=url, MessageBody=f"m{n}", MessageGroupId="g-1")
            results[kind] = without_ids(await c[kind]("ReceiveMessage", QueueUrl=url, **RECEIVE))
    assert results["lean"] == results["botocore"]
    bodies = [m["Body"] for m in results["lean"]["Messages"]]
    assert bodies == ["m0", "m1", "m2"][: len(bodies)] and bodies  # fauxqs hands out one per group per receive
    assert {m["Attributes"]["MessageGroupId"] for m in results["lean"]["Messages"]} == {"g-1"}


@pytest.mark.parametrize("operation", ["DeleteMessageBatch", "ChangeMessageVisibilityBatch"])
async def test_a_partly_failed_batch_reports_the_same_entries(emulator: str, operation: str) -> None:
    results = {}
    async with clients(emulator) as c:
        for kind in KINDS:
            url = await new_queue(c["admin"])
            await c["admin"]("SendMessage", QueueUrl=url, MessageBody="x")
            (message,) = (await c["admin"]("ReceiveMessage", QueueUrl=url, **RECEIVE))["Messages"]
            extra = {"VisibilityTimeout": 0} if operation == "ChangeMessageVisibilityBatch" else {}
            entries = [
                {"Id": "good", "ReceiptHandle": message["ReceiptHandle"], **extra},
                {"Id": "bad", "ReceiptHandle": "not-a-receipt-handle", **extra},
            ]
            results[kind] = await c[kind](operation, QueueUrl=url, Entries=entries)
    assert results["lean"] == results["botocore"]
    failed = {f["Id"]: f for f in results["lean"].get("Failed", [])}
    assert {"Id": "good"} in results["lean"]["Successful"] and "good" not in failed
    if "bad" in failed:  # moto refuses it; fauxqs takes any handle
        assert failed["bad"]["SenderFault"] is True


async def test_a_missing_queue_raises_the_same_error(emulator: str) -> None:
    async with clients(emulator) as c:
        url = await new_queue(c["admin"])
        await c["admin"]("DeleteQueue", QueueUrl=url)
        errors = {kind: await error_of(c[kind]("ReceiveMessage", QueueUrl=url, **RECEIVE)) for kind in KINDS}
    assert errors["lean"] == errors["botocore"]
    assert errors["lean"][1]["Code"] in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")


@contextlib.asynccontextmanager
async def gated(emulator: str, **gate: Any) -> AsyncIterator[tuple[SqsGate, dict[str, Call]]]:
    double = SqsGate(upstream=emulator, **gate)
    async with double.running(), clients(double.url) as c:
        yield double, c


async def test_throttling_is_retried_alike_then_raised_alike(fauxqs_endpoint: str) -> None:
    # the gate throttles, whichever emulator is behind it: once is enough (botocore's backoff takes seconds)
    async with gated(fauxqs_endpoint, keys={"test": "test"}) as (gate, c):
        url = await new_queue(c["admin"])
        outcomes = {}
        for kind in KINDS:
            gate.throttle(1)  # one RequestThrottled, then the emulator answers
            gate.seen.clear()
            outcomes[kind] = (await c[kind]("ReceiveMessage", QueueUrl=url, **RECEIVE), [s.status for s in gate.seen])
        assert outcomes["lean"] == outcomes["botocore"] == ({}, [400, 200])
        errors = {}
        for kind in KINDS:
            gate.throttle(4)  # as many as the source's attempts: retries = {max_attempts = 3} is 3 retries
            gate.seen.clear()
            errors[kind] = (await error_of(c[kind]("ReceiveMessage", QueueUrl=url, **RECEIVE)), len(gate.seen))
    assert errors["lean"] == errors["botocore"]
    assert errors["lean"][0][1]["Code"] == "RequestThrottled" and errors["lean"][1] == 4


async def test_an_answer_that_is_not_json_is_a_transient_error_of_the_lean_path(fauxqs_endpoint: str) -> None:
    async with gated(fauxqs_endpoint, keys={"test": "test"}) as (gate, c):
        url = await new_queue(c["admin"])
        gate.garble(1)  # once: retried, then the emulator answers
        gate.seen.clear()
        assert await c["lean"]("ReceiveMessage", QueueUrl=url, **RECEIVE) == {}
        assert [s.status for s in gate.seen] == [200, 200]
        gate.garble(4)
        with pytest.raises(BotoCoreError):  # the sources treat it as SQS unreachable: back off, poll again
            await c["lean"]("ReceiveMessage", QueueUrl=url, **RECEIVE)


@pytest.mark.parametrize("bypassed", [False, True])
async def test_both_clients_take_the_proxy_of_the_environment(
    fauxqs_endpoint: str, monkeypatch: pytest.MonkeyPatch, bypassed: bool
) -> None:
    gate = SqsGate(upstream=fauxqs_endpoint, keys={"test": "test"})  # also serves as an HTTP forward proxy
    async with gate.running():
        monkeypatch.setenv("HTTP_PROXY", gate.url)
        monkeypatch.setenv("NO_PROXY", "localhost" if bypassed else "")
        async with clients(fauxqs_endpoint.replace("127.0.0.1", "localhost")) as c:
            url = await new_queue(c["admin"])
            for kind in KINDS:
                gate.seen.clear()
                assert await c[kind]("ReceiveMessage", QueueUrl=url, **RECEIVE) == {}
                expected = [] if bypassed else ["AmazonSQS.ReceiveMessage"]
                assert [s.target for s in gate.seen] == expected, kind


@pytest.mark.parametrize(
    ("keys", "code"), [({"test": "not-the-secret"}, "SignatureDoesNotMatch"), ({}, "InvalidClientTokenId")]
)
async def test_a_wrong_credential_raises_the_same_error(emulator: str, keys: dict[str, str], code: str) -> None:
    async with gated(emulator, keys=keys) as (gate, c):
        url = emulator + "/000000000000/anything"
        errors = {kind: await error_of(c[kind]("ReceiveMessage", QueueUrl=url, **RECEIVE)) for kind in KINDS}
    assert errors["lean"] == errors["botocore"]
    assert errors["lean"][1]["Code"] == code and errors["lean"][2] == 403
    assert len(gate.seen) == 2  # not retried: a refusal is final


class ContainerCredentials:
    """The ECS/EKS container credentials endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI`) serving
    `current` (access key, secret, token, seconds until it expires)."""

    def __init__(self) -> None:
        self.current = ("ASIA1", "s1", "t1", 14 * 60)
        self.served = 0

    async def handle(self, request: web.Request) -> web.Response:
        key, secret, token, ttl = self.current
        self.served += 1
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=ttl)
        return web.json_response(
            {"AccessKeyId": key, "SecretAccessKey": secret, "Token": token, "Expiration": expires.isoformat()}
        )


@pytest.fixture
async def container_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> AsyncIterator[ContainerCredentials]:
    """Only the container provider of the chain has credentials (env, files and IMDS off)."""
    served = ContainerCredentials()
    app = web.Application()
    app.router.add_get("/creds", served.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{port}/creds")
    yield served
    await runner.cleanup()


async def test_role_credentials_are_refreshed_and_an_expired_one_raises_alike(
    emulator: str, container_credentials: ContainerCredentials
) -> None:
    keys, tokens = {"ASIA1": "s1", "ASIA2": "s2", "ASIA3": "s3"}, {"ASIA1": "t1", "ASIA2": "t2", "ASIA3": "t3"}
    async with gated(emulator, keys=keys, tokens=tokens) as (gate, c):
        url = await new_queue(c["admin"])  # with t1: expires within botocore's 15-minute refresh window
        gate.expired.add("t1")
        container_credentials.current = ("ASIA2", "s2", "t2", 14 * 60)  # the role's next session
        for kind in KINDS:
            gate.seen.clear()
            assert await c[kind]("ReceiveMessage", QueueUrl=url, **RECEIVE) == {}
            assert [(s.access_key, s.status) for s in gate.seen] == [("ASIA2", 200)], kind
        container_credentials.current = ("ASIA3", "s3", "t3", 3600)  # one that botocore keeps for a while
        await c["admin"]("GetQueueUrl", QueueName=url.rsplit("/", 1)[1])
        gate.expired.add("t3")  # revoked early, as when the role's session is cut
        errors = {kind: await error_of(c[kind]("ReceiveMessage", QueueUrl=url, **RECEIVE)) for kind in KINDS}
    assert errors["lean"] == errors["botocore"]
    assert errors["lean"][1]["Code"] == "ExpiredToken"
    assert container_credentials.served >= 3


async def test_the_lean_signature_is_botocores_for_the_same_request_and_time(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "a-session-token")  # signed too (X-Amz-Security-Token)
    settings = SqsSourceSettings(name="contract", handler="usage", queue_url="unused", endpoint_url=moto_endpoint)
    sent: list[Any] = []
    async with contextlib.AsyncExitStack() as stack:
        client, lean = await open_source_clients(stack, settings, connections=2)
        assert lean is not None
        client.meta.events.register("before-send.sqs.*", lambda request, **_: sent.append(request))
        url = f"{moto_endpoint}/000000000000/signed"
        cases = {
            "ReceiveMessage": {"QueueUrl": url, **RECEIVE, "VisibilityTimeout": 3},
            "DeleteMessageBatch": {"QueueUrl": url, "Entries": [{"Id": "0", "ReceiptHandle": "r\u00e9ceipt/+="}]},
            "ChangeMessageVisibilityBatch": {
                "QueueUrl": url,
                "Entries": [{"Id": str(i), "ReceiptHandle": f"h{i}", "VisibilityTimeout": 30} for i in range(10)],
            },
        }
        credentials = await lean.frozen_credentials()
        for operation, params in cases.items():
            sent.clear()
            with contextlib.suppress(ClientError):  # the queue does not exist: only the request matters
                await getattr(client, _snake(operation))(**params)
            theirs = sent[0]
            ours = lean.signed(operation, params, credentials, timestamp=theirs.headers["X-Amz-Date"].decode())
            assert ours.data == theirs.body, operation
            assert ours.headers["Authorization"] == theirs.headers["Authorization"].decode(), operation
            assert json.loads(ours.data) == params
