"""TFRecord framing: each record's length and payload with their masked CRC-32C, read with
every length bounded and every CRC checked. pyACT's TFRecords and TensorBoard's event files
both use it.
"""

from __future__ import annotations

import functools
import struct
from typing import IO, Iterator

from . import storage

MAX_RECORD = 64 * 1024 * 1024  # bytes in one record: a pyACT window (6x64x64x3 float32) is ~300 KB


class CorruptRecord(Exception):
    def __init__(self, url: str, offset: int, reason: str):
        super().__init__(f"{url}: corrupt record at byte {offset} ({reason})")


def _masked_crc(data: bytes) -> int:
    try:
        import google_crc32c

        crc = google_crc32c.value(data)
    except ImportError:  # a Python with torch alone (pip install --no-deps) still writes event files
        crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@functools.lru_cache(maxsize=1)
def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


def _crc32c(data: bytes) -> int:
    """CRC-32C in Python (google_crc32c's C code does the same, hundreds of times faster)."""
    table, crc = _crc32c_table(), 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    """One record in TFRecord framing (what ``tfrecords`` reads; TensorBoard's event files too)."""
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", _masked_crc(header)) + payload + struct.pack("<I", _masked_crc(payload))


def tfrecords(handle: IO[bytes], url: str) -> Iterator[tuple[int, bytes | None]]:
    """``(offset, payload)`` of each record of a TFRecord stream, CRCs checked. A record whose
    payload fails its CRC comes as ``(offset, None)`` (the next one is still found); a bad or
    oversized length or a truncated file raises CorruptRecord (nothing after it can be trusted)."""
    offset = 0
    while True:
        header = handle.read(12)
        if not header:
            return
        if len(header) < 12:
            raise CorruptRecord(url, offset, "truncated header")
        length, length_crc = struct.unpack("<QI", header)
        if _masked_crc(header[:8]) != length_crc:
            raise CorruptRecord(url, offset, "length CRC mismatch")
        if length > MAX_RECORD:
            raise CorruptRecord(url, offset, f"{length} bytes announced, more than the {MAX_RECORD} a record can have")
        body = storage.read_up_to(handle, length + 4)
        if len(body) < length + 4:
            raise CorruptRecord(url, offset, f"truncated: {length} bytes announced")
        payload, (data_crc,) = body[:length], struct.unpack("<I", body[length:])
        yield offset, (payload if _masked_crc(payload) == data_crc else None)
        offset += 12 + length + 4
