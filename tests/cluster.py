"""A real Redis Cluster on loopback for the tests: 3 masters and 3 replicas of Debian's
`redis-server` (`--cluster-enabled yes`), joined by `redis-cli --cluster create`."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class RedisClusterServer:
    """Six `redis-server` processes (AOF on) joined into a 3-master cluster with one replica each.

    `url` names a master; `ports` lists every node. `failover(port)` promotes the replica of the
    master on `port` with `CLUSTER FAILOVER` (coordinated: nothing acknowledged is lost)."""

    def __init__(self, nodes: int = 6, node_timeout_ms: int = 2000) -> None:
        self.ports = _cluster_ports(nodes)
        self.directory = Path(tempfile.mkdtemp(prefix="billingd-cluster-"))
        self.node_timeout_ms = node_timeout_ms
        self.url = f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        for port in self.ports:
            (self.directory / str(port)).mkdir()
            self._start_node(port)
        self._wait(lambda: all(self.cli(p, "ping") == "PONG" for p in self.ports), "nodes up")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        self._wait(self._ok, "cluster_state:ok on every node")

    def kill(self, port: int) -> None:
        """SIGKILL the node on `port` (no graceful failover: the cluster must notice and promote)."""
        pid = int((self.directory / str(port) / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)

    def restart(self, port: int) -> None:
        """Start a killed node again: it rejoins (as a replica of whoever took its slots)."""
        (self.directory / str(port) / "redis.pid").unlink(missing_ok=True)
        self._start_node(port)
        self._wait(lambda: self.cli(port, "ping") == "PONG", "node back")
        self._wait(self._ok, "cluster ok after the restart", 60)

    def wait_promoted(self, port: int, timeout: float = 30) -> None:
        """Wait until the cluster has replaced the dead master on `port` and is ok again."""
        alive = [p for p in self.ports if p != port]
        self._wait(
            lambda: all("cluster_state:ok" in self.cli(p, "cluster", "info") for p in alive), "promoted", timeout
        )

    def _start_node(self, port: int) -> None:
        node = self.directory / str(port)
        subprocess.run(
            [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "yes",
                "--cluster-enabled", "yes", "--cluster-config-file", str(node / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms), "--appendonly", "yes",
                "--appendfsync", "always", "--save", "", "--dir", str(node),
                "--pidfile", str(node / "redis.pid"), "--logfile", str(node / "redis.log"),
            ],
            check=True,
        )  # fmt: skip

    def cli(self, port: int, *args: str) -> str:
        """Run `redis-cli -p port args…`; its output, stripped."""
        result = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, check=False)
        return result.stdout.strip()

    def masters(self) -> list[int]:
        """Ports of the current masters."""
        return [p for p in self.ports if "role:master" in self.cli(p, "info", "replication")]

    def replica_of(self, master: int) -> int:
        """The port of a replica of the master on `master`."""
        node_id = self.cli(master, "cluster", "myid")
        for port in self.ports:
            info = self.cli(port, "cluster", "nodes")
            for line in info.splitlines():
                fields = line.split()
                if "myself" in fields[2] and "slave" in fields[2] and fields[3] == node_id:
                    return port
        raise LookupError(f"no replica of {master}")

    def failover(self, master: int) -> int:
        """Promote the replica of `master` (CLUSTER FAILOVER); returns the new master's port."""
        replica = self.replica_of(master)
        promoted = lambda: "role:master" in self.cli(replica, "info", "replication")  # noqa: E731
        # Redis aborts a manual failover whose replica has not caught up within 5 s (a busy
        # machine under load): ask again until it takes, for up to about 40 s.
        for attempt in range(1, 6):
            assert self.cli(replica, "cluster", "failover") == "OK"
            try:
                self._wait(promoted, "replica promoted", 8)
                break
            except RuntimeError:
                if attempt == 5:
                    raise
        self._wait(self._ok, "cluster ok after the failover", 30)
        return replica

    def stop(self) -> None:
        for port in self.ports:
            with contextlib.suppress(Exception):
                subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _ok(self) -> bool:
        return all("cluster_state:ok" in self.cli(p, "cluster", "info") for p in self.ports)

    @staticmethod
    def _wait(predicate, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster: timed out waiting for {what}")
            time.sleep(0.1)


def _cluster_ports(count: int) -> list[int]:
    """`count` ports p below 55536 with p and its cluster-bus port p + 10000 both free."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randint(20000, 45000)
        if port not in ports and _free(port) and _free(port + 10000):
            ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
