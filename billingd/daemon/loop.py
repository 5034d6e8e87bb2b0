"""Which event loop `billingd run` uses: uvloop where installed and not switched off (`[daemon] uvloop`)."""

from __future__ import annotations

import importlib.util
from typing import Any


def loop_options(use_uvloop: bool) -> dict[str, Any]:
    """anyio `backend_options` for the asyncio backend: `{"use_uvloop": True}` when `use_uvloop`
    is set and the uvloop package can be imported (it is a dependency except on Windows), else
    `{}` (asyncio's own loop)."""
    if use_uvloop and importlib.util.find_spec("uvloop") is not None:
        return {"use_uvloop": True}
    return {}


def loop_name() -> str:
    """The running event loop's kind, for the start-up log line: `uvloop` or `asyncio`."""
    import asyncio

    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
