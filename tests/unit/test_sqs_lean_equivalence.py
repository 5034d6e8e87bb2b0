"""The lean SQS path against a real aiobotocore client, offline (`billingd.sources.sqs_lean`).

Both clients are made by `open_source_clients`, as a source makes them, and send to a scripted
peer instead of the network: the lean path's aiohttp session is replaced by `Wire`, and so is
the aiohttp session under aiobotocore's own `AIOHTTPSession.send` (its `_get_session` hook), so
that each path's choice of proxy and its mapping of aiohttp's exceptions run as they are; a
`before-send` handler records botocore's prepared request. No socket is opened (`no_network`).
The signing clock is frozen by patching `botocore.auth.get_current_datetime`, the clock
`SigV4Auth.add_auth` reads (botocore 1.40; older ones read `botocore.auth.datetime`: patched instead),
and backoffs are zero (`ExponentialBackoff.delay_amount`, the class both paths use, records the
attempt it was asked for instead).

Compared: for every endpoint configuration and the three calls, method, URL, body, signed
headers and `Authorization`; for every canned error answer, the exception (class, text,
`response`) and the requests made; the retry quota under an endless 503 or timeout; the proxy
of the environment; and a failing credential refresh.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import types
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import botocore.auth
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.credentials import AioRefreshableCredentials
from aiobotocore.session import AioSession, get_session
from botocore.credentials import CredentialProvider
from botocore.exceptions import BotoCoreError, ClientError, CredentialRetrievalError
from botocore.retries.standard import ExponentialBackoff
from multidict import CIMultiDict
from yarl import URL

import billingd.sources.sqs_client as sqs_client_module
from billingd.config.model import SqsSourceSettings
from billingd.sources.sqs import _snake
from billingd.sources.sqs_client import client_config, open_source_clients, sqs_client
from billingd.sources.sqs_lean import LeanSqs

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

FROZEN = datetime.datetime(2024, 2, 29, 23, 59, 58)  # naive UTC, as `botocore.compat.get_current_datetime` gives it
AMZ_DATE = FROZEN.strftime("%Y%m%dT%H%M%SZ")
QUEUE = "https://sqs.eu-west-1.amazonaws.com/123456789012/billing"


def calls(queue_url: str) -> dict[str, dict[str, Any]]:
    """The three lean calls, with what makes a body interesting (non-ASCII, `+/=`, ten entries)."""
    return {
        "ReceiveMessage": {
            "QueueUrl": queue_url,
            "MaxNumberOfMessages": 10,
            "WaitTimeSeconds": 20,
            "VisibilityTimeout": 30,
            "MessageSystemAttributeNames": ["ApproximateReceiveCount", "MessageGroupId", "AWSTraceHeader"],
            "MessageAttributeNames": ["All"],
        },
        "DeleteMessageBatch": {
            "QueueUrl": queue_url,
            "Entries": [{"Id": "0", "ReceiptHandle": "r\u00e9ceipt/+=\U0001f4b8"}],
        },
        "ChangeMessageVisibilityBatch": {
            "QueueUrl": queue_url,
            "Entries": [{"Id": str(i), "ReceiptHandle": f"h{i}", "VisibilityTimeout": 30 * i} for i in range(10)],
        },
    }


# -- the scripted peer --------------------------------------------------------------------------

Answer = tuple[int, dict[str, str], bytes] | Callable[[], BaseException]
OK_ANSWER: Answer = (200, {"x-amzn-requestid": "ok", "content-type": "application/x-amz-json-1.0"}, b"{}")


@dataclass
class Sent:
    """One request as a path handed it to aiohttp."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    proxy: str | None
    proxy_headers: dict[str, str]


class Response:
    """What both paths read of an aiohttp `ClientResponse`."""

    def __init__(self, url: str, status: int, headers: dict[str, str], body: bytes) -> None:
        self.url, self.status, self._body = URL(url), status, body
        self.headers = CIMultiDict(headers)
        self.raw_headers = tuple((k.encode(), v.encode()) for k, v in headers.items())

    async def read(self) -> bytes:
        return self._body

    def release(self) -> None:
        pass


