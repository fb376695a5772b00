"""One small API over local paths and ``gs://bucket/prefix`` URLs (google-cloud-storage).

Writes are atomic: an object appears under its final name only when complete (local files are
written to a hidden ``.<name>.<pid>.partial`` file and renamed; GCS objects are resumable
uploads, which become visible only when finalised, and are cancelled on error). Reads stream.
``STORAGE_EMULATOR_HOST`` (e.g. a local fake-gcs-server) is honoured with anonymous
credentials.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import stat
import time
import urllib.parse
from typing import IO, Any, Iterator

from ..errors import UserError, installed

GCS_CHUNK = 16 * 1024 * 1024  # resumable-upload chunk: a multiple of 256 KiB
READ_BUFFER = 1024 * 1024  # gs:// reads: bytes asked of the HTTP stream at a time
PARTIAL_SUFFIX = ".partial"
JSON_LIMIT = 64 * 1024 * 1024  # the largest JSON file read (predictions of a real Test split: ~7 MB)


def _deadline(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # not a number: the default (not a traceback at import); out of range: the nearest bound
    return min(max(value, 1.0), 3600.0) if math.isfinite(value) else 30.0


# How long a gs:// call keeps retrying an unreachable endpoint before giving up with one line;
# each request waits at most this long to connect and for each answer, too.
GCS_DEADLINE = _deadline(os.environ.get("PYACT_GCS_TIMEOUT", "30"))
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
# Local write failures a user can fix (a full or read-only disk, no permission): one line, no retry.
USER_ERRNOS = (
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENAMETOOLONG,
)

_clients: dict[tuple, Any] = {}


def is_gcs(url: str) -> bool:
    return url.startswith("gs://")


class StorageUnreachable(UserError):
    """Google Cloud Storage (or the emulator) did not answer within ``GCS_DEADLINE``."""


def split_gcs(url: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b")``; a UserError naming the package when
    google-cloud-storage is not installed (a bare GPU box), before any work."""
    _require_client_library(url)
    bucket, _, name = url[len("gs://") :].partition("/")
    if not bucket:
        raise UserError(f"{url}: no bucket name in gs:// URL")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise UserError(f"{url}: {bucket!r} is not a valid bucket name (lower-case letters, digits, '-', '_', '.')")
    return bucket, name.strip("/")


def _require_client_library(url: str) -> None:
    if _clients:  # a client exists: the package is there
        return
    if not installed("google.cloud.storage"):
        raise UserError(
            f"{url}: gs:// needs the google-cloud-storage package (pip install google-cloud-storage), "
            f"or use a local folder"
        )


def check_location(url: str, flag: str) -> str:
    """A folder or ``gs://`` URL given by the user: never empty, never another URL scheme
    (webdataset would run ``pipe:`` URLs in a shell)."""
    if not url.strip():
        raise UserError(f"{flag}: empty; give a folder or a gs://bucket/prefix")
    if is_gcs(url):
        split_gcs(url)
    elif _SCHEME.match(url):
        raise UserError(f"{flag} {url}: only local paths and gs:// URLs are supported")
    return url


