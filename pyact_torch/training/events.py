"""TensorBoard event files from a run's metrics rows (``metrics.jsonl``).

Each process that trains writes its own file, named by its start time, made whole from the rows
each time the master publishes metrics and written like any other output of the run (so a gs://
run directory gets it too). Within a process the rows only grow, so a TensorBoard reading the
file as it grows goes on reading. A resumed run's file starts again from the rows restored with
the checkpoint, after a session start that makes TensorBoard drop what earlier files hold, so no
scalar of a step that was trained again stays.
"""

from __future__ import annotations

import struct

from ..io.records import tfrecord

EVENT_PREFIX = "events.out.tfevents."  # TensorBoard reads every file whose name holds "tfevents"


def event_file_name(started: float) -> str:
    """The event file of a process that started training at ``started`` (Unix seconds): names
    sort by start, the order in which TensorBoard reads a folder's files."""
    return f"{EVENT_PREFIX}{started:017.6f}.pyact"


# metrics row kind and key -> TensorBoard tag
TAGS = {
    ("train", "loss"): "train/loss",
    ("train", "lr"): "train/learning_rate",
    ("train", "windows_per_s"): "train/windows_per_s",
    ("eval", "loss"): "eval/loss",
    ("eval", "accuracy"): "eval/accuracy",
}


def event_file(rows: list[dict], start_time: float) -> bytes:
    """The event file for ``rows`` (each with ``kind``, ``step`` and optionally ``time``)."""
    # a SessionLog START at step 0: TensorBoard drops what earlier files hold (a resumed run's
    # lost steps), and this file, which holds every row restored with the checkpoint, brings it back
    records = [
        tfrecord(_event(start_time, file_version="brain.Event:2")),
        tfrecord(_event(start_time, session_start=True)),
    ]
    for row in rows:
        values = [(tag, float(row[key])) for (kind, key), tag in TAGS.items() if row.get("kind") == kind and key in row]
        if values:
            records.append(tfrecord(_event(float(row.get("time", start_time)), step=int(row["step"]), values=values)))
    return b"".join(records)


# TensorBoard's Event and Summary messages, encoded here (a handful of fields) rather than with
# its generated protobuf classes: a machine with torch alone (no tensorboard, no protobuf) gets
# the file too. Tests read it back with TensorBoard's own reader.


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(
    wall_time: float,
    step: int = 0,
    file_version: str = "",
    values: list[tuple[str, float]] | None = None,
    session_start: bool = False,
) -> bytes:
    message = bytes([1 << 3 | 1]) + struct.pack("<d", wall_time)  # double wall_time = 1
    if step:
        message += _varint(2 << 3) + _varint(step)  # int64 step = 2
    if file_version:
        message += _field(3, file_version.encode())  # string file_version = 3
    if values:  # Summary summary = 5 { repeated Value value = 1 { string tag = 1; float simple_value = 2 } }
        summary = b"".join(
            _field(1, _field(1, tag.encode()) + bytes([2 << 3 | 5]) + struct.pack("<f", value)) for tag, value in values
        )
        message += _field(5, summary)
    if session_start:  # SessionLog session_log = 7 { SessionStatus status = 1 (START = 1) }
        message += _field(7, bytes([1 << 3]) + _varint(1))
    return message
