"""The only HTTP surface (DESIGN §6): `/metrics`, `/healthz`, `/readyz`; everything else is 404.

* `/metrics` — the daemon's Prometheus registry, text exposition format;
* `/healthz` — 200 while the event loop ticks and the supervisor runs (liveness);
* `/readyz` — 200 only when not draining and every source is connected (readiness); the JSON
  body says, per source, why not.
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class Observable(Protocol):
    """What the HTTP surface reads from the daemon."""

    registry: CollectorRegistry

    def health(self) -> tuple[bool, dict[str, object]]:
        """(alive, body) for `/healthz`."""
        ...

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """(ready, body) for `/readyz`."""
        ...


def make_app(daemon: Observable) -> web.Application:
    """The aiohttp application serving the three endpoints (GET and HEAD)."""

    async def metrics(request: web.Request) -> web.Response:
        if "application/openmetrics-text" in request.headers.get("Accept", ""):
            # OpenMetrics carries exemplars: the trace id of a sampled message per duration bucket
            from prometheus_client.openmetrics import exposition as openmetrics

            body = openmetrics.generate_latest(daemon.registry)  # type: ignore[no-untyped-call]
            return web.Response(body=body, headers={"Content-Type": openmetrics.CONTENT_TYPE_LATEST})
        body = generate_latest(daemon.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        ok, body = daemon.health()
        return web.json_response(body, status=200 if ok else 503)

    async def readyz(_request: web.Request) -> web.Response:
        ok, body = daemon.readiness()
        return web.json_response(body, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_http(daemon: Observable, host: str, port: int) -> web.AppRunner:
    """Serve `make_app(daemon)` on `host:port`; `await runner.cleanup()` stops it.

    Raises:
        OSError: the address is in use or cannot be bound.
    """
    runner = web.AppRunner(make_app(daemon), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
