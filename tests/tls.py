"""TLS for the tests: a CA and certificates made by `trustme`, and servers with TLS listeners on
loopback — a RabbitMQ node (`tests.rabbit_cluster`), a TLS-only `redis-server`, a TLS Redis
Cluster and a Sentinel over TLS — each in a temporary directory of its own."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import trustme

from tests.cluster import _free


class TlsFiles:
    """A CA, a server certificate for `names` (default: `localhost`, `127.0.0.1`), a client
    certificate, and another CA that signed none of them, as PEM files in `directory`."""

    def __init__(self, directory: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        ca, other = trustme.CA(organization_name="billingd test CA"), trustme.CA(organization_name="someone else")
        server = ca.issue_cert(*names, common_name=names[0])
        client = ca.issue_cert("billingd-client", common_name="billingd-client")
        self.ca = self._write("ca.pem", ca.cert_pem.bytes())
        self.wrong_ca = self._write("wrong-ca.pem", other.cert_pem.bytes())
        self.server_cert = self._write("server.pem", b"".join(blob.bytes() for blob in server.cert_chain_pems))
        self.server_key = self._write("server.key", server.private_key_pem.bytes())
        self.client_cert = self._write("client.pem", b"".join(blob.bytes() for blob in client.cert_chain_pems))
        self.client_key = self._write("client.key", client.private_key_pem.bytes())

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        path.chmod(0o644)
        return str(path)


def free_ports(count: int, start: int = 26400) -> list[int]:
    """`count` free loopback ports from `start` on."""
    ports: list[int] = []
    port = start
    while len(ports) < count:
        if _free(port):
            ports.append(port)
        port += 1
    return ports


class TlsRedis:
    """A `redis-server` with a TLS port (and, with `plain`, a plain one beside it for benchmarks),
    an ACL user `billingd` with `password`, and `tls-auth-clients` as given."""

    def __init__(self, tls: TlsFiles, password: str, *, plain: bool = False, auth_clients: str = "optional") -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="billingd-tls-redis-"))
        self.tls_port, self.plain_port = free_ports(2, 26500)
        self.tls, self.password, self.plain, self.auth_clients = tls, password, plain, auth_clients

    def start(self) -> None:
        args = [
            "redis-server", "--bind", "127.0.0.1", "--port", str(self.plain_port if self.plain else 0),
            "--tls-port", str(self.tls_port), "--tls-cert-file", self.tls.server_cert,
            "--tls-key-file", self.tls.server_key, "--tls-ca-cert-file", self.tls.ca,
            "--tls-auth-clients", self.auth_clients, "--save", "", "--appendonly", "no", "--dir", str(self.directory),
            "--daemonize", "yes", "--pidfile", str(self.directory / "redis.pid"),
            "--logfile", str(self.directory / "redis.log"),
            "--user", "default", "off",
            "--user", "billingd", "on", f">{self.password}", "~*", "&*", "+@all",
        ]  # fmt: skip
        subprocess.run(args, check=True, cwd=self.directory)
        _wait(lambda: self.cli("ping") == "PONG", "TLS redis up")

    def cli(self, *args: str, port: int | None = None) -> str:
        """`redis-cli` over TLS as `billingd`; its output, stripped."""
        return _tls_cli(self.tls, self.password, port or self.tls_port, *args)

    def stop(self) -> None:
        _kill_pidfile(self.directory / "redis.pid")
        shutil.rmtree(self.directory, ignore_errors=True)


class TlsRedisCluster:
    """Three TLS-only `redis-server` masters in a Redis Cluster (`--tls-cluster yes`: the bus too),
    each announcing 127.0.0.1; the server certificate names only `names`."""

    def __init__(self, tls: TlsFiles, password: str) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="billingd-tls-cluster-"))
        self.ports = _cluster_ports()
        self.tls, self.password = tls, password

    def start(self) -> None:
        for port in self.ports:
            node = self.directory / str(port)
            node.mkdir()
            subprocess.run(
                [
                    "redis-server", "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
                    "--tls-cluster", "yes", "--tls-replication", "yes", "--tls-cert-file", self.tls.server_cert,
                    "--tls-key-file", self.tls.server_key, "--tls-ca-cert-file", self.tls.ca,
                    "--tls-auth-clients", "optional", "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node / "nodes.conf"), "--cluster-node-timeout", "2000",
                    "--save", "", "--appendonly", "no", "--dir", str(node), "--daemonize", "yes",
                    "--pidfile", str(node / "redis.pid"), "--logfile", str(node / "redis.log"),
                    "--requirepass", self.password, "--masterauth", self.password,
                ],
                check=True,
                cwd=node,
            )  # fmt: skip
        for port in self.ports:
            _wait(lambda p=port: self.cli(p, "ping") == "PONG", "TLS cluster node up")
        subprocess.run(
            ["redis-cli", "--tls", "--cacert", self.tls.ca, "-a", self.password, "--no-auth-warning",
             "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-yes"],
            check=True, capture_output=True, cwd=self.directory,
        )  # fmt: skip
        _wait(lambda: all("cluster_state:ok" in self.cli(p, "cluster", "info") for p in self.ports), "cluster ok")

    def cli(self, port: int, *args: str) -> str:
        return _tls_cli(self.tls, self.password, port, *args, user=None)

    def stop(self) -> None:
        for port in self.ports:
            _kill_pidfile(self.directory / str(port) / "redis.pid")
        shutil.rmtree(self.directory, ignore_errors=True)


class TlsSentinel:
    """A TLS-only master and one Sentinel (TLS-only too, talking TLS to the master) monitoring it
    as `billing`."""

    def __init__(self, tls: TlsFiles, password: str) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="billingd-tls-sentinel-"))
        self.master_port, self.sentinel_port = free_ports(2, 26600)
        self.tls, self.password = tls, password
        self._sentinel: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        files = ["--tls-cert-file", self.tls.server_cert, "--tls-key-file", self.tls.server_key,
                 "--tls-ca-cert-file", self.tls.ca, "--tls-auth-clients", "optional"]  # fmt: skip
        subprocess.run(
            ["redis-server", "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(self.master_port), *files,
             "--tls-replication", "yes", "--requirepass", self.password, "--save", "", "--dir", str(self.directory),
             "--daemonize", "yes", "--pidfile", str(self.directory / "master.pid"),
             "--logfile", str(self.directory / "master.log")],
            check=True, cwd=self.directory,
        )  # fmt: skip
        config = self.directory / "sentinel.conf"
        config.write_text(
            f"port 0\ntls-port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"tls-cert-file {self.tls.server_cert}\ntls-key-file {self.tls.server_key}\n"
            f"tls-ca-cert-file {self.tls.ca}\ntls-auth-clients optional\ntls-replication yes\n"
            f"sentinel monitor billing 127.0.0.1 {self.master_port} 1\n"
            f"sentinel auth-pass billing {self.password}\n"
        )
        with (self.directory / "sentinel.log").open("ab") as log:
            self._sentinel = subprocess.Popen(
                ["redis-server", str(config), "--sentinel"], stdout=log, stderr=log, cwd=self.directory
            )
        _wait(lambda: _tls_cli(self.tls, None, self.sentinel_port, "ping", user=None) == "PONG", "sentinel up")
        _wait(
            lambda: (
                str(self.master_port)
                in _tls_cli(
                    self.tls, None, self.sentinel_port, "sentinel", "get-master-addr-by-name", "billing", user=None
                )
            ),
            "sentinel knows the master",
        )

    def stop(self) -> None:
        if self._sentinel is not None:
            self._sentinel.kill()
            self._sentinel.wait()
        _kill_pidfile(self.directory / "master.pid")
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def started(server: TlsRedis | TlsRedisCluster | TlsSentinel) -> Iterator[None]:
    """Run `server` for the duration of the block."""
    try:
        server.start()
        yield
    finally:
        server.stop()


def _tls_cli(tls: TlsFiles, password: str | None, port: int, *args: str, user: str | None = "billingd") -> str:
    auth = ["--user", user, "--pass", password] if user and password else (["-a", password] if password else [])
    result = subprocess.run(
        ["redis-cli", "--tls", "--cacert", tls.ca, "-h", "127.0.0.1", "-p", str(port), "--no-auth-warning",
         *auth, *args],
        capture_output=True, text=True, check=False, timeout=10,
    )  # fmt: skip
    return result.stdout.strip()


def _cluster_ports() -> list[int]:
    port = 26700
    while not all(_free(p) and _free(p + 10000) for p in range(port, port + 3)):
        port += 3
    return [port, port + 1, port + 2]


def _kill_pidfile(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(path.read_text().strip()), signal.SIGKILL)


def _wait(predicate, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g}s for {what}")
        time.sleep(0.1)
