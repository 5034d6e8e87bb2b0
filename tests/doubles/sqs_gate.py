"""A gate in front of an SQS emulator: what moto and fauxqs do not check, answered as SQS does.

The emulators accept any credential and never throttle. The gate forwards every request to the
emulator unless one of these applies, and then answers itself, in the AWS JSON 1.0 error shape
SQS uses (`{"__type": ..., "message": ...}` with `x-amzn-query-error: <code>;Sender`, as
botocore's SQS model and its query-compatible error parsing expect):

* **signature** (AWS Signature Version 4): the access key must be one the gate knows
  (`keys`: access key → secret), else 403 `InvalidClientTokenId`; the signature is recomputed
  over the request as received (botocore's `SigV4Auth`, the signed headers the request lists)
  and must match, else 403 `SignatureDoesNotMatch`;
* **session tokens**: a key with a token in `tokens` must send that token; a token in
  `expired` gets 400 `ExpiredToken` (AWS common errors: "The security token included in the
  request is expired");
* **throttling**: `throttle(n)` answers the next `n` requests with 400 `RequestThrottled`
  (botocore's SQS model: the request rate exceeds SQS's limits);
* **a broken proxy**: `garble(n)` answers the next `n` requests 200 with an HTML page.

`requests` records `(X-Amz-Target, access key, status)` of each request.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from billingd.testing.server import Double

_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, SignedHeaders=([^,]+), Signature=(\w+)"
)


@dataclass
class Seen:
    """One request at the gate."""

    target: str
    access_key: str
    status: int


@dataclass
class SqsGate(Double):
    """See module docstring; `upstream` is the emulator's endpoint URL."""

    upstream: str = ""
    keys: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    expired: set[str] = field(default_factory=set)
    seen: list[Seen] = field(default_factory=list)
    _throttle: int = 0
    _garble: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    def throttle(self, count: int) -> None:
        """Answer the next `count` requests with `RequestThrottled`."""
        self._throttle = count

    def garble(self, count: int) -> None:
        """Answer the next `count` requests 200 with a body that is not JSON."""
        self._garble = count

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._post)
        return app

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        key, refusal = self._check(request, body)
        if refusal is None and self._throttle > 0:
            self._throttle -= 1
            refusal = _error(400, "RequestThrottled", "Request is throttled.")
        target = request.headers.get("X-Amz-Target", "")
        if refusal is None and self._garble > 0:
            self._garble -= 1
            refusal = web.Response(status=200, body=b"<html>upstream gone</html>", content_type="text/html")
        if refusal is not None:
            self.seen.append(Seen(target, key, refusal.status))
            return refusal
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.upstream + request.path_qs, data=body, headers=headers) as answer,
        ):
            payload = await answer.read()
            self.seen.append(Seen(target, key, answer.status))
            passed = {k: v for k, v in answer.headers.items() if k.lower().startswith(("x-amz", "content-type"))}
            return web.Response(status=answer.status, body=payload, headers=passed)

    def _check(self, request: web.Request, body: bytes) -> tuple[str, web.Response | None]:
        match = _AUTH.fullmatch(request.headers.get("Authorization", ""))
        if match is None:
            return "", _error(403, "MissingAuthenticationToken", "Request is missing Authentication Token")
        key, _day, region, service, signed, signature = match.groups()
        secret = self.keys.get(key)
        if secret is None:
            return key, _error(403, "InvalidClientTokenId", "The security token included in the request is invalid.")
        token = request.headers.get("X-Amz-Security-Token")
        if token in self.expired:
            return key, _error(400, "ExpiredToken", "The security token included in the request is expired")
        if self.tokens.get(key) != token:
            return key, _error(403, "InvalidClientTokenId", "The security token included in the request is invalid.")
        names = signed.split(";")
        copy = AWSRequest(
            method=request.method,
            url=f"http://{request.host}{request.path_qs}",
            data=body,
            headers={name: request.headers.get(name, "") for name in names},
        )
        copy.context["timestamp"] = request.headers.get("X-Amz-Date", "")
        signer = SigV4Auth(ReadOnlyCredentials(key, secret, token), service, region)
        expected = signer.signature(signer.string_to_sign(copy, signer.canonical_request(copy)), copy)
        if expected != signature:
            message = "The request signature we calculated does not match the signature you provided."
            return key, _error(403, "SignatureDoesNotMatch", message)
        return key, None


def _error(status: int, code: str, message: str) -> web.Response:
    return web.Response(
        body=json.dumps({"__type": f"com.amazonaws.sqs#{code}", "message": message}).encode(),
        status=status,
        headers={"x-amzn-query-error": f"{code};Sender", "Content-Type": "application/x-amz-json-1.0"},
    )
