"""``pyact export``: a checkpoint as an ONNX file (dynamic batch, run by ONNX Runtime) or a
``torch.export`` program (.pt2), checked before it is published.

The exported graph is ``model.Deployed``: uint8 ``(batch, T, H, W, C)`` clips -> logits, so a
deployment feeds frames as ``stream`` prepares them and needs no torch. What frames it takes
(``runners.ModelInfo``) travels inside the file (ONNX metadata / a .pt2 extra file). The file
is written under a temporary name, loaded back, and its logits on real windows (as one batch
and one window alone) must equal the checkpoint's within ``TOLERANCE`` (``DEVICE_TOLERANCE``
when the checkpoint ran on a GPU); only then is it renamed to ``--out``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import logging
import os
import warnings
from dataclasses import replace
from typing import Callable, Iterator

import numpy as np
import torch

from ..io import storage
from ..config import MAX_BATCH, ExportConfig
from ..errors import UserError
from ..io.lifecycle import uninterrupted
from ..io.outputs import remove_empty_up_to, topmost_missing
from ..data.labels import scan_dataset
from .runners import METADATA_KEY, ModelInfo, OnnxRunner, load_checkpoint_runner, load_exported
from ..data.shards import decode_sample, read_manifest, read_samples, split_shards
from .stream import count_frames, folder_frames

TOLERANCE = 1e-4  # the export against its checkpoint, both run on the CPU
# against a reference run on a GPU (--device cuda): the GPU's kernels round otherwise, by an
# amount not measured here (no GPU); 1e-3 is the bound the GPU test sets on CPU-vs-GPU logits
DEVICE_TOLERANCE = 1e-3


def export_model(config: ExportConfig, print_fn: Callable[[str], None] = print) -> dict:
    """Run ``pyact export``; returns what was checked (windows, largest logit difference)."""
    created = "" if storage.is_gcs(config.out) else topmost_missing(os.path.dirname(os.path.abspath(config.out)))
    storage.check_output_file(config.out, "--out")
    _check_replaceable(config.out)
    try:
        return _export(config, print_fn)
    except BaseException:
        remove_empty_up_to(os.path.dirname(os.path.abspath(config.out)), created)
        raise


def _check_replaceable(out: str) -> None:
    """An existing ``out`` is replaced only when it is an earlier export of ours (it carries our
    metadata and loads as one): a user's other file of that name is never deleted."""
    if not os.path.lexists(out):
        return
    ours = os.path.isfile(out) and not os.path.islink(out)
    if ours:
        try:
            load_exported(out)
        except UserError:
            ours = False
    if not ours:
        raise UserError(
            f"--out {out}: exists and is not a model written by pyact export; remove it or choose another --out"
        )


def _export(config: ExportConfig, print_fn: Callable[[str], None]) -> dict:
    runner = load_checkpoint_runner(
        config.checkpoint, tuple(config.depth_range) or None, log=print_fn, device=config.device
    )
    if not config.src and not config.data:
        if not runner.trained_on:
            raise UserError(
                f"{runner.name}: records no training data; give --data (shards) or --src (raw frames) "
                f"for the windows that check the export"
            )
        print_fn(f"checking the export on the data the checkpoint was trained on: {runner.trained_on}")
        if not storage.is_gcs(runner.trained_on) and not os.path.isdir(runner.trained_on):
            raise UserError(
                f"{runner.name}: was trained on {runner.trained_on}, which is not there any more; give "
                f"--data (shards) or --src (raw frames) for the windows that check the export"
            )
        config = replace(config, data=runner.trained_on)
    windows = real_windows(config, runner.info)
    expected = runner.logits(windows)
    folder, name = os.path.split(os.path.abspath(config.out))
    partial = os.path.join(folder, f".{name}.{os.getpid()}.partial{os.path.splitext(name)[1]}")
    try:
        with storage.write_errors(config.out):  # named as the user gave it, not by its temporary name
            # traced on the CPU: the file runs anywhere; --device only moves the reference
            write_export(copy.deepcopy(runner.module).cpu(), runner.info, windows, partial)
        exported = load_exported(partial)
        if exported.info != runner.info:
            raise UserError(f"{config.out}: the exported metadata does not read back as written")
        difference = max(
            float(np.abs(exported.logits(windows) - expected).max()),
            float(np.abs(exported.logits(windows[:1]) - expected[:1]).max()),
        )
        tolerance = TOLERANCE if config.device == "cpu" else DEVICE_TOLERANCE
        if not difference <= tolerance:
            raise UserError(
                f"{config.out}: the export's logits differ from the checkpoint's by {difference:.3g} "
                f"(more than {tolerance:g}) on real windows; nothing written"
            )
        with storage.write_errors(config.out):
            os.replace(partial, config.out)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    kind = "ONNX (ONNX Runtime)" if isinstance(exported, OnnxRunner) else "torch.export program"
    print_fn(
        f"wrote {config.out}: {kind}, input uint8 [batch, {', '.join(map(str, runner.info.clip_shape))}] -> "
        f"logits [batch, {len(runner.info.classes)}]; checked on {len(windows)} real windows (as a batch and "
        f"alone): largest logit difference {difference:.2g} (limit {tolerance:g})"
    )
    return {"windows": len(windows), "max_difference": difference, "out": config.out}


