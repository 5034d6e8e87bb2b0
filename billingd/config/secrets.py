"""The secret values of a configuration and of the environment, for `billingd.telemetry.redact`.

The keys billingd knows to be secret (`SECRET_KEYS` of the loader: Stripe's and Razorpay's keys and
webhook secrets, Redis's password), the password of every URL (Redis, AMQP nodes, SQS and API
endpoints, URLs in `handler_options`), `handler_options` values under credential-like names
(`token`, `secret`, `password`, …) and credential query values of their URLs; from the
environment, AWS secret keys and session tokens and the passwords of proxy variables. The Base64
of `user:password` (a Basic `Authorization`) is included for each URL with a password.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from billingd.config.model import AmqpSourceSettings, Settings, SqsSourceSettings
from billingd.telemetry.redact import credential_query_values

#: handler_options keys whose string values are credentials.
_SECRET_OPTION = re.compile(r"(?i)(token|secret|passw|auth|api_key|apikey|credential|signing_key)")
#: Environment variables whose values are secrets.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def secrets_of(settings: Settings, environ: Mapping[str, str]) -> set[str]:
    """Every secret value of `settings` and `environ` (see module docstring)."""
    found: set[str] = {
        settings.stripe.api_key,
        settings.stripe.webhook_secret,
        settings.razorpay.key_secret,
        settings.razorpay.webhook_secret,
        settings.redis.password,
    }
    urls = [settings.redis.url, settings.stripe.api_base, settings.stripe.meter_events_base, settings.razorpay.api_base]
    for source in settings.sources:
        if isinstance(source, AmqpSourceSettings):
            urls += source.urls
        elif isinstance(source, SqsSourceSettings):
            urls += [source.queue_url, source.dead_letter_queue_url, source.endpoint_url]
        found |= _option_secrets(source.handler_options, urls)
    found |= {password for url in urls if (password := _password(url))}
    found |= {environ[name] for name in SECRET_ENV if environ.get(name)}
    found |= {password for name in PROXY_ENV if (password := _password(environ.get(name, "")))}
    basic = set()
    for url in urls:
        parts = urlsplit(url) if "://" in url else None
        if parts is not None and parts.password:
            pair = f"{parts.username or ''}:{parts.password}".encode()
            basic.add(base64.b64encode(pair).decode())
    return {s for s in found | basic if s}


def _option_secrets(options: Any, urls: list[str], key: str = "") -> set[str]:
    """Credential-like values of `handler_options` (by key name), and its URLs (into `urls`)."""
    found: set[str] = set()
    if isinstance(options, Mapping):
        for name, value in options.items():
            found |= _option_secrets(value, urls, str(name))
    elif isinstance(options, list):
        for value in options:
            found |= _option_secrets(value, urls, key)
    elif isinstance(options, str):
        if "://" in options:
            urls.append(options)
            found |= credential_query_values(urlsplit(options).query)
        elif _SECRET_OPTION.search(key):
            found.add(options)
    return found


def _password(url: str) -> str:
    if "://" not in url:
        return ""
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""
