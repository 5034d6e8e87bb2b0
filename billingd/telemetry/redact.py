"""Keeping secrets out of everything billingd writes: logs, `/readyz`, dead-letter reasons, CLI output.

Two layers:

* **structural** (`scrub`, no state): the password of any URL (`scheme://user:****@host`), the
  values of query parameters that carry credentials (`?code=`, `?token=`, `X-Amz-Signature`, …),
  `Authorization` / `Proxy-Authorization` values, and PEM private keys — whatever text they
  appear in (a library's exception, a forwarded URL);
* **by value** (`Redactor`): every secret of the configuration (`billingd.config.secrets`: the Stripe and
  Razorpay keys and webhook secrets, Redis's password, URL passwords, credential-like handler
  options) and of the environment (AWS secret keys and session tokens, proxy passwords), wherever
  it appears — also inside a longer string, percent-encoded, or as the Base64 of `user:password`.

A `Redactor` only grows (a reload adds the new configuration's secrets; an old one stays masked).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any
from urllib.parse import quote, urlsplit

MASK = "****"
#: Secrets shorter than this are masked only structurally (`guest` would mask every "guest").
MIN_SECRET = 8

_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:'\"]*):(?P<password>[^\s@'\"/]+)@")
_QUERY = re.compile(
    r"(?i)(?P<head>[?&](?:token|code|key|sig|signature|secret|password|passwd|pwd|access_token|api_key|apikey"
    r"|x-amz-signature|x-amz-security-token|x-amz-credential)=)[^&#\s'\"]+"
)
_AUTHORIZATION = re.compile(
    r"(?i)(?P<head>\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?(?:(?:basic|bearer|aws4-hmac-sha256)\s+)?)"
    r"[^\s\"',}]+"
)
_PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S)


def scrub(text: str) -> str:
    """`text` with URL passwords, credential query values, Authorization values and PEM private
    keys replaced by `****` (the structural layer: see module docstring)."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = _QUERY.sub(lambda m: f"{m['head']}{MASK}", text)
    text = _AUTHORIZATION.sub(lambda m: f"{m['head']}{MASK}", text)
    return _PEM_KEY.sub(f"-----BEGIN PRIVATE KEY-----{MASK}-----END PRIVATE KEY-----", text)


def credential_query_values(query: str) -> set[str]:
    """The values of `query`'s credential-carrying parameters (`a=1&token=x` → `{"x"}`)."""
    return {m.group(0).split("=", 1)[1] for m in _QUERY.finditer("?" + query)}


def redact_url(url: str) -> str:
    """`url` for printing: its password and credential-carrying query values masked."""
    return scrub(url)


def bare_url(url: str) -> str:
    """`url` for printing where its query may carry a credential under any name (a forwarding
    target's `?code=` or SAS token): scheme, host, port and path only — user and query dropped."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    query = "?…" if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{query}"


class Redactor:
    """Masks known secret values (and everything `scrub` masks) in text and in log events.

    `values` are the secrets to mask (`secrets_of`); shorter than `MIN_SECRET` characters are
    left to the structural layer. Thread-safe; used as a structlog processor (`__call__`)."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        """Mask `values` from now on (with their percent-encoded and `user:value` Base64 forms)."""
        forms: set[str] = set()
        for value in values:
            if len(value) < MIN_SECRET:
                continue
            forms |= {value, quote(value, safe=""), quote(value)}
        with self._lock:
            if forms <= self._values:
                return
            self._values |= forms
            ordered = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))

    def scrub(self, text: str) -> str:
        """`text` with every known secret and every structural secret masked."""
        pattern = self._pattern
        if pattern is not None and text:
            text = pattern.sub(MASK, text)
        return scrub(text)

    def scrub_obj(self, obj: Any) -> Any:
        """`obj` with every string in it scrubbed (dicts, lists and tuples are copied)."""
        if isinstance(obj, str):
            return self.scrub(obj)
        if isinstance(obj, Mapping):
            return {k: self.scrub_obj(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(self.scrub_obj(v) for v in obj)
        return obj

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """The structlog processor: every value of the event scrubbed (after `format_exc_info`, so
        tracebacks are too)."""
        for name, value in list(event.items()):
            if isinstance(value, str):
                event[name] = self.scrub(value)
            elif isinstance(value, Mapping | list | tuple):
                event[name] = self.scrub_obj(value)
            elif isinstance(value, BaseException):
                event[name] = self.scrub(f"{type(value).__name__}: {value}")
        return event
