"""redis-server processes for the integration tests: start on a free loopback port, kill,
pause (SIGSTOP), restart on the same port. Used by conftest.py's fixtures."""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
HOST = "127.0.0.1"
ACL_USER, ACL_PASSWORD, DEFAULT_PASSWORD = "app", "app-secret", "default-secret"


def free_port(cluster: bool = False) -> int:
    """A free loopback port (and, for cluster nodes, its bus port +10000 free too)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if not cluster:
            return port
        if port + 10000 < 65536:
            try:
                with socket.socket() as s:
                    s.bind((HOST, port + 10000))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


class RedisProcess:
    """One redis-server. `url` is its redis:// (or rediss://) address."""

    def __init__(self, workdir: Path, args: list[str] | None = None, tls: dict | None = None,
                 cluster: bool = False):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.args = list(args or [])
        self.tls = tls
        self.cluster = cluster
        self.port = free_port(cluster)
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self.start()

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{HOST}:{self.port}"

    def command(self) -> list[str]:
        cmd = [REDIS_SERVER, "--bind", HOST, "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
               "--protected-mode", "no", "--loglevel", "warning"]
        if self.tls:
            cmd += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls["cert"],
                    "--tls-key-file", self.tls["key"], "--tls-ca-cert-file", self.tls["ca"],
                    "--tls-auth-clients", "optional"]
        else:
            cmd += ["--port", str(self.port)]
        if self.cluster:
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no"]
        return cmd + self.args

    def start(self, timeout: float = 10.0) -> None:
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.workdir / 'redis.log').read_text()[-2000:]}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def restart(self) -> None:
        self.kill()
        self.start()

    def cli(self, *args: str, password: str | None = None) -> str:
        """Run redis-cli against this (non-TLS) server."""
        cmd = [REDIS_CLI, "-h", HOST, "-p", str(self.port)]
        if password:
            cmd += ["--no-auth-warning", "-a", password]
        out = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=30)
        return out.stdout.strip()