class Wire:
    """An aiohttp session that records requests and answers from `script` — `(status, headers,
    body)`, or a factory of the exception aiohttp would raise — whose last answer repeats."""

    def __init__(self, *script: Answer) -> None:
        self.script = list(script) or [OK_ANSWER]
        self.sent: list[Sent] = []

    def _answer(self, method: str, url: Any, headers: Any, data: Any, proxy: Any, proxy_headers: Any) -> Response:
        body = data if isinstance(data, bytes) else bytes(data or b"")
        self.sent.append(
            Sent(
                method,
                str(url),
                {k.lower(): str(v) for k, v in dict(headers).items()},
                body,
                str(proxy) if proxy else None,
                dict(proxy_headers or {}),
            )
        )
        answer = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if callable(answer):
            raise answer()
        return Response(str(url), *answer)

    async def request(
        self, method: str, url: Any, *, headers: Any, data: Any, proxy: Any = None, proxy_headers: Any = None, **_: Any
    ) -> Response:
        """aiobotocore's `session.request(...)` (`AIOHTTPSession.send`)."""
        return self._answer(method, url, headers, data, proxy, proxy_headers)

    @contextlib.asynccontextmanager
    async def post(
        self, url: str, *, data: bytes, headers: Any, proxy: Any = None, proxy_headers: Any = None
    ) -> AsyncIterator[Response]:
        """The lean path's `async with session.post(...)`."""
        yield self._answer("POST", url, headers, data, proxy, proxy_headers)

    async def close(self) -> None:
        pass


@dataclass
class Side:
    """One path: `call(operation, **params)` (the answer without `ResponseMetadata`), its wire,
    and (botocore) the requests `before-send` saw."""

    call: Callable[..., Any]
    wire: Wire
    prepared: list[Any] = field(default_factory=list)


@dataclass
class Pair:
    botocore: Side
    lean: Side
    source: LeanSqs

    def sides(self) -> Iterator[tuple[str, Side]]:
        yield from (("botocore", self.botocore), ("lean", self.lean))


@contextlib.asynccontextmanager
async def both(
    settings: SqsSourceSettings, botocore_wire: Wire, lean_wire: Wire, config: AioConfig | None = None
) -> AsyncIterator[Pair]:
    """Both clients of a source for `settings` (by `open_source_clients`; with `config`, made the
    same way from that client config), each sending to its wire."""
    async with contextlib.AsyncExitStack() as stack:
        if config is None:
            client, lean = await open_source_clients(stack, settings, connections=2)
            assert lean is not None
        else:
            session = get_session()
            client = await stack.enter_async_context(sqs_client(settings, config, session))
            lean = await stack.enter_async_context(
                LeanSqs(client, await session.get_credentials(), read_timeout=30, connections=2)
            )
        assert lean._http is not None
        await lean._http.close()  # never used: the lean path sends to its wire
        lean._http = lean_wire  # type: ignore[assignment]
        http_session = client._endpoint.http_session
        assert hasattr(http_session, "_get_session"), "aiobotocore's AIOHTTPSession changed: adapt the hook"

        async def get_wire(proxy_url: str | None) -> Wire:
            return botocore_wire

        http_session._get_session = get_wire
        prepared: list[Any] = []
        client.meta.events.register("before-send.sqs.*", lambda request, **_: prepared.append(request))

        async def botocore(operation: str, **params: Any) -> dict[str, Any]:
            answer: dict[str, Any] = await getattr(client, _snake(operation))(**params)
            return {k: v for k, v in answer.items() if k != "ResponseMetadata"}

        async def lean_call(operation: str, **params: Any) -> dict[str, Any]:
            return await lean.call(operation, **params)

        yield Pair(Side(botocore, botocore_wire, prepared), Side(lean_call, lean_wire), lean)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Fixed static credentials (with a session token, which is signed too) and nothing else."""
    for name in list(os.environ):  # anything else would change either client: endpoints, retries, proxies, profiles
        if name.startswith("AWS_") or name.lower().endswith("_proxy") or name == "REQUEST_METHOD":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token/+=")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection or name lookup fails the test: everything here is answered by a `Wire`."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network use in an offline test: {args!r}")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


class _FrozenDatetime(datetime.datetime):
    @classmethod
    def utcnow(cls) -> Any:
        return FROZEN


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """SigV4's clock at `FROZEN`: the `get_current_datetime` that `SigV4Auth.add_auth` reads since
    botocore 1.40 (patched in `botocore.auth`, where it is imported), or, before, its
    `datetime.datetime.utcnow()` (patched as botocore's own tests did: `botocore.auth.datetime`)."""
    if hasattr(botocore.auth, "get_current_datetime"):
        monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *_, **__: FROZEN)
    else:
        shim = types.SimpleNamespace(**{**vars(datetime), "datetime": _FrozenDatetime})
        monkeypatch.setattr(botocore.auth, "datetime", shim)


