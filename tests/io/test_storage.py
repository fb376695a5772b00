"""gs:// reads through fake-gcs-server: exact bytes in any read pattern, resumption after a
dropped connection, and a one-line error when the object changes under a reader."""

import gzip
import os
import threading
import time

import pytest

from pyact_torch.io import storage
from pyact_torch.io.emulator import GCSEmulator
from pyact_torch.errors import UserError


def test_reads_return_exactly_the_bytes_written(gcs):
    data = os.urandom(2 * storage.READ_BUFFER + 12_345)  # crosses read-buffer boundaries
    url = "gs://pyact-test/storage/blob.bin"
    storage.write_bytes(url, data)
    assert storage.read_bytes(url) == data
    for size in (1, 10_240, storage.READ_BUFFER + 7):
        pieces = []
        with storage.open_read(url) as handle:
            while piece := handle.read(size):
                assert len(piece) <= size
                pieces.append(piece)
            assert handle.read(size) == b""
        assert b"".join(pieces) == data
    storage.write_bytes("gs://pyact-test/storage/empty", b"")
    assert storage.read_bytes("gs://pyact-test/storage/empty") == b""
    with pytest.raises(FileNotFoundError):
        storage.open_read("gs://pyact-test/storage/missing")


def test_an_object_stored_gzip_encoded_reads_as_its_content(gcs):
    data = os.urandom(1000) * 50
    blob = storage._blob("gs://pyact-test/storage/zipped")
    blob.content_encoding = "gzip"
    blob.upload_from_string(gzip.compress(data))
    assert storage.read_bytes("gs://pyact-test/storage/zipped") == data


@pytest.fixture
def private_gcs(tmp_path):
    emulator = GCSEmulator(str(tmp_path / "gcs"), log=str(tmp_path / "gcs.log"))
    with emulator:
        emulator.create_bucket("reads")
        yield emulator


def _record_gets(monkeypatch) -> list:
    """Ranges asked by each GET of an object's media (the real session, observed)."""
    session = storage.client()._http
    ranges, real_get = [], session.get

    def get(url, *args, **kwargs):
        if "alt=media" in url:
            ranges.append(kwargs.get("headers", {}).get("Range"))
        return real_get(url, *args, **kwargs)

    monkeypatch.setattr(session, "get", get)
    return ranges


def test_a_read_resumes_where_the_connection_dropped(private_gcs, monkeypatch):
    data = os.urandom(64 << 20)  # larger than what socket buffers hold when the server dies
    url = "gs://reads/big.bin"
    storage.write_bytes(url, data)
    ranges = _record_gets(monkeypatch)
    with storage.open_read(url) as handle:
        head = handle.read(1 << 20)
        private_gcs.pause()
        threading.Timer(2.0, private_gcs.start).start()
        started = time.monotonic()
        rest = handle.read()
    assert head + rest == data
    assert time.monotonic() - started > 1.5  # waited for the server instead of failing
    assert ranges[0] is None and len(ranges) >= 2 and ranges[-1].startswith("bytes=")
    resumed_at = int(ranges[-1][len("bytes=") : -1])
    assert 1 << 20 <= resumed_at < len(data)


def test_an_object_replaced_during_a_read_is_an_error_not_a_mix(private_gcs):
    url = "gs://reads/changing.bin"
    storage.write_bytes(url, os.urandom(64 << 20))
    with storage.open_read(url) as handle:
        handle.read(1 << 20)
        storage.write_bytes(url, os.urandom(64 << 20))
        private_gcs.pause()  # the open stream dies; the reader must come back for the rest
        private_gcs.start()
        with pytest.raises(UserError, match="replaced or deleted while being read"):
            handle.read()