def write_export(module: torch.nn.Module, info: ModelInfo, windows: np.ndarray, path: str) -> None:
    """``module`` as ONNX (``.onnx``) or a torch.export program (otherwise) at ``path``, with a
    dynamic batch and ``info`` inside; ``windows`` are example inputs. Unchecked: see
    :func:`export_model`."""
    example = torch.from_numpy(np.ascontiguousarray(windows[:2] if len(windows) >= 2 else np.repeat(windows, 2, 0)))
    # batch 2 in the example: a batch of 1 would be specialised into the graph
    dynamic = {"clips": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}
    with _quiet(), uninterrupted("the exporter has finished"):
        if path.endswith(".onnx"):
            onnx_program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=["clips"],
                output_names=["logits"],
                dynamic_shapes=dynamic,
                verbose=False,
            )
            assert onnx_program is not None  # dynamo=True returns the program
            onnx_program.model.metadata_props[METADATA_KEY] = info.to_json()
            onnx_program.save(path)
        else:
            program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
            # into memory first: torch's archive writer aborts the process when the disk is full
            buffer = io.BytesIO()
            torch.export.save(program, buffer, extra_files={METADATA_KEY + ".json": info.to_json()})
            with open(path, "wb") as handle:
                handle.write(buffer.getbuffer())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and warnings of their own; a failure still raises."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def real_windows(config: ExportConfig, info: ModelInfo) -> np.ndarray:
    """The first ``config.windows`` windows of the shards' test split (else any split), or of
    the first test sequence of a raw dataset (or of a sequence folder), as uint8 clips."""
    clips: list[np.ndarray] = []
    if config.data:
        manifest = read_manifest(config.data)
        split = "test" if "test" in manifest.splits else next(iter(manifest.splits), "test")
        shape, classes = manifest.clip_shape, len(manifest.classes)
        samples = (
            (shard.url, sample)
            for shard in split_shards(config.data, manifest, split)
            for sample in read_samples(shard.url, shard.count)
        )
        clips = [
            decode_sample(sample, url, shape, classes)[0]  # a damaged window is one line naming its shard
            for url, sample in itertools.islice(samples, config.windows)
        ]
        where = config.data
    else:
        spec = info.spec(config.checkpoint)
        folder = config.src
        if os.path.isdir(os.path.join(folder, "Test")):
            sequences, _ = scan_dataset(folder, info.modality)
            tests = [s for s in sequences if s.split_dir == "Test"] or sequences
            if not tests:
                raise UserError(f"--src {folder}: no usable sequence")
            folder = os.path.join(folder, tests[0].path)
        n_frames = count_frames(folder, info.modality)
        frames = np.stack(
            [f.model for f in folder_frames(folder, min(n_frames, info.seq_len - 1 + config.windows), spec, False)]
        )
        for stop in range(info.seq_len - 1, min(n_frames, info.seq_len - 1 + config.windows)):
            clips.append(frames[stop - info.seq_len + 1 : stop + 1])
        where = folder
    if not clips:
        raise UserError(f"{where}: no window to check the export on")
    stack = np.stack(clips)
    if stack.shape[1:] != info.clip_shape:
        raise UserError(
            f"{where}: its windows are {list(stack.shape[1:])}, the checkpoint takes {list(info.clip_shape)}"
        )
    return stack
