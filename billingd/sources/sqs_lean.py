"""The lean SQS path: the three calls that carry the traffic, without botocore's per-call machinery.

`ReceiveMessage`, `DeleteMessageBatch` and `ChangeMessageVisibilityBatch` are sent as the
AWS JSON 1.0 requests the SDK sends (`POST /`, `X-Amz-Target: AmazonSQS.<Operation>`,
`Content-Type: application/x-amz-json-1.0`, `x-amzn-query-mode: true`; Amazon SQS API
Reference, "Making API requests", and botocore's SQS service model) over one aiohttp session,
signed by botocore's own `SigV4Auth` with credentials from the aiobotocore session (the whole
chain — environment, profile, web identity/IRSA, container, IMDS, SSO — with its refresh), to
the endpoint botocore resolved for the client (`client.meta.endpoint_url`), through the proxy
botocore picks for it (`botocore.httpsession.ProxyConfiguration`). Answers are decoded by
msgspec; `BinaryValue`s come back as bytes, as botocore gives them.

What the lean path leaves out, measured (`bench/compare.py sqs`): botocore rebuilding its
User-Agent, validating parameters, walking the output shape, and preparing an `AWSRequest`
per call. What it keeps: the same request bytes and signature
(`tests/unit/test_sqs_lean_equivalence.py` compares method, URL, body, signed headers and
`Authorization` with botocore's at a frozen clock), the same errors — error answers are parsed
by botocore's own JSON parser and raised as the client's own modeled `ClientError` subclasses
(`x-amzn-query-error` gives `Error.Code`, e.g. `AWS.SimpleQueueService.NonExistentQueue`), an
endpoint that does not answer as the botocore exception aiobotocore raises for it — per-entry
batch failures untouched in `Failed`, and botocore's standard retry mode, by its own classes
(`botocore.retries.standard`): the client's attempts; transient, throttling and
modeled-retryable errors; jittered exponential backoff; and the retry quota, a token bucket of
500 that a retry takes 5 from (10 after a timeout) and a success gives back, so that when most
calls fail, calls stop retrying. Credentials are resolved per attempt before the request, as
botocore signs each attempt, and outside the retried block: a failed refresh is raised at once,
never retried as an SQS error.

Every other call (`GetQueueAttributes`, `SendMessageBatch` to the DLQ, single-entry fallbacks)
stays on the aiobotocore client: they are rare, and the DLQ's attributes need botocore's
serialiser.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import msgspec
from aiohttp.http_exceptions import BadStatusLine
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    ProxyConnectionError,
    ReadTimeoutError,
    SSLError,
)
from botocore.httpsession import ProxyConfiguration, get_cert_path, mask_proxy_url
from botocore.parsers import create_parser
from botocore.retries.quota import RetryQuota
from botocore.retries.standard import ExponentialBackoff, RetryContext, RetryQuotaChecker, StandardRetryConditions
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
    The result is botocore's, byte for byte (`tests/unit/test_sqs_lean_equivalence.py` compares
    the `Authorization` of both)."""

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
    """What the retry checkers and the quota read of an HTTP answer (botocore's `AWSResponse.status_code`)."""

    status_code: int


_OK = _Status(200)


