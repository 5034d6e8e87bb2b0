"""The services and processes of the fault suite (`bench/faults.py`): a private Redis, a private
fauxqs, billingd replicas as real processes, and RabbitMQ connection kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio

from tests.support import fauxqs_cli, free_port, http_ready

ROOT = Path(__file__).resolve().parents[1]
FAUXQS = fauxqs_cli()


class Fauxqs:
    """A fauxqs (SQS emulator) process of our own on a free port, installed from npm if missing."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def queue_url(self, name: str) -> str:
        """The URL fauxqs gives queue `name` (pass it verbatim as QueueUrl)."""
        return f"http://sqs.us-east-1.localhost:{self.port}/000000000000/{name}"

    async def start(self) -> None:
        if not FAUXQS.exists():
            await anyio.run_process(
                [
                    "npm",
                    "install",
                    "--silent",
                    "--no-audit",
                    "--no-fund",
                    "--prefix",
                    str(FAUXQS.parents[3]),
                    "fauxqs@1.9.2",
                ],
                check=True,
            )
        env = {**os.environ, "FAUXQS_PORT": str(self.port), "FAUXQS_LOGGER": "false"}
        self._process = subprocess.Popen(
            ["node", str(FAUXQS)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        import aiohttp

        with anyio.fail_after(30):
            while True:
                try:
                    async with aiohttp.ClientSession() as session, session.get(f"{self.endpoint}/health") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await anyio.sleep(0.1)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)


class Replica:
    """One `billingd run` process; its stderr (JSON logs) is appended to `log` across restarts."""

    def __init__(self, index: int, config: Path, port: int, log: Path, env: dict[str, str]) -> None:
        self.index = index
        self.config = config
        self.port = port
        self.log = log
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "billingd", "run", "--config", str(self.config)],
                stderr=out,
                stdout=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                cwd=ROOT,
            )
        with anyio.fail_after(60):
            while not await http_ready(self.port):
                if self.process.poll() is not None:
                    raise RuntimeError(f"replica {self.index} exited with {self.process.returncode} at start")
                await anyio.sleep(0.1)

    async def terminate(self) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds to exit); waits at most a minute."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(self.process.wait, 60)
        return code, time.monotonic() - started

    async def kill(self) -> int:
        assert self.process is not None
        self.process.kill()
        return await anyio.to_thread.run_sync(self.process.wait, 30)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


async def kill_billingd_connections() -> int:
    """Close every RabbitMQ connection billingd opened (named `billingd <source>`); returns how many."""
    listing = await anyio.run_process(
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "--formatter", "json", "-q"], check=False
    )
    try:
        connections = json.loads(listing.stdout.decode() or "[]")
    except json.JSONDecodeError:
        return 0
    closed = 0
    for connection in connections:
        properties = {p[0]: p[2] for p in connection.get("client_properties", [])}
        if str(properties.get("connection_name", "")).startswith("billingd "):
            await anyio.run_process(
                ["rabbitmqctl", "close_connection", connection["pid"], "fault suite: connection kill"], check=False
            )
            closed += 1
    return closed


async def queue_messages(names: list[str]) -> int:
    """Messages (ready + unacked) in the named RabbitMQ queues."""
    listing = await anyio.run_process(["rabbitmqctl", "list_queues", "name", "messages", "-q", "--no-table-headers"])
    wanted = set(names)
    total = 0
    for line in listing.stdout.decode().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in wanted:
            total += int(parts[1])
    return total