@pytest.fixture(autouse=True)
def backoffs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The attempt numbers botocore's `ExponentialBackoff` was asked a delay for; the delay is 0."""
    asked: list[int] = []

    def delay_amount(self: ExponentialBackoff, context: Any) -> float:
        asked.append(context.attempt_number)
        return 0.0

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", delay_amount)
    return asked


def settings_for(region: str = "eu-west-1", endpoint_url: str = "") -> SqsSourceSettings:
    return SqsSourceSettings(
        name="equivalence", handler="usage", queue_url=QUEUE, region=region, endpoint_url=endpoint_url
    )


# -- the same request ------------------------------------------------------------------------------

_FIPS = {"AWS_USE_FIPS_ENDPOINT": "true"}
_DUAL_STACK = {"AWS_USE_DUALSTACK_ENDPOINT": "true"}
_LEGACY = "https://queue.amazonaws.com/123456789012/billing"  # the legacy form of an SQS queue URL
#: `(region, endpoint_url, environment, queue URL — QUEUE if "")`: every way billingd's settings and the AWS
#: environment (AWS SDKs and Tools Reference Guide: "Dual-stack and FIPS endpoints",
#: "Service-specific endpoints") choose an endpoint.
ENDPOINTS: dict[str, tuple[str, str, dict[str, str], str]] = {
    "plain": ("eu-west-1", "", {}, QUEUE),
    "us-east-1": ("us-east-1", "", {}, "https://sqs.us-east-1.amazonaws.com/123456789012/billing"),
    "china": ("cn-north-1", "", {}, "https://sqs.cn-north-1.amazonaws.com.cn/123456789012/billing"),
    "govcloud": ("us-gov-west-1", "", {}, "https://sqs.us-gov-west-1.amazonaws.com/123456789012/billing"),
    "iso-b": ("us-isob-east-1", "", {}, "https://sqs.us-isob-east-1.sc2s.sgov.gov/123456789012/billing"),
    "fips": ("us-east-1", "", _FIPS, QUEUE),
    "fips pseudo-region": ("fips-us-east-1", "", {}, QUEUE),
    "govcloud fips": ("us-gov-west-1", "", _FIPS, QUEUE),
    "dual-stack": ("eu-west-1", "", _DUAL_STACK, QUEUE),
    "dual-stack fips": ("us-east-1", "", {**_FIPS, **_DUAL_STACK}, QUEUE),
    "china dual-stack": ("cn-north-1", "", _DUAL_STACK, QUEUE),
    "AWS_ENDPOINT_URL_SQS": ("eu-west-1", "", {"AWS_ENDPOINT_URL_SQS": "http://localhost:4566"}, QUEUE),
    "AWS_ENDPOINT_URL": ("eu-west-1", "", {"AWS_ENDPOINT_URL": "https://aws.internal.example:8443"}, QUEUE),
    "vpc endpoint": ("eu-west-1", "https://vpce-0a1b2c3d4e5f67890-abcdefgh.sqs.eu-west-1.vpce.amazonaws.com", {}, ""),
    "endpoint with a path": ("eu-west-1", "https://gateway.example/sqs", {}, QUEUE),
    "endpoint with a slash and port": (
        "eu-west-1",
        "http://127.0.0.1:9324/",
        {},
        "http://127.0.0.1:9324/000000000000/q",
    ),
    "ipv6 endpoint": ("eu-west-1", "http://[::1]:9324", {}, QUEUE),
    "legacy queue URL": ("us-east-1", "", {}, _LEGACY),
    "legacy endpoint": ("us-east-1", "https://queue.amazonaws.com", {}, _LEGACY),
    "legacy regional queue URL": ("eu-west-1", "", {}, "https://eu-west-1.queue.amazonaws.com/123456789012/billing"),
}
#: Headers only botocore sends, none of them signed: its User-Agent (the lean path's session adds
#: its own), the retry headers (`botocore.handlers.add_retry_headers`, at before-send),
#: aiobotocore's `Accept-Encoding: identity`, and `Content-Length` (aiohttp adds it for the lean path).
UNSIGNED_BOTOCORE_ONLY = {"user-agent", "amz-sdk-invocation-id", "amz-sdk-request", "accept-encoding", "content-length"}


