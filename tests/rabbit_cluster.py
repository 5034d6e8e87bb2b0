"""A real 3-node RabbitMQ cluster on loopback for the tests (Debian's `rabbitmq-server`), beside
the machine's own broker on 5672, which it leaves alone: nodes `billingd-a@localhost` … on spare
ports, each with its own data and log directories, one shared Erlang cookie, no plugins; nodes
b and c join a. `kill(node)` SIGKILLs a node's Erlang VM; `start(node)` brings it back."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.cluster import _free

BIN = Path("/usr/lib/rabbitmq/bin")


class RabbitCluster:
    """Three RabbitMQ nodes joined into one cluster (see module docstring)."""

    def __init__(self, names: tuple[str, ...] = ("a", "b", "c"), conf: str = "") -> None:
        self.conf = conf
        """More `rabbitmq.conf` lines for every node (a TLS listener, say)."""
        self.directory = Path(tempfile.mkdtemp(prefix="billingd-rabbit-"))
        self.cookie = secrets.token_hex(16)
        (self.directory / ".erlang.cookie").write_text(self.cookie)
        (self.directory / ".erlang.cookie").chmod(0o400)
        (self.directory / "enabled_plugins").write_text("[].\n")
        self.names = names
        self.ports: dict[str, int] = {}
        port = 25700
        for name in names:
            while not (_free(port) and _free(port + 20000)):
                port += 1
            self.ports[name] = port
            port += 1

    def node(self, name: str) -> str:
        return f"billingd-{name}@localhost"

    def url(self, name: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.ports[name]}/"

    @property
    def urls(self) -> list[str]:
        return [self.url(name) for name in self.names]

    def _env(self, name: str) -> dict[str, str]:
        base = self.directory / name
        return {
            **os.environ,
            "HOME": str(self.directory),
            "RABBITMQ_NODENAME": self.node(name),
            "RABBITMQ_NODE_PORT": str(self.ports[name]),
            "RABBITMQ_DIST_PORT": str(self.ports[name] + 20000),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
            "ERL_CRASH_DUMP": str(base / "erl_crash.dump"),  # never into the work tree
            # the guest user may log in over loopback only, which is all this cluster serves
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-rabbit loopback_users []",
        }

    def ctl(self, name: str, *args: str, check: bool = True, timeout: float = 60) -> str:
        """`rabbitmqctl -n <node> args…` as the cluster's Erlang user; its output."""
        result = subprocess.run(
            [str(BIN / "rabbitmqctl"), "-n", self.node(name), *args],
            env=self._env(name),
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {name}: {result.stdout}{result.stderr}")
        return result.stdout

    def start(self, name: str) -> None:
        """Start node `name` (detached) and wait until it runs."""
        base = self.directory / name
        (base / "log").mkdir(parents=True, exist_ok=True)
        (base / "rabbitmq.conf").write_text("loopback_users = none\n" + self.conf)
        with (base / "log" / "console.log").open("ab") as console:
            subprocess.Popen(
                [str(BIN / "rabbitmq-server")], env=self._env(name), stdout=console, stderr=console,
                start_new_session=True, cwd=base,
            )  # fmt: skip
        deadline = time.monotonic() + 90
        while True:  # the node registers with epmd a moment after its VM starts
            try:
                self.ctl(name, "await_startup", "--timeout", "60", timeout=90)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def start_cluster(self) -> None:
        first, *others = self.names
        for name in self.names:
            self.start(name)
        for name in others:
            self.ctl(name, "stop_app")
            self.ctl(name, "join_cluster", self.node(first))
            self.ctl(name, "start_app")
        self.ctl(first, "await_online_nodes", str(len(self.names)), timeout=60)

    def pid(self, name: str) -> int:
        return int((self.directory / name / "pid").read_text().strip())

    def kill(self, name: str) -> None:
        """SIGKILL node `name`'s Erlang VM: no goodbye to clients or to the other nodes."""
        os.kill(self.pid(name), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _free(self.ports[name]) is False and time.monotonic() < deadline:
            time.sleep(0.05)

    def leader(self, queue: str, via: str) -> str:
        """The name (a, b, c) of the node leading quorum queue `queue`."""
        out = self.ctl(via, "list_queues", "-q", "--no-table-headers", "name", "leader")
        for line in out.splitlines():
            parts = line.split("\t")
            if parts[0] == queue:
                return next(n for n in self.names if self.node(n) == parts[1].strip())
        raise LookupError(queue)

    def stop(self) -> None:
        for name in self.names:
            try:
                os.kill(self.pid(name), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        shutil.rmtree(self.directory, ignore_errors=True)
