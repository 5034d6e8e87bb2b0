"""The lean SQS path: the three calls that carry the traffic, without botocore's per-call machinery.

`ReceiveMessage`, `DeleteMessageBatch` and `ChangeMessageVisibilityBatch` are sent as the
AWS JSON 1.0 requests the SDK sends (`POST /`, `X-Amz-Target: AmazonSQS.<Operation>`,
`Content-Type: application/x-amz-json-1.0`, `x-amzn-query-mode: true`; Amazon SQS API
Reference, "Making API requests", and botocore's SQS service model) over one aiohttp session,
signed by botocore's own `SigV4Auth` with credentials from the aiobotocore session (the whole
chain — environment, profile, web identity/IRSA, container, IMDS, SSO — with its refresh), to
the endpoint botocore resolved for the client (`client.meta.endpoint_url`). Answers are decoded
by msgspec; `BinaryValue`s come back as bytes, as botocore gives them.

What the lean path leaves out, measured (`bench/compare.py sqs`): botocore rebuilding its
User-Agent, validating parameters, walking the output shape, and preparing an `AWSRequest`
per call. What it keeps: the same request bytes and signature (a test compares its
`Authorization` with botocore's for the same request and time), the same errors — error answers
are parsed by botocore's own JSON parser and raised as the client's own modeled `ClientError`
subclasses (`x-amzn-query-error` gives `Error.Code`, e.g. `AWS.SimpleQueueService.NonExistentQueue`),
per-entry batch failures untouched in `Failed`, and botocore's standard retry mode (the client's attempts;
transient, throttling and modeled-retryable errors; jittered exponential backoff). Not kept: the
standard mode's retry quota (a token bucket that stops retrying when most calls fail).

Every other call (`GetQueueAttributes`, `SendMessageBatch` to the DLQ, single-entry fallbacks)
stays on the aiobotocore client: they are rare, and the DLQ's attributes need botocore's
serialiser.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import ssl
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import msgspec
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
from botocore.httpsession import get_cert_path
from botocore.parsers import create_parser
from botocore.retries.standard import ExponentialBackoff, RetryContext, StandardRetryConditions
from botocore.utils import get_environ_proxies

import billingd

#: The operations the lean path sends; everything else goes through the aiobotocore client.
LEAN_OPERATIONS = frozenset({"ReceiveMessage", "DeleteMessageBatch", "ChangeMessageVisibilityBatch"})
DEFAULT_ATTEMPTS = 3  # botocore's standard retry mode, when the client's config sets none
CONNECT_TIMEOUT = 5.0  # seconds, as the source's aiobotocore client
USER_AGENT = f"billingd/{billingd.__version__} (lean SQS path)"
_JSON = "application/x-amz-json-1.0"


class _Signer(SigV4Auth):  # type: ignore[misc]  # botocore has no type hints
    """botocore's `SigV4Auth` (AWS Signature Version 4), spared three repeats per request: the
    headers to sign are selected once per request (botocore selects them twice), the body's
    SHA-256 is taken from the bytes we built (botocore's `AWSRequest.body` prepares the whole
    request again to read it), and the signing key — HMAC chain of the secret, date, region and
    service — is derived once per day and credential, into `keys` (the `LeanSqs`'s own cache).
    The result is botocore's, byte for byte (`tests/integration/test_sqs_clients.py` compares the
    `Authorization` of both)."""

    def __init__(self, credentials: Any, service: str, region: str, keys: dict[tuple[str, str], bytes]) -> None:
        super().__init__(credentials, service, region)
        self._keys = keys

    def headers_to_sign(self, request: AWSRequest) -> Any:
        selected = request.context.get("billingd.headers_to_sign")
        if selected is None:
            selected = request.context["billingd.headers_to_sign"] = super().headers_to_sign(request)
        return selected

    def payload(self, request: AWSRequest) -> str:
        if isinstance(request.data, bytes) and request.context.get("payload_signing_enabled", True):
            return hashlib.sha256(request.data).hexdigest()
        return str(super().payload(request))

    def signature(self, string_to_sign: str, request: AWSRequest) -> str:
        day = request.context["timestamp"][0:8]
        index = (self.credentials.secret_key, day)  # one region and service per LeanSqs
        key = self._keys.get(index)
        if key is None:
            key = self._sign(f"AWS4{self.credentials.secret_key}".encode(), day)
            for part in (self._region_name, self._service_name, "aws4_request"):
                key = self._sign(key, part)
            if len(self._keys) > 16:
                self._keys.clear()
            self._keys[index] = key
        return str(self._sign(key, string_to_sign, hex=True))


class _Status(msgspec.Struct):
    """What the retry checkers read of an HTTP answer (botocore's `AWSResponse.status_code`)."""

    status_code: int


class LeanSqs:
    """Sends `LEAN_OPERATIONS` for one aiobotocore SQS `client`, over its own aiohttp session.

    `call(operation, **params)` takes and returns what `client.<operation>(**params)` does
    (botocore's parameter and response shapes, minus `ResponseMetadata`) and raises what it
    raises: the client's modeled `ClientError`s, `NoCredentialsError`, and for an endpoint that
    does not answer aiohttp's `ClientError`, `OSError` or `TimeoutError` (after the retries);
    an answer that is not SQS's JSON raises botocore's `HTTPClientError` (transient, retried).
    """

    def __init__(
        self, client: Any, credentials: Any, *, read_timeout: float, connections: int, ca_bundle: str | None = None
    ) -> None:
        meta = client.meta
        self._client = client
        self._credentials = credentials
        # the request URL as botocore sends it (`AWSRequest` gives an empty path "/"): a proxy gets
        # the absolute form `POST http://host/`, never a target without a path
        self._url = meta.endpoint_url if urlsplit(meta.endpoint_url).path else meta.endpoint_url + "/"
        self._region = meta.region_name
        self._service = meta.service_model
        self._signing_name = meta.service_model.signing_name or "sqs"
        self._target = meta.service_model.metadata.get("targetPrefix", "AmazonSQS")
        self._error_parser = create_parser("json")
        self._signing_keys: dict[tuple[str, str], bytes] = {}
        self._retry = StandardRetryConditions(max_attempts=total_attempts(meta.config.retries))
        self._backoff = ExponentialBackoff()
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=read_timeout)
        self._connections = connections
        self._ca_bundle = ca_bundle
        # botocore's choice of proxy, made once: the client's `proxies`, else HTTPS_PROXY /
        # HTTP_PROXY unless NO_PROXY covers the endpoint (aiohttp's trust_env would read the
        # environment and ~/.netrc again on every request, in a thread)
        proxies = meta.config.proxies or get_environ_proxies(self._url)
        self._proxy: str | None = proxies.get(urlsplit(self._url).scheme)
        self._http: aiohttp.ClientSession | None = None

    @property
    def proxy(self) -> str | None:
        """The proxy requests go through (None: direct)."""
        return self._proxy

    async def __aenter__(self) -> LeanSqs:
        """Open the HTTP session: TLS verified against botocore's CA bundle (`AWS_CA_BUNDLE` /
        `ca_bundle` when set, else the one botocore ships or certifi's), through the proxy
        botocore would use."""
        context = ssl.create_default_context(cafile=self._ca_bundle or get_cert_path(True))
        connector = aiohttp.TCPConnector(limit=self._connections, enable_cleanup_closed=True, ssl=context)
        self._http = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers={"User-Agent": USER_AGENT}
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def signed(
        self, operation: str, params: dict[str, Any], credentials: Any, timestamp: str | None = None
    ) -> AWSRequest:
        """The signed `AWSRequest` for `operation`: botocore's JSON body (`json.dumps` of the
        parameters, in their order) and headers, signed by `SigV4Auth` at `timestamp`
        (`YYYYMMDDTHHMMSSZ`, UTC; now if None)."""
        request = AWSRequest(
            method="POST",
            url=self._url,
            data=json.dumps(params).encode(),
            headers={"X-Amz-Target": f"{self._target}.{operation}", "Content-Type": _JSON, "x-amzn-query-mode": "true"},
        )
        signer = _Signer(credentials, self._signing_name, self._region, self._signing_keys)
        if timestamp is None:
            signer.add_auth(request)
        else:  # what add_auth does, at a given time (for the equality test against botocore)
            request.context["timestamp"] = timestamp
            signer._modify_request_before_signing(request)
            signature = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
            signer._inject_signature_to_request(request, signature)
        return request

    async def call(self, operation: str, **params: Any) -> dict[str, Any]:
        """One call of `operation` (one of `LEAN_OPERATIONS`), retried as botocore's standard mode."""
        attempt = 1
        while True:
            try:
                return await self._send(operation, params)
            except NoCredentialsError:
                raise
            except Exception as exc:  # classified by botocore's retry conditions below
                delay = self._retry_delay(operation, attempt, exc)
                if delay is None:
                    raise
            await anyio.sleep(delay)
            attempt += 1

    def _retry_delay(self, operation: str, attempt: int, exc: Exception) -> float | None:
        """Seconds to wait before the next attempt, or None when `exc` is final."""
        if isinstance(exc, ClientError):
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            context = RetryContext(
                attempt,
                operation_model=self._service.operation_model(operation),
                parsed_response=exc.response,
                http_response=_Status(status),
            )
        elif isinstance(exc, HTTPClientError):  # an answer that is not SQS JSON
            context = RetryContext(attempt, caught_exception=exc)
        elif isinstance(exc, aiohttp.ClientError | OSError | TimeoutError):
            context = RetryContext(attempt, caught_exception=HTTPClientError(error=exc))
        else:
            return None
        if not self._retry.is_retryable(context):
            return None
        return float(self._backoff.delay_amount(context))

    async def frozen_credentials(self) -> Any:
        """The credentials to sign with now (botocore's `ReadOnlyCredentials`), refreshed by the
        provider that gave them when they are about to expire.

        Raises:
            NoCredentialsError: the chain found none.
        """
        credentials = await self._credentials.get_frozen_credentials() if self._credentials is not None else None
        if credentials is None or credentials.access_key is None:
            raise NoCredentialsError()
        return credentials

    async def _send(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        credentials = await self.frozen_credentials()
        request = self.signed(operation, params, credentials)
        assert self._http is not None, "LeanSqs used outside `async with`"
        headers = dict(request.headers.items())
        async with self._http.post(self._url, data=request.data, headers=headers, proxy=self._proxy) as response:
            body = await response.read()
            if response.status == 200:
                try:
                    return _decoded(operation, body)
                except (msgspec.DecodeError, ValueError) as exc:  # e.g. a proxy's HTML page: a transport fault
                    raise HTTPClientError(
                        error=f"{operation} answered 200 with a body that is not SQS JSON: {exc}"
                    ) from exc
            answer_headers = {k.lower(): v for k, v in response.headers.items()}
        raise self._error(operation, response.status, answer_headers, body)

    def _error(self, operation: str, status: int, headers: dict[str, str], body: bytes) -> Exception:
        """The client's own exception for an error answer, parsed by botocore's JSON parser."""
        shape = self._service.operation_model(operation).output_shape
        parsed = self._error_parser.parse({"status_code": status, "headers": headers, "body": body}, shape)
        parsed.setdefault("ResponseMetadata", {}).update(HTTPStatusCode=status, HTTPHeaders=headers)
        error = parsed.get("Error", {})
        code = error.get("QueryErrorCode") or error.get("Code", "")  # how botocore's client picks the class
        error_class = self._client.exceptions.from_code(code)
        exception: Exception = error_class(parsed, operation)
        return exception


def total_attempts(retries: dict[str, Any] | None) -> int:
    """Attempts per call (the first included) of a botocore `retries` config: `total_max_attempts`,
    or `max_attempts` + 1 — botocore counts `max_attempts` as retries after the first attempt."""
    retries = retries or {}
    if "total_max_attempts" in retries:
        return int(retries["total_max_attempts"])
    if "max_attempts" in retries:
        return int(retries["max_attempts"]) + 1
    return DEFAULT_ATTEMPTS


_decode = msgspec.json.Decoder(dict[str, Any])


def _decoded(operation: str, body: bytes) -> dict[str, Any]:
    """A success answer as botocore gives it: `BinaryValue`s of received messages as bytes. A value
    that is not base64 stays a string (the source skips it: that message loses one attribute,
    the batch nothing).

    Raises:
        msgspec.DecodeError: the body is not a JSON object.
    """
    answer = _decode.decode(body) if body else {}
    messages = answer.get("Messages") if operation == "ReceiveMessage" else None
    for message in messages if isinstance(messages, list) else ():
        attributes = message.get("MessageAttributes") if isinstance(message, dict) else None
        for value in attributes.values() if isinstance(attributes, dict) else ():
            if isinstance(value, dict) and isinstance(value.get("BinaryValue"), str):
                with contextlib.suppress(ValueError):
                    value["BinaryValue"] = base64.b64decode(value["BinaryValue"], validate=True)
    return answer