def signed_headers(authorization: str) -> list[str]:
    return authorization.split("SignedHeaders=")[1].split(",")[0].split(";")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_the_lean_request_is_botocores(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    region, endpoint_url, environment, queue_url = ENDPOINTS[endpoint]
    queue_url = queue_url or QUEUE
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    async with both(settings_for(region, endpoint_url), Wire(), Wire()) as pair:
        for operation, params in calls(queue_url).items():
            for _, side in pair.sides():
                side.wire.sent.clear()
                assert await side.call(operation, **params) == {}
            (theirs,), (ours,) = pair.botocore.wire.sent, pair.lean.wire.sent
            prepared = pair.botocore.prepared[-1]
            assert (ours.method, ours.url) == (theirs.method, theirs.url) == (prepared.method, prepared.url), operation
            assert ours.body == theirs.body == prepared.body, operation
            assert json.loads(ours.body) == params
            assert ours.headers["x-amz-date"] == theirs.headers["x-amz-date"] == AMZ_DATE  # the clock is frozen
            assert ours.headers["authorization"] == theirs.headers["authorization"], operation
            for name in signed_headers(ours.headers["authorization"]):
                if name != "host":  # signed from the URL by both (`_host_from_url`); aiohttp sends it
                    assert ours.headers[name] == theirs.headers[name], (operation, name)
            assert set(ours.headers) <= set(theirs.headers), operation
            assert set(theirs.headers) - set(ours.headers) <= UNSIGNED_BOTOCORE_ONLY, operation
            assert ours.proxy is theirs.proxy is None


# -- the same errors -------------------------------------------------------------------------------


def _json_error(status: int, kind: str, query_error: str | None, message: str) -> Answer:
    headers = {"x-amzn-requestid": "req-1", "content-type": "application/x-amz-json-1.0"}
    if query_error:
        headers["x-amzn-query-error"] = query_error
    return status, headers, json.dumps({"__type": kind, "message": message}).encode()


def _key() -> Any:  # what `ClientConnectorError` reads of aiohttp's `ConnectionKey`
    return types.SimpleNamespace(host="sqs.eu-west-1.amazonaws.com", port=443, ssl=True)


def _refused() -> Exception:
    return aiohttp.ClientConnectorError(_key(), OSError(errno.ECONNREFUSED, "Connect call failed"))


_HTML = {"content-type": "text/html"}
ERRORS: dict[str, list[Answer]] = {
    "503 SQS": [_json_error(503, "com.amazonaws.sqs#ServiceUnavailable", "ServiceUnavailable;Receiver", "Unavailable")],
    "503 load balancer page": [(503, _HTML, b"<html><body>503 Service Temporarily Unavailable</body></html>")],
    "503 then 200": [_json_error(503, "com.amazonaws.sqs#ServiceUnavailable", None, "Unavailable"), OK_ANSWER],
    "500 InternalError": [_json_error(500, "com.amazonaws.sqs#InternalError", "InternalError;Receiver", "Oops")],
    "400 QueueDoesNotExist": [
        _json_error(400, "com.amazonaws.sqs#QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue;Sender", "No")
    ],
    "403 InvalidClientTokenId": [
        _json_error(403, "com.amazon.coral.service#InvalidClientTokenId", "InvalidClientTokenId;Sender", "Invalid")
    ],
    "400 RequestThrottled": [_json_error(400, "com.amazonaws.sqs#RequestThrottled", "RequestThrottled;Sender", "Slow")],
    "400 ThrottlingException": [_json_error(400, "ThrottlingException", None, "Rate exceeded")],
    "400 throttled once": [_json_error(400, "ThrottlingException", "RequestThrottled;Sender", "Slow"), OK_ANSWER],
    "413 too large": [(413, _HTML, b"<html><body>413 Request Entity Too Large</body></html>")],
    "connection refused": [_refused],
    "connection refused once": [_refused, OK_ANSWER],
    "connect timeout": [lambda: aiohttp.ConnectionTimeoutError(f"Connection timeout to host {QUEUE}")],
    "read timeout": [lambda: aiohttp.SocketTimeoutError("Timeout on reading data from socket")],
    "server disconnected": [lambda: aiohttp.ServerDisconnectedError()],
    "TLS failure": [lambda: aiohttp.ClientSSLError(_key(), OSError(1, "certificate verify failed"))],
}


async def outcome(side: Side, operation: str, params: dict[str, Any], backoffs: list[int]) -> tuple[Any, ...]:
    """`(answer, or (exception class, text, response)), requests made, backoffs asked)` of one call."""
    side.wire.sent.clear()
    backoffs.clear()
    try:
        result: Any = await side.call(operation, **params)
    except Exception as exc:  # noqa: BLE001 — the exception is what is compared
        result = (type(exc), str(exc), getattr(exc, "response", None))
    return result, len(side.wire.sent), list(backoffs)


@pytest.mark.parametrize("error", ERRORS)
async def test_an_error_answer_raises_the_same_after_the_same_attempts(error: str, backoffs: list[int]) -> None:
    async with both(settings_for(), Wire(), Wire()) as pair:
        for operation, params in calls(QUEUE).items():
            outcomes = {}
            for kind, side in pair.sides():
                side.wire.script = list(ERRORS[error])
                outcomes[kind] = await outcome(side, operation, params, backoffs)
            assert outcomes["lean"] == outcomes["botocore"], operation
            result, requests, asked = outcomes["lean"]
            assert asked == list(range(1, requests)), operation  # a backoff before each retry, from attempt 1
            if isinstance(result, tuple) and issubclass(result[0], ClientError):
                assert result[2]["ResponseMetadata"]["RetryAttempts"] == requests - 1


# -- the gaps botocore closes: retry quota, proxy, credentials ---------------------------------------

_ENDLESS: dict[str, Answer] = {
    "503": _json_error(503, "com.amazonaws.sqs#ServiceUnavailable", "ServiceUnavailable;Receiver", "Unavailable"),
    "read timeout": lambda: aiohttp.SocketTimeoutError("Timeout on reading data from socket"),
}


@pytest.mark.parametrize("failure", _ENDLESS)
async def test_an_endless_failure_spends_the_retry_quota_as_botocore(failure: str) -> None:
    # botocore's standard mode (`RetryQuotaChecker`): 500 tokens, 5 per retry (10 after a timeout),
    # a success gives back what its retries took, or 1; an empty quota means no retry at all
    async with both(settings_for(), Wire(), Wire()) as pair:
        requests: dict[str, list[int]] = {}
        metadata: dict[str, dict[str, Any]] = {}
        for kind, side in pair.sides():
            requests[kind] = []
            for phase in ["fail"] * 60 + ["ok"] * 12 + ["fail"] * 3:
                side.wire.script = [_ENDLESS[failure] if phase == "fail" else OK_ANSWER]
                side.wire.sent.clear()
                try:
                    await side.call("ReceiveMessage", QueueUrl=QUEUE, MaxNumberOfMessages=10)
                except ClientError as exc:
                    metadata[kind] = exc.response["ResponseMetadata"]
                except BotoCoreError:  # a timeout: only the count matters
                    pass
                requests[kind].append(len(side.wire.sent))
    assert requests["lean"] == requests["botocore"]
    if failure == "503":  # 33 calls take 3 retries each, the 34th the last 5 tokens; 12 successes give 12 back
        assert requests["lean"] == [4] * 33 + [2] + [1] * 26 + [1] * 12 + [3, 1, 1]
        assert metadata["lean"] == metadata["botocore"]
        assert metadata["lean"]["RetryQuotaReached"] is True
    else:  # 10 tokens a retry: 16 calls take 3, the 17th 2; 12 successes give back one retry
        assert requests["lean"] == [4] * 16 + [3] + [1] * 43 + [1] * 12 + [2, 1, 1]


_HTTP_ENDPOINT = "http://sqs.internal:9324"
_WITH_CREDENTIALS = "http://svc%40corp:p%3Ass@proxy.corp:3128"
#: `(environment, endpoint_url, proxy)`: the proxy botocore picks (`botocore.utils.get_environ_proxies`,
#: then `ProxyConfiguration.proxy_url_for`, which gives a scheme-less one `http://`).
PROXIES: dict[str, tuple[dict[str, str], str, str | None]] = {
    "scheme-less": ({"HTTPS_PROXY": "proxy.corp:3128"}, "", "http://proxy.corp:3128"),
    "scheme-relative": ({"https_proxy": "//proxy.corp:3128"}, "", "http://proxy.corp:3128"),
    "https proxy": ({"HTTPS_PROXY": "https://proxy.corp:3129"}, "", "https://proxy.corp:3129"),
    "with credentials": ({"HTTPS_PROXY": _WITH_CREDENTIALS}, "", _WITH_CREDENTIALS),
    "scheme-less with credentials": (
        {"HTTPS_PROXY": "svc:secret@proxy.corp:3128"},
        "",
        "http://svc:secret@proxy.corp:3128",
    ),
    "bypassed by NO_PROXY": ({"HTTPS_PROXY": "proxy.corp:3128", "NO_PROXY": "localhost,.amazonaws.com"}, "", None),
    "NO_PROXY=*": ({"HTTPS_PROXY": "proxy.corp:3128", "NO_PROXY": "*"}, "", None),
    "only HTTP_PROXY, https endpoint": ({"HTTP_PROXY": "proxy.corp:3128"}, "", None),
    "http endpoint": ({"HTTP_PROXY": "proxy.corp:8080"}, _HTTP_ENDPOINT, "http://proxy.corp:8080"),
    "http endpoint, no_proxy": ({"HTTP_PROXY": "proxy.corp:8080", "no_proxy": "sqs.internal"}, _HTTP_ENDPOINT, None),
}


def effective_proxy_authorization(sent: Sent) -> str | None:
    """The `Proxy-Authorization` aiohttp sends: the one given, else Basic from the proxy URL's credentials."""
    if "Proxy-Authorization" in sent.proxy_headers:
        return sent.proxy_headers["Proxy-Authorization"]
    auth = aiohttp.BasicAuth.from_url(URL(sent.proxy)) if sent.proxy else None
    return auth.encode() if auth else None


@pytest.mark.parametrize("case", PROXIES)
async def test_the_proxy_of_the_environment_is_botocores(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    environment, endpoint_url, expected = PROXIES[case]
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    async with both(settings_for(endpoint_url=endpoint_url), Wire(), Wire()) as pair:
        for _, side in pair.sides():
            assert await side.call("ReceiveMessage", QueueUrl=QUEUE) == {}
        (theirs,), (ours,) = pair.botocore.wire.sent, pair.lean.wire.sent
        assert ours.proxy == theirs.proxy == pair.source.proxy == expected
        assert effective_proxy_authorization(ours) == effective_proxy_authorization(theirs)


@pytest.mark.parametrize(
    ("proxies", "expected"),
    [({"https": "proxy.corp:3128"}, "http://proxy.corp:3128"), ({}, None), (None, "http://env.corp:3128")],
)
async def test_the_proxies_of_the_client_config_are_botocores(
    monkeypatch: pytest.MonkeyPatch, proxies: dict[str, str] | None, expected: str | None
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "env.corp:3128")  # botocore reads it only when the config has no `proxies`
    config = client_config(retries={"mode": "standard", "max_attempts": 3}, proxies=proxies)
    async with both(settings_for(), Wire(), Wire(), config=config) as pair:
        for _, side in pair.sides():
            assert await side.call("ReceiveMessage", QueueUrl=QUEUE) == {}
        assert pair.lean.wire.sent[0].proxy == pair.botocore.wire.sent[0].proxy == expected


class Role(CredentialProvider):  # type: ignore[misc]
    """A role session that expires within botocore's mandatory refresh window (10 minutes), so
    every signing refreshes it; refresh number `n` (from 1) raises `errors[n]` if there is one."""

    METHOD = "equivalence-test"

    def __init__(self, errors: dict[int, Callable[[], Exception]]) -> None:
        super().__init__()
        self.errors = errors
        self.refreshes = 0

    def _metadata(self) -> dict[str, str]:
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
        return {
            "access_key": "ASIAEXAMPLE",
            "secret_key": "s3cr3t",
            "token": "t0ken",
            "expiry_time": expiry.isoformat(),
        }

    async def load(self) -> AioRefreshableCredentials:
        return AioRefreshableCredentials.create_from_metadata(self._metadata(), self.refresh, self.METHOD)

    async def refresh(self) -> dict[str, str]:
        self.refreshes += 1
        if self.refreshes in self.errors:
            raise self.errors[self.refreshes]()
        return self._metadata()


_STS_THROTTLED = {
    "Error": {"Code": "Throttling", "Message": "Rate exceeded"},
    "ResponseMetadata": {"HTTPStatusCode": 400},
}


def _token_file_gone() -> Exception:  # web identity (IRSA): the projected token is read at each refresh
    return FileNotFoundError(errno.ENOENT, "No such file or directory", "/var/run/secrets/token")


def _container_down() -> Exception:
    error: Exception = CredentialRetrievalError(provider="container-role", error_msg="endpoint unreachable")
    return error


REFRESH_FAILURES: dict[str, tuple[dict[int, Callable[[], Exception]], list[Answer]]] = {
    "STS throttled": ({1: lambda: ClientError(_STS_THROTTLED, "AssumeRoleWithWebIdentity")}, [OK_ANSWER]),
    "token file gone": ({1: _token_file_gone}, [OK_ANSWER]),
    "container endpoint down": ({1: _container_down}, [OK_ANSWER]),
    "after a 503": ({2: _token_file_gone}, [ERRORS["503 SQS"][0]]),
}


@pytest.mark.parametrize("case", REFRESH_FAILURES)
async def test_a_failed_credential_refresh_is_raised_once_as_botocore_does(
    monkeypatch: pytest.MonkeyPatch, case: str, backoffs: list[int]
) -> None:
    errors, answers = REFRESH_FAILURES[case]
    role = Role(errors)
    session: AioSession = get_session()
    session.get_component("credential_provider").insert_before("env", role)
    monkeypatch.setattr(sqs_client_module, "get_session", lambda: session)
    async with both(settings_for(), Wire(*answers), Wire(*answers)) as pair:
        results = {}
        for kind, side in pair.sides():
            role.refreshes = 0
            result = await outcome(side, "ReceiveMessage", {"QueueUrl": QUEUE}, backoffs)
            results[kind] = (result, role.refreshes)
    assert results["lean"] == results["botocore"]
    (answer, requests, _), refreshes = results["lean"]
    (failing,) = errors.values()
    assert answer[0] is type(failing())  # the provider's own error, not an SQS one
    assert (requests, refreshes) == ((0, 1) if 1 in errors else (1, 2))  # never retried as an SQS error