class LeanSqs:
    """Sends `LEAN_OPERATIONS` for one aiobotocore SQS `client`, over its own aiohttp session.

    `call(operation, **params)` takes and returns what `client.<operation>(**params)` does
    (botocore's parameter and response shapes, minus `ResponseMetadata`) and raises what it
    raises: the client's modeled `ClientError`s, the credential chain's errors
    (`NoCredentialsError`, a failed refresh), and for an endpoint that does not answer the
    botocore exception aiobotocore raises (`EndpointConnectionError`, `ConnectTimeoutError`,
    `ReadTimeoutError`, `ConnectionClosedError`, `ProxyConnectionError`, `SSLError`; after the
    retries); an answer that is not SQS's JSON raises botocore's `HTTPClientError` (transient, retried).
    """

    def __init__(
        self, client: Any, credentials: Any, *, read_timeout: float, connections: int, ca_bundle: str | None = None
    ) -> None:
        meta = client.meta
        config = meta.config
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
        self._retry = StandardRetryConditions(max_attempts=total_attempts(config.retries))
        self._backoff = ExponentialBackoff()
        # one quota per client, as `botocore.retries.standard.register_retry_handler` gives each
        # client (this one is the lean path's own: the aiobotocore client keeps its own for the rest)
        self._quota = RetryQuotaChecker(RetryQuota())
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=read_timeout)
        self._connections = connections
        self._ca_bundle = ca_bundle
        # botocore's choice of proxy, made once (`botocore.endpoint.EndpointCreator.create_endpoint`):
        # the client's `proxies` when set (even empty), else `get_environ_proxies` — HTTPS_PROXY /
        # HTTP_PROXY unless NO_PROXY covers the endpoint (`should_bypass_proxies`); then
        # `ProxyConfiguration.proxy_url_for` picks the endpoint scheme's and gives a scheme-less one
        # `http://`, and `proxy_headers_for` its Basic credentials (urllib3's `URLLib3Session` does so).
        # aiohttp's trust_env would read the environment and ~/.netrc again on every request, in a thread.
        proxies = config.proxies if config.proxies is not None else get_environ_proxies(meta.endpoint_url)
        self._proxy_config = ProxyConfiguration(proxies=proxies, proxies_settings=config.proxies_config)
        self._proxy: str | None = self._proxy_config.proxy_url_for(self._url)
        self._proxy_headers: dict[str, str] | None = None
        if self._proxy is not None:
            self._proxy_headers = self._proxy_config.proxy_headers_for(self._proxy) or None
        self._http: aiohttp.ClientSession | None = None

    @property
    def proxy(self) -> str | None:
        """The proxy requests go through (None: direct)."""
        return self._proxy

    async def __aenter__(self) -> LeanSqs:
        """Open the HTTP session: TLS verified against botocore's CA bundle (`AWS_CA_BUNDLE` /
        `ca_bundle` when set, else the one botocore ships or certifi's) plus, through a proxy, the
        client's `proxies_config` `proxy_ca_bundle` and `proxy_client_cert` (as aiobotocore's
        `AIOHTTPSession` loads them)."""
        context = ssl.create_default_context(cafile=self._ca_bundle or get_cert_path(True))
        settings = self._proxy_config.settings if self._proxy else {}
        if settings.get("proxy_ca_bundle"):
            context.load_verify_locations(cafile=settings["proxy_ca_bundle"])
        certificate = settings.get("proxy_client_cert")
        if certificate:
            cert, key = certificate if isinstance(certificate, tuple) else (certificate, None)
            context.load_cert_chain(cert, keyfile=key)
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
        (`YYYYMMDDTHHMMSSZ`, UTC; now — `botocore.auth`'s clock — if None)."""
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
        """One call of `operation` (one of `LEAN_OPERATIONS`), retried as botocore's standard mode
        (`botocore.retries.standard.RetryHandler.needs_retry`, run by `aiobotocore.endpoint.AioEndpoint._send_request`).

        Each attempt is signed with the credentials of its time, resolved before the request as
        botocore's signer does at `request-created`; their errors are raised as they come (botocore
        resolves them outside the retried `_get_response`)."""
        context: dict[str, Any] = {}  # the call's request context: what the retry quota lent it
        attempt = 1
        while True:
            credentials = await self.frozen_credentials()
            try:
                answer = await self._send(operation, params, credentials)
            except (ClientError, BotoCoreError) as exc:  # an answer, or none: classified below
                delay = self._retry_delay(operation, attempt, exc, context)
                if delay is None and isinstance(exc, ClientError):  # made again: its text tells the retries
                    raise type(exc)(exc.response, operation) from None  # (botocore makes it after them)
                if delay is None:
                    raise
            else:
                # botocore's `after-call` handler: a success gives back what its retries took (1 if none)
                self._quota.release_retry_quota(context, _OK)
                return answer
            await anyio.sleep(delay)
            attempt += 1

    def _retry_delay(self, operation: str, attempt: int, exc: Exception, context: dict[str, Any]) -> float | None:
        """Seconds to wait before the next attempt, or None when `exc` is final: not retryable,
        the last attempt, or the quota spent (`RetryHandler.needs_retry`). A `ClientError`'s
        `ResponseMetadata` gets what botocore adds: `RetryAttempts`, and `MaxAttemptsReached` or
        `RetryQuotaReached` (`RetryEventAdapter.adapt_retry_response_from_context`)."""
        if isinstance(exc, ClientError):
            metadata = exc.response.setdefault("ResponseMetadata", {})
            retry = RetryContext(
                attempt,
                operation_model=self._service.operation_model(operation),
                parsed_response=exc.response,
                http_response=_Status(int(metadata.get("HTTPStatusCode", 0))),
                request_context=context,
            )
        else:
            retry = RetryContext(attempt, caught_exception=exc, request_context=context)
        delay = None
        if self._retry.is_retryable(retry) and self._quota.acquire_retry_quota(retry):
            delay = float(self._backoff.delay_amount(retry))
        if isinstance(exc, ClientError):
            exc.response["ResponseMetadata"].update(retry.get_retry_metadata(), RetryAttempts=attempt - 1)
        return delay

    async def frozen_credentials(self) -> Any:
        """The credentials to sign with now (botocore's `ReadOnlyCredentials`), refreshed by the
        provider that gave them when they are about to expire.

        Raises:
            NoCredentialsError: the chain found none.
            Exception: what a failed refresh raised (e.g. `CredentialRetrievalError`, STS's `ClientError`).
        """
        credentials = await self._credentials.get_frozen_credentials() if self._credentials is not None else None
        if credentials is None or credentials.access_key is None:
            raise NoCredentialsError()
        return credentials

    async def _send(self, operation: str, params: dict[str, Any], credentials: Any) -> dict[str, Any]:
        request = self.signed(operation, params, credentials)
        assert self._http is not None, "LeanSqs used outside `async with`"
        headers = dict(request.headers.items())
        try:
            async with self._http.post(
                self._url, data=request.data, headers=headers, proxy=self._proxy, proxy_headers=self._proxy_headers
            ) as response:
                status, body = response.status, await response.read()
                answer_headers = {} if status == 200 else {k.lower(): v for k, v in response.headers.items()}
        except Exception as exc:  # as aiobotocore, whatever the HTTP client raised is a botocore error
            raise _transport_error(exc, self._url, self._proxy) from exc
        if status == 200:
            try:
                return _decoded(operation, body)
            except (msgspec.DecodeError, ValueError) as exc:  # e.g. a proxy's HTML page: a transport fault
                raise HTTPClientError(
                    error=f"{operation} answered 200 with a body that is not SQS JSON: {exc}"
                ) from exc
        raise self._error(operation, status, answer_headers, body)

    def _error(self, operation: str, status: int, headers: dict[str, str], body: bytes) -> Exception:
        """The client's own exception for an error answer, parsed by botocore's JSON parser, with
        the members of a modeled error (e.g. `message`) as `Endpoint._add_modeled_error_fields` adds them."""
        answer = {"status_code": status, "headers": headers, "body": body}
        parsed = self._error_parser.parse(answer, self._service.operation_model(operation).output_shape)
        parsed.setdefault("ResponseMetadata", {}).update(HTTPStatusCode=status, HTTPHeaders=headers)
        error = parsed.get("Error", {})
        modeled = self._service.shape_for_error_code(error["Code"]) if error.get("Code") is not None else None
        if modeled is not None:
            parsed.update(self._error_parser.parse(answer, modeled))
        code = error.get("QueryErrorCode") or error.get("Code", "")  # how botocore's client picks the class
        error_class = self._client.exceptions.from_code(code)
        exception: Exception = error_class(parsed, operation)
        return exception


def _transport_error(exc: Exception, url: str, proxy: str | None) -> BotoCoreError:
    """The botocore exception for what aiohttp raised when sending to `url`, as aiobotocore's
    `AIOHTTPSession.send` (aiobotocore/httpsession.py) maps it — the retry checkers and the
    quota read the class: a timeout costs the quota twice as much as another fault."""
    if isinstance(exc, aiohttp.ClientSSLError):
        return SSLError(endpoint_url=url, error=exc)
    if isinstance(exc, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
        return ProxyConnectionError(proxy_url=mask_proxy_url(proxy) if proxy else proxy, error=exc)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | BadStatusLine):
        return ConnectionClosedError(error=exc, endpoint_url=url)
    if isinstance(exc, aiohttp.ServerTimeoutError):
        if str(exc).lower().startswith("connect"):
            return ConnectTimeoutError(endpoint_url=url, error=exc)
        return ReadTimeoutError(endpoint_url=url, error=exc)
    if isinstance(exc, aiohttp.ClientConnectionError | socket.gaierror):
        return EndpointConnectionError(endpoint_url=url, error=exc)
    if isinstance(exc, TimeoutError):
        return ReadTimeoutError(endpoint_url=url, error=exc)
    return HTTPClientError(error=exc)


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
