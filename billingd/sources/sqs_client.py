"""Making an SQS client, in one place (the transport, the operator tools, `billingd check`)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session

import billingd
from billingd.config.model import SqsSourceSettings

if TYPE_CHECKING:
    from billingd.sources.sqs_lean import LeanSqs

#: botocore's documented `user_agent` knob: a fixed User-Agent takes its short path instead of
#: rebuilding the full one on every call (measured: about a sixth of botocore's CPU per call).
USER_AGENT = f"billingd/{billingd.__version__}"


def client_config(**options: Any) -> AioConfig:
    """An `AioConfig` with billingd's User-Agent and `options` (connect_timeout, retries, …)."""
    return AioConfig(user_agent=USER_AGENT, **options)


def sqs_client(settings: SqsSourceSettings, config: AioConfig | None = None, session: AioSession | None = None) -> Any:
    """An aiobotocore SQS client for `settings` (an async context manager): its region and
    endpoint, credentials from the standard AWS chain (environment, profile, web identity,
    container or instance role, SSO) of `session` (a new one if None)."""
    return (session or get_session()).create_client(
        "sqs",
        region_name=settings.region,
        endpoint_url=settings.endpoint_url or None,
        config=config or client_config(),
    )


async def open_source_clients(
    stack: contextlib.AsyncExitStack, settings: SqsSourceSettings, *, connections: int
) -> tuple[Any, LeanSqs | None]:
    """The clients of an SQS source, entered into `stack`: the aiobotocore client (every call;
    `parameter_validation` off — billingd builds every parameter, and botocore's check costs
    ~7 % of a call) and, with `sqs_client = "lean"`, the lean path for the calls that carry the
    traffic, sharing the client's credential chain and endpoint.

    Nothing is sent here: an unreachable endpoint or missing credentials raise at the first call.
    """
    from billingd.sources.sqs_lean import LeanSqs

    read_timeout = settings.wait_time + 10  # a long poll's wait, plus a margin
    config = client_config(
        connect_timeout=5,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": 3},
        max_pool_connections=connections,
        parameter_validation=False,
    )
    session = get_session()
    client = await stack.enter_async_context(sqs_client(settings, config, session))
    if settings.sqs_client != "lean":
        return client, None
    lean = LeanSqs(
        client,
        await session.get_credentials(),
        read_timeout=read_timeout,
        connections=connections,
        ca_bundle=session.get_config_variable("ca_bundle"),  # AWS_CA_BUNDLE or a profile's ca_bundle
    )
    return client, await stack.enter_async_context(lean)
