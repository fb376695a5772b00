"""The ``pyact`` command and its subcommands; ``scripts/*.py`` call the same functions.

Mistakes a user can fix end with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import select
import signal
import sys
import time
from typing import Any, Callable

from .config import (
    DemoConfig,
    DetectConfig,
    ExportConfig,
    InspectConfig,
    KerasConfig,
    PreprocessConfig,
    EvaluateConfig,
    SynthConfig,
    TFRecordConfig,
    TrainConfig,
    VideoConfig,
    add_arguments,
    from_namespace,
)
from . import __doc__ as package_doc
from .errors import UserError, local_rank, printed_here, under_torchrun
from .io.lifecycle import Interrupted, Terminated, raise_terminated
from .io.storage import USER_ERRNOS


def _synth(config: SynthConfig) -> None:
    from .data.synthetic import make_dataset

    print(f"wrote {make_dataset(config)} frames to {config.out}")


def _preprocess(config: PreprocessConfig) -> None:
    from .data.preprocess import format_summary, preprocess

    print(format_summary(preprocess(config)))


# Each command imports its own stack only when it runs: torch and torch_xla are slow to import,
# and ``--help`` should be quick.


def _inspect(config: InspectConfig) -> None:
    from .data.inspection import inspect_split

    inspect_split(config)


def _train(config: TrainConfig) -> None:
    from .training.train import fit

    fit(config)


def _evaluate(config: EvaluateConfig) -> None:
    from .scoring.evaluate import evaluate_checkpoint

    evaluate_checkpoint(config)


def _video(config: VideoConfig) -> None:
    from .scoring.video import make_video

    make_video(config)


def _detect(config: DetectConfig) -> None:
    from .detection.detect import run_detect

    run_detect(config)


def _export(config: ExportConfig) -> None:
    from .detection.export import export_model

    export_model(config)


def _convert_keras(config: KerasConfig) -> None:
    from .convert.keras_weights import convert_keras

    convert_keras(config)


def _convert_tfrecords(config: TFRecordConfig) -> None:
    from .convert.tfrecords import convert_tfrecords

    convert_tfrecords(config)


def _demo(config: DemoConfig) -> None:
    from .demo import run_demo

    run_demo(config)


# name -> (settings class, what runs them, one-line help)
COMMANDS: dict[str, tuple[type, Callable[[Any], Any], str]] = {
    "synth": (SynthConfig, _synth, "write a synthetic dataset in the real dataset's layout"),
    "preprocess": (PreprocessConfig, _preprocess, "raw dataset -> WebDataset shards + manifest"),
    "inspect": (InspectConfig, _inspect, "check shards against the manifest, draw sampled windows"),
    "train": (
        TrainConfig,
        _train,
        "train ConvNet3D on TPU cores (xmp.spawn or SPMD), CPUs or GPUs (torchrun for several)",
    ),
    "evaluate": (EvaluateConfig, _evaluate, "score a checkpoint: metrics, confusion matrix, predictions"),
    "video": (VideoConfig, _video, "prediction video and contact sheet from predictions.json"),
    "detect": (
        DetectConfig,
        _detect,
        "find actions in sequences, a video or a camera: segments, metrics, timeline, annotated video",
    ),
    "export": (ExportConfig, _export, "checkpoint -> ONNX or torch.export file, checked on real windows"),
    "convert-keras": (KerasConfig, _convert_keras, "pyACT Keras .h5 weights -> pyact-torch checkpoint"),
    "convert-tfrecords": (TFRecordConfig, _convert_tfrecords, "pyACT TFRecords -> shards + manifest"),
    "demo": (DemoConfig, _demo, "the whole pipeline on a synthetic dataset, on CPU, in a few minutes"),
}


# commands that continue from where an interrupted run stopped
RESUMABLE = ("preprocess", "train")


class _Parser(argparse.ArgumentParser):
    """argparse taking whole flag names only: ``--dat`` is refused, not read as ``--data`` (nor as
    whatever flag a later version adds that also starts so). A flag no command has is reported
    by the command it was given to, with that command's usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.commands.get(parsed.command, self).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def build_parser(only: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The ``pyact`` parser, or the parser of one subcommand (for ``scripts/``)."""
    if only is not None:
        cls, _, _ = COMMANDS[only]
        parser = _Parser(prog=prog, description=_describe(cls))
        add_arguments(parser, cls)
        parser.set_defaults(command=only)
        return parser
    parser = _Parser(prog=prog or "pyact", description=package_doc)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _, text) in COMMANDS.items():
        sub = commands.add_parser(name, help=text, description=_describe(cls))
        add_arguments(sub, cls)
        sub.set_defaults(command=name)
        parser.commands[name] = sub
    return parser


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real stdout (captured, closed)
        return False


# how long a torchrun worker that leaves an error to another process to print waits before it
# exits: torchrun stops every worker as soon as one exits, which could come before the line
LINGER_S = 5.0


def _leave_the_saying() -> None:
    """Under torchrun: give the process that prints the error time to print it."""
    if under_torchrun():
        time.sleep(LINGER_S)


def main(argv: list[str] | None = None, only: str | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` and run; returns the exit status."""
    parser = build_parser(only, prog)
    if local_rank():  # under torchrun the first process of each machine prints help and usage errors
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                args = parser.parse_args(argv)
        except SystemExit:
            _leave_the_saying()
            raise
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
        else:
            _leave_the_saying()
        return 2
    except BrokenPipeError:
        if not _stdout_closed():  # another pipe or socket broke: a fault of ours, not the user's
            raise
        # the reader of our output went away (`| head`): stop as Unix tools do, without a traceback
        # (and without another one when Python flushes stdout at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        with contextlib.suppress(OSError):
            print(f"stopped: the reader of {args.command}'s output closed the pipe", file=sys.stderr)
        return 141
    except OSError as exc:
        if exc.errno not in USER_ERRNOS:
            raise
        if printed_here(exc):
            print(f"error: {exc.filename or args.command}: {exc.strerror}", file=sys.stderr)
        else:
            _leave_the_saying()
        return 2
    except KeyboardInterrupt as exc:
        if local_rank():  # under torchrun every worker of a machine gets it: its first says it
            return 130
        if isinstance(exc, Interrupted):
            print(exc, file=sys.stderr)
            return 130
        again = {
            "train": "nothing half-written was left; run the same command again: it continues from the "
            "last checkpoint saved, if there is one, else starts over"
        }.get(
            args.command,
            "run the same command again to continue where it stopped"
            if args.command in RESUMABLE
            else "nothing half-written was left",
        )
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
