"""Serve the Stripe double and a recording sink as processes, for the local stack.

    uv run python -m tests.doubles.serve [--stripe-port 12111] [--sink-port 12112]

`GET /_double/requests` on either port lists what it received (Stripe: `meter_events` and the
invoices it holds). The Stripe double keeps Stripe's live-mode contract: `--latency` seconds per
request (default 0.15), its rate limits and one v1 meter event call per customer and meter.
`POST /_double/objects/<products|customers|invoices>` (JSON) creates a Stripe object, as the
local stack's traffic does before sending events about it.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

from billingd.testing.server import Double, Sink
from billingd.testing.stripe import StripeContract, StripeDouble


def with_inspection(double: Double) -> Double:
    original = double.app

    def app() -> web.Application:
        application = original()

        async def requests(_request: web.Request) -> web.Response:
            body = {
                "requests": [
                    {"method": r.method, "path": r.path, "body": r.body.decode(errors="replace")}
                    for r in double.requests[-100:]
                ],
                "count": len(double.requests),
            }
            if isinstance(double, StripeDouble):
                body["meter_events"] = double.meter_events[-100:]
                body["meter_events_recorded"] = len(double.meter_events)
                body["answered_429"] = double.rate_limited
                body["invoices"] = list(double.objects["invoices"].values())[-100:]
            return web.json_response(body)

        async def create(request: web.Request) -> web.Response:
            assert isinstance(double, StripeDouble)
            return web.json_response(double.add(request.match_info["resource"], await request.json()))

        application.router.add_get("/_double/requests", requests)
        if isinstance(double, StripeDouble):
            application.router.add_post("/_double/objects/{resource}", create)
        return application

    double.app = app  # type: ignore[method-assign]
    return double


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stripe-port", type=int, default=12111)
    parser.add_argument("--sink-port", type=int, default=12112)
    parser.add_argument(
        "--latency", type=float, default=0.15, help="seconds per Stripe request (Stripe's own: 100-300 ms)"
    )
    args = parser.parse_args()
    contract = StripeContract.live(args.latency)  # live mode's rate limits and one v1 call per customer and meter
    stripe, sink = with_inspection(StripeDouble(contract)), with_inspection(Sink())
    async with stripe.running(args.stripe_port), sink.running(args.sink_port):
        print(f"stripe double on {stripe.url}, sink on {sink.url}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
