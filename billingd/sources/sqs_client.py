"""Making an SQS client, in one place (the transport, the operator tools, `billingd check`)."""

from __future__ import annotations

from typing import Any

import aioboto3
from aiobotocore.config import AioConfig

from billingd.config.model import SqsSourceSettings


def sqs_client(settings: SqsSourceSettings, config: AioConfig | None = None) -> Any:
    """An aioboto3 SQS client for `settings` (an async context manager): its region and endpoint,
    credentials from the standard AWS chain (environment, profile, instance or pod role)."""
    return aioboto3.Session().client(
        "sqs", region_name=settings.region, endpoint_url=settings.endpoint_url or None, config=config
    )
