"""The ``pyact`` command and its subcommands; ``scripts/*.py`` call the same functions.

Mistakes a user can fix end with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import signal
import sys
from typing import Any, Callable

from .config import (DemoConfig, DetectConfig, ExportConfig, InspectConfig, KerasConfig, PreprocessConfig, EvaluateConfig, SynthConfig,
                     TFRecordConfig, TrainConfig, VideoConfig, add_arguments, from_namespace)
from . import __doc__ as package_doc
from .errors import UserError, local_rank, printed_here
from .io.interrupts import Interrupted, Terminated, raise_terminated
from .io.storage import USER_ERRNOS


def _synth(config: SynthConfig) -> None:
    from .data.synthetic import make_dataset

    print(f"wrote {make_dataset(config)} frames to {config.out}")


def _preprocess(config: PreprocessConfig) -> None:
    from .data.preprocess import format_summary, preprocess

    print(format_summary(preprocess(config)))


def _lazy(target: str) -> Callable[[Any], Any]:
    """``"module:function"`` of this package, imported only when the command runs (torch and
    torch_xla are slow to import, and ``--help`` should be quick)."""
    module, function = target.split(":")

    def run(config: Any) -> Any:
        return getattr(importlib.import_module(f".{module}", __package__), function)(config)

    return run


# name -> (settings class, what runs them, one-line help)
COMMANDS: dict[str, tuple[type, Callable[[Any], Any], str]] = {
    "synth": (SynthConfig, _synth, "write a synthetic dataset in the real dataset's layout"),
    "preprocess": (PreprocessConfig, _preprocess, "raw dataset -> WebDataset shards + manifest"),
    "inspect": (InspectConfig, _lazy("data.inspection:inspect_split"),
                "check shards against the manifest, draw sampled windows"),
    "train": (TrainConfig, _lazy("training.train:fit"), "train ConvNet3D on TPU cores (xmp.spawn or SPMD), CPUs or GPUs (torchrun for several)"),
    "evaluate": (EvaluateConfig, _lazy("scoring.evaluate:evaluate_checkpoint"),
                 "score a checkpoint: metrics, confusion matrix, predictions"),
    "video": (VideoConfig, _lazy("scoring.video:make_video"), "prediction video and contact sheet from predictions.json"),
    "detect": (DetectConfig, _lazy("detection.detect:run_detect"),
               "find actions in sequences, a video or a camera: segments, metrics, timeline, annotated video"),
    "export": (ExportConfig, _lazy("detection.export:export_model"), "checkpoint -> ONNX or torch.export file, checked on real windows"),
    "convert-keras": (KerasConfig, _lazy("convert.keras_weights:convert_keras"), "pyACT Keras .h5 weights -> pyact-torch checkpoint"),
    "convert-tfrecords": (TFRecordConfig, _lazy("convert.tfrecords:convert_tfrecords"), "pyACT TFRecords -> shards + manifest"),
    "demo": (DemoConfig, _lazy("demo:run_demo"), "the whole pipeline on a synthetic dataset, on CPU, in a few minutes"),
}


# commands that continue from where an interrupted run stopped
RESUMABLE = ("preprocess", "train")


def build_parser(only: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The ``pyact`` parser, or the parser of one subcommand (for ``scripts/``)."""
    if only is not None:
        cls, _, _ = COMMANDS[only]
        parser = argparse.ArgumentParser(prog=prog, description=_describe(cls))
        add_arguments(parser, cls)
        parser.set_defaults(command=only)
        return parser
    parser = argparse.ArgumentParser(prog=prog or "pyact", description=package_doc)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _, text) in COMMANDS.items():
        sub = commands.add_parser(name, help=text, description=_describe(cls))
        add_arguments(sub, cls)
        sub.set_defaults(command=name)
    return parser


def main(argv: list[str] | None = None, only: str | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` and run; returns the exit status."""
    parser = build_parser(only, prog)
    if local_rank():  # under torchrun the first process of each machine prints help and usage errors
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(argv)
    else:
        args = parser.parse_args(argv)
    previous = None
    if args.command != "train":  # training handles SIGTERM itself: finish the step, checkpoint, exit 0
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        cls, run, _ = COMMANDS[args.command]
        run(from_namespace(cls, args))
    except UserError as exc:
        if printed_here(exc):  # under torchrun, an error every rank meets is printed once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in USER_ERRNOS:
            raise
        if printed_here(exc):
            print(f"error: {exc.filename or args.command}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if local_rank():  # under torchrun every worker of a machine gets it: its first says it
            return 130
        if isinstance(exc, Interrupted):
            print(exc, file=sys.stderr)
            return 130
        again = {"train": "nothing half-written was left; run the same command again: it continues from the "
                          "last checkpoint saved, if there is one, else starts over"}.get(
            args.command, "run the same command again to continue where it stopped" if args.command in RESUMABLE
            else "nothing half-written was left")
        print(f"interrupted; {again}", file=sys.stderr)
        return 130
    except Terminated:
        again = "run the same command again to continue" if args.command in RESUMABLE else "run it again to redo it"
        print(f"stopped by SIGTERM; nothing half-written was left; {again}", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _describe(cls: type) -> str:
    return re.split(r"\s*\(``", " ".join((cls.__doc__ or "").split()))[0] + "."
