"""A real S3 API server for the S3 tier's integration tests: moto's standalone server
(`moto_server`, from `moto[server]`), which speaks the S3 REST protocol over HTTP.

It listens on 127.0.0.1 only, on a free port, keeps everything in memory, and is killed at
teardown. `MotoServer` can be killed (SIGKILL) and restarted on the same port (an empty store
afterwards: moto keeps nothing), which is how the fault tests simulate an outage. moto accepts any
credentials unless started with `INITIAL_NO_AUTH_ACTION_COUNT=n`: then requests after the first n
are authenticated against its IAM, which knows no access key, so every key is refused (403).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"
_BESIDE_PYTHON = Path(sys.executable).parent / "moto_server"   # the venv's, when it is not on PATH
MOTO_SERVER = shutil.which("moto_server") or (str(_BESIDE_PYTHON) if _BESIDE_PYTHON.exists() else None)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def use_test_credentials(monkeypatch, tmp_path: Path) -> None:
    """Point the standard AWS chain of this process (and the processes it starts) at the test
    credentials only: no profile, no session token, no endpoint override, no ~/.aws files."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for name in AWS_UNSET:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self, log_dir: Path, port: int | None = None, env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.log_dir = log_dir
        self.env = {**os.environ, **CREDENTIALS, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"moto-{self.port}.log", "ab")
        self.proc = subprocess.Popen([MOTO_SERVER, "-H", HOST, "-p", str(self.port)], stdout=log,
                                     stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}; see {self.log_dir}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError("moto_server did not start listening")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def count_objects(self, bucket: str, prefix: str = "") -> int:
        """Objects under `prefix`, by the raw client's LIST (independent of the tier's own count)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sum(page.get("KeyCount", 0) for page in pages)