def child(base: str, name: Any, pattern: re.Pattern, source: str) -> str:
    """``base/name`` for a ``name`` read from a file (``source``): it must be a relative name of
    the form this project writes (``pattern``), so it cannot leave ``base``."""
    if (
        not isinstance(name, str)
        or not pattern.fullmatch(name)
        or "\0" in name
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise UserError(f"{source}: {str(name)[:80]!r} is not a name this project writes; refusing to use it")
    return join(base, name)


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` for both kinds of location."""
    if is_gcs(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts if p])
    return os.path.join(base, *parts)


def client() -> Any:  # a google.cloud.storage.Client
    """The google-cloud-storage client of this process (one per process, since clients must
    not cross a fork, and per emulator address, which a client fixes when created)."""
    pid = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"))
    if pid not in _clients:
        from google.cloud import storage as gcs

        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            _clients[pid] = gcs.Client(credentials=AnonymousCredentials(), project="pyact-local")
        else:
            try:
                _clients[pid] = gcs.Client()
            except Exception as exc:  # google.auth raises several types for missing credentials
                raise UserError(f"cannot use Google Cloud Storage: {exc}".splitlines()[0]) from None
    return _clients[pid]


def _blob(url: str) -> Any:
    bucket, name = split_gcs(url)
    return client().bucket(bucket).blob(name)


def _retry() -> Any:
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(GCS_DEADLINE)


def _bounded() -> dict:
    """The retry and timeout of every gs:// call: retried until ``GCS_DEADLINE``, and no request
    waiting longer than that to connect or for an answer (the library's own timeout is 60 s, so
    an endpoint that accepts connections and never answers held a call for a minute)."""
    return {"retry": _retry(), "timeout": (GCS_DEADLINE, GCS_DEADLINE)}


@contextlib.contextmanager
def open_write(url: str) -> Iterator[IO[bytes]]:
    """A binary writer whose content appears at ``url`` only if the block ends without error."""
    if is_gcs(url):
        writer = _blob(url).open("wb", ignore_flush=True, chunk_size=GCS_CHUNK, **_bounded())
        with _gcs_errors(url):
            with writer:  # BlobWriter cancels the upload when the block raises
                yield writer
        return
    folder, name = os.path.split(os.path.abspath(url))
    partial = os.path.join(folder, f".{name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        with write_errors(url):
            os.makedirs(folder, exist_ok=True)
            with open(partial, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())  # the data is on disk before the name says it is complete
            os.replace(partial, url)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@contextlib.contextmanager
def write_errors(url: str, hint: str = "") -> Iterator[None]:
    """A full or read-only disk, or a path that cannot be a file: one line naming ``url``
    (and ``hint``, what the user can do about it)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in USER_ERRNOS:
            raise UserError(f"{url}: cannot write ({exc.strerror}){'; ' + hint if hint else ''}") from None
        raise


class HashingWriter(io.RawIOBase):
    """A write-only stream passing bytes to ``sink`` while counting and hashing them (sha256)."""

    def __init__(self, sink: IO[bytes]):
        self.sink = sink
        self.digest = hashlib.sha256()
        self.size = 0
        self.failure: OSError | None = None  # a write error a caller (torch.save) may wrap and hide

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # bytes-like
        self.digest.update(data)
        self.size += len(data)
        try:
            self.sink.write(data)
        except OSError as exc:
            self.failure = exc
            raise
        return len(data)


class HashingReader(io.RawIOBase):
    """A read-only stream passing on ``source``'s bytes while counting and hashing them."""

    def __init__(self, source: IO[bytes]):
        self.source = source
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


def _pinned(link: str, generation: int | None) -> str:
    """``link`` naming ``generation`` (GCS's mediaLink does; fake-gcs-server's does not), so
    that a resumed read never mixes two versions of an object."""
    parts = urllib.parse.urlsplit(link)
    if generation is None or "generation" in urllib.parse.parse_qs(parts.query):
        return link
    query = parts.query + ("&" if parts.query else "") + f"generation={generation}"
    return urllib.parse.urlunsplit(parts._replace(query=query))


class _ObjectStream(io.RawIOBase):
    """One GCS object read front to back through a single streamed GET of its ``mediaLink``
    (which pins the generation that was opened), resuming with a Range request when the
    connection drops.

    google-cloud-storage's own reader (BlobReader) issues a ranged GET per chunk, walks every
    response in 8 KB pieces, copies each chunk twice and learns of the end from a request past
    it (HTTP 416, after which fake-gcs-server resets the connection and the next request waits
    out a retry back-off): 3-3.6x the time per byte of this stream, measured (bench/train.py)."""

    def __init__(self, url: str, link: str, size: int):
        self.url, self.link, self.size = url, link, size
        self.position = 0
        self._response: Any = None  # a requests.Response while a GET streams

    def readable(self) -> bool:
        return True

    def _drop(self, _error: Exception | None = None) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def _read_some(self, size: int) -> bytes:
        if self._response is None:
            from google.api_core import exceptions

            # the client's own authorised session: credentials and token refresh as for its calls
            headers = {"Range": f"bytes={self.position}-"} if self.position else {}
            response = client()._http.get(
                self.link,
                headers={**headers, "Accept-Encoding": "identity"},
                stream=True,
                timeout=(GCS_DEADLINE, GCS_DEADLINE),
            )
            if response.status_code != (206 if self.position else 200):
                response.close()
                if response.status_code == 404 and self.position:
                    raise UserError(f"{self.url}: replaced or deleted while being read")
                raise exceptions.from_http_status(response.status_code, f"GET {self.link}: {response.reason}")
            self._response = response
        data = self._response.raw.read(size)
        if not data:
            raise ConnectionError(f"{self.url}: connection closed at byte {self.position} of {self.size}")
        return data

    def readinto(self, buffer: Any) -> int:  # a writable buffer
        want = min(len(buffer), self.size - self.position)
        if want <= 0:
            self._drop()
            return 0
        with _gcs_errors(self.url):
            data = _retry()(self._read_some, on_error=self._drop)(want)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def readall(self) -> bytes:
        chunks = []
        while chunk := self.read(GCS_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._drop()
        super().close()


def open_read(url: str) -> IO[bytes]:
    """A streaming binary reader of a regular file or an object (a FIFO, device or folder
    is refused: it could hang or never end)."""
    if is_gcs(url):
        from google.api_core.exceptions import NotFound

        with _gcs_errors(url):
            blob = _blob(url)
            try:
                blob.reload(**_bounded())  # one metadata request: existence and size
            except NotFound:
                raise FileNotFoundError(url) from None
            if blob.content_encoding:  # stored compressed: GCS may transcode, sizes and ranges differ
                return blob.open("rb", chunk_size=GCS_CHUNK, **_bounded())
            return io.BufferedReader(
                _ObjectStream(url, _pinned(blob.media_link, blob.generation), blob.size), READ_BUFFER
            )
    fd = os.open(url, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens without waiting
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{url}: not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_up_to(stream: IO[bytes] | io.RawIOBase, size: int, piece: int = 1 << 20) -> bytes:
    """Up to ``size`` bytes of ``stream``, read in pieces: a header or length field that lies
    about the size cannot make us allocate more than the stream really holds."""
    if size <= piece:
        return stream.read(size)
    pieces, left = [], size
    while left:
        data = stream.read(min(left, piece))
        if not data:
            break
        pieces.append(data)
        left -= len(data)
    return b"".join(pieces)


def size(url: str) -> int:
    """Bytes in a file or object."""
    if is_gcs(url):
        from google.api_core.exceptions import NotFound

        with _gcs_errors(url):
            blob = _blob(url)
            try:
                blob.reload(**_bounded())
            except NotFound:
                raise FileNotFoundError(url) from None
            return blob.size
    return os.stat(url).st_size


def read_bytes(url: str, limit: int | None = None) -> bytes:
    """The whole file; more than ``limit`` bytes is an error (a file read for its metadata
    can never make us hold an unbounded amount)."""
    with open_read(url) as handle:
        data = handle.read() if limit is None else handle.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise UserError(f"{url}: larger than the {limit} bytes such a file can have")
    return data


def write_bytes(url: str, data: bytes) -> None:
    with open_write(url) as handle:
        handle.write(data)


def read_json(url: str, limit: int = JSON_LIMIT) -> Any:
    """A JSON file of at most ``limit`` bytes; invalid JSON is a one-line error naming it."""
    try:
        return json.loads(read_bytes(url, limit))
    except ValueError:
        raise UserError(f"{url}: not valid JSON") from None
    except RecursionError:  # a few hundred kB of nested brackets is enough
        raise UserError(f"{url}: JSON nested too deeply") from None


def json_bytes(value: Any) -> bytes:
    """Deterministic, readable JSON (sorted keys are not used: field order is meaningful)."""
    return (json.dumps(value, indent=1) + "\n").encode()


def write_json(url: str, value: Any) -> None:
    write_bytes(url, json_bytes(value))


def exists(url: str) -> bool:
    if is_gcs(url):
        with _gcs_errors(url):
            return _blob(url).exists(**_bounded())
    return os.path.exists(url)


def is_file(url: str) -> bool:
    """True for an existing file or object (not a folder or prefix)."""
    return exists(url) if is_gcs(url) else os.path.isfile(url)


def list_files(url: str) -> list[str]:
    """Names of all files below a folder or prefix, relative to it, sorted."""
    if is_gcs(url):
        bucket, prefix = split_gcs(url)
        prefix = prefix + "/" if prefix else ""
        with _gcs_errors(url):
            return sorted(b.name[len(prefix) :] for b in client().list_blobs(bucket, prefix=prefix, **_bounded()))
    if not os.path.isdir(url):
        return []
    names = []
    for root, _, files in os.walk(url):
        names += [os.path.relpath(os.path.join(root, f), url) for f in files]
    return sorted(n.replace(os.sep, "/") for n in names)


def remove(url: str) -> None:
    """Delete one file or object if it exists."""
    if is_gcs(url):
        from google.api_core.exceptions import NotFound

        with contextlib.suppress(NotFound), _gcs_errors(url):
            _blob(url).delete(**_bounded())
    elif os.path.exists(url):
        os.remove(url)


def check_writable(url: str) -> None:
    """Fail with a one-line UserError unless ``url`` can hold output."""
    if is_gcs(url):
        bucket, _ = split_gcs(url)
        with _gcs_errors(url):
            if not client().bucket(bucket).exists(**_bounded()):
                raise UserError(f"gs://{bucket}: bucket does not exist")
        return
    try:
        os.makedirs(url, exist_ok=True)
        probe = os.path.join(url, f".write-test.{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTDIR):
            raise UserError(f"{url}: not writable (it or a folder above it is a file)") from None
        raise UserError(f"{url}: not writable ({exc.strerror or exc})") from None


def check_output_file(url: str, what: str) -> None:
    """Before any work: a ``what`` file can be written at ``url`` (not a folder; its folder
    writable, or on gs:// its bucket there)."""
    check_location(url, what)
    if is_gcs(url):
        check_writable(url)
        return
    if os.path.isdir(url):
        raise UserError(f"{url}: is a folder; give a file name for the {what}")
    check_writable(os.path.dirname(os.path.abspath(url)))


def bucket_exists(url: str) -> bool:
    bucket, _ = split_gcs(url)
    with _gcs_errors(url):
        return client().bucket(bucket).exists(**_bounded())


@contextlib.contextmanager
def _gcs_errors(url: str) -> Iterator[None]:
    """Turn google-cloud-storage's errors for a missing bucket or no access into UserError."""
    import requests
    from google.api_core import exceptions

    started = time.monotonic()
    try:
        yield
    except (exceptions.RetryError, requests.ConnectionError, requests.Timeout) as exc:
        where = os.environ.get("STORAGE_EMULATOR_HOST") or "Google Cloud Storage"
        raise StorageUnreachable(
            f"{url}: cannot reach {where} (gave up after {time.monotonic() - started:.0f} s; "
            f"PYACT_GCS_TIMEOUT={GCS_DEADLINE:g} sets how long): {_first_line(exc)}"
        ) from None
    except exceptions.NotFound as exc:
        raise UserError(f"{url}: not found ({_first_line(exc)})") from None
    except exceptions.Forbidden as exc:
        raise UserError(f"{url}: access denied ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200]


def gcs_blob(url: str) -> Any:
    """The google-cloud-storage blob of a ``gs://`` URL (for conditional writes: ``locks``)."""
    return _blob(url)


gcs_errors = _gcs_errors


def gcs_bounded() -> dict:
    """``retry`` and ``timeout`` for a gs:// call made elsewhere (``locks``): see ``_bounded``."""
    return _bounded()
