"""Start and stop s3rver (a file-backed S3 server that serves byte ranges from disk) for benchmarks.

moto copies the whole object on every ranged GET, so it only suits correctness tests; s3rver is
the performance server. It is installed from npm into bench/_work on first use.

    endpoint, stop = start_s3rver("/tmp/s3data", buckets=("bench",))
    os.environ.update(S3RVER_ENV, AWS_ENDPOINT_URL=endpoint)
    ...
    stop()

s3rver 3.7.1 ignores If-Match and If-None-Match (on GET and PUT) but honours Range: the tests
use it as the second S3 implementation where it is installed (`python bench/s3rver.py`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable

WORK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_work")
BIN = os.path.join(WORK, "node_modules", ".bin", "s3rver")
VERSION = "3.7.1"
# s3rver accepts only these fixed credentials
S3RVER_ENV = {
    "AWS_ACCESS_KEY_ID": "S3RVER",
    "AWS_SECRET_ACCESS_KEY": "S3RVER",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def install_s3rver() -> str:
    """Install s3rver from npm into bench/_work unless it is there; return its executable."""
    if not os.path.exists(BIN):
        if shutil.which("npm") is None:
            raise RuntimeError("s3rver needs Node.js and npm (e.g. apt-get install nodejs npm)")
        os.makedirs(WORK, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--prefix", WORK, "--no-audit", "--no-fund", f"s3rver@{VERSION}"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return BIN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3rver(directory: str, buckets: tuple[str, ...] = ()) -> tuple[str, Callable[[], None]]:
    """Serve `directory` over S3 on 127.0.0.1 and a free port; return (endpoint URL, stop)."""
    exe = install_s3rver()
    os.makedirs(directory, exist_ok=True)
    port = _free_port()
    cmd = [exe, "-a", "127.0.0.1", "-p", str(port), "-d", directory, "-s", "--no-vhost-buckets"]
    for b in buckets:
        cmd += ["--configure-bucket", b]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"s3rver exited at start: {proc.stderr.read().decode()[-500:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(
                    f"s3rver did not listen on 127.0.0.1:{port} within 30 s"
                ) from None
            time.sleep(0.1)

    def stop() -> None:
        """Terminate the server and wait for it."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    return f"http://127.0.0.1:{port}", stop


if __name__ == "__main__":
    print(install_s3rver())
