"""TensorBoard event files from a run's metrics rows (``metrics.jsonl``).

The file is made whole from the rows each time the master publishes metrics, and written like
any other output of the run, so a gs:// run directory gets it too. After a resume it holds
exactly the rows restored from the checkpoint and what came after: no scalar from a step that
was trained again.
"""

from __future__ import annotations

from .tfrecords import tfrecord

# TensorBoard reads every file whose name holds "tfevents"; one fixed name, replaced whole
EVENT_FILE = "events.out.tfevents.pyact"

# metrics row kind and key -> TensorBoard tag
TAGS = {("train", "loss"): "train/loss", ("train", "lr"): "train/learning_rate",
        ("train", "windows_per_s"): "train/windows_per_s",
        ("eval", "loss"): "eval/loss", ("eval", "accuracy"): "eval/accuracy"}


def event_file(rows: list[dict], start_time: float) -> bytes:
    """The event file for ``rows`` (each with ``kind``, ``step`` and optionally ``time``)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2

    records = [tfrecord(event_pb2.Event(wall_time=start_time, file_version="brain.Event:2").SerializeToString())]
    for row in rows:
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(row[key]))
                  for (kind, key), tag in TAGS.items() if row.get("kind") == kind and key in row]
        if values:
            event = event_pb2.Event(wall_time=float(row.get("time", start_time)), step=int(row["step"]),
                                    summary=summary_pb2.Summary(value=values))
            records.append(tfrecord(event.SerializeToString()))
    return b"".join(records)
