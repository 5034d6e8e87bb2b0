"""An HTTP forwarder (aiohttp) behind a `forward:<name>` guard: POST a body, classify the answer.

2xx is success; 429, 5xx, a timeout or no connection is transient (`DownstreamUnavailable`,
retried through the breaker); any other status is permanent (`DownstreamRejected`, dead-lettered
with the status and the first 200 characters of the response).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

from billingd.clients.errors import DownstreamRejected, DownstreamUnavailable, Guard
from billingd.telemetry.redact import bare_url, scrub
from billingd.telemetry.tracing import child_span

SNIPPET = 200


class HttpForwarder:
    """POSTs to one downstream; `name` is the breaker name (`forward:<x>`)."""

    def __init__(self, name: str, guard: Guard, timeout: float = 10.0, tracer: Any = None) -> None:
        self._tracer = tracer
        self.name = name
        self._guard = guard
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        """POST `body` to `url` and return the 2xx status.

        Raises:
            DownstreamUnavailable: 429, 5xx, timeout, connection refused (or CircuitOpen).
            DownstreamRejected: any other non-2xx status.
        """
        if self._tracer is None:
            return await self._guard.call(self._post, url, body, headers)
        with child_span(self._tracer, f"POST {self.name}", {"http.request.method": "POST", "url.full": bare_url(url)}):
            return await self._guard.call(self._post, url, body, headers)

    async def _post(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(url, data=body, headers=dict(headers)) as response:
                status = response.status
                snippet = (await response.text(errors="replace"))[:SNIPPET]
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            text = scrub(str(exc).replace(url, bare_url(url)))  # aiohttp's InvalidURL is the whole URL
            raise DownstreamUnavailable(self.name, f"POST {bare_url(url)}: {type(exc).__name__}: {text}") from exc
        if 200 <= status < 300:
            return status
        detail = f"POST {bare_url(url)}: HTTP {status}: {snippet}"
        if status == 429 or status >= 500:
            raise DownstreamUnavailable(self.name, detail)
        raise DownstreamRejected(self.name, detail)

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
