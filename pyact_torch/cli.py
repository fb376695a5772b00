"""The ``pyact`` command and its subcommands; ``scripts/*.py`` call the same functions.

Mistakes a user can fix end with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable

from .config import (DemoConfig, InspectConfig, KerasConfig, PreprocessConfig, ScoreConfig, SynthConfig,
                     TFRecordConfig, TrainConfig, VideoConfig, add_arguments, from_namespace)
from . import __doc__ as package_doc
from .errors import UserError


def _synth(args: argparse.Namespace) -> None:
    from .synthetic import make_dataset

    config = from_namespace(SynthConfig, args)
    frames = make_dataset(config)
    print(f"wrote {frames} frames to {config.out}")


def _preprocess(args: argparse.Namespace) -> None:
    from .preprocess import format_summary, preprocess

    summary = preprocess(from_namespace(PreprocessConfig, args))
    print(format_summary(summary))


def _train(args: argparse.Namespace) -> None:
    from .train import fit

    fit(from_namespace(TrainConfig, args))


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluate import score_checkpoint

    score_checkpoint(from_namespace(ScoreConfig, args))


def _video(args: argparse.Namespace) -> None:
    from .video import make_video

    make_video(from_namespace(VideoConfig, args))


def _inspect(args: argparse.Namespace) -> None:
    from .inspection import inspect_split

    inspect_split(from_namespace(InspectConfig, args))


def _convert_keras(args: argparse.Namespace) -> None:
    from .convert import convert_keras

    convert_keras(from_namespace(KerasConfig, args))


def _convert_tfrecords(args: argparse.Namespace) -> None:
    from .convert import convert_tfrecords

    convert_tfrecords(from_namespace(TFRecordConfig, args))


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(from_namespace(DemoConfig, args))


COMMANDS: dict[str, tuple[type, Callable[[argparse.Namespace], None], str]] = {
    "synth": (SynthConfig, _synth, "write a synthetic dataset in the real dataset's layout"),
    "preprocess": (PreprocessConfig, _preprocess, "raw dataset -> WebDataset shards + manifest"),
    "train": (TrainConfig, _train, "train ConvNet3D on TPU cores (xmp.spawn) or CPU"),
    "evaluate": (ScoreConfig, _evaluate, "score a checkpoint: metrics, confusion matrix, predictions"),
    "video": (VideoConfig, _video, "prediction video and contact sheet from predictions.json"),
    "inspect": (InspectConfig, _inspect, "check shards against the manifest, draw sampled windows"),
    "convert-keras": (KerasConfig, _convert_keras, "pyACT Keras .h5 weights -> pyact-torch checkpoint"),
    "convert-tfrecords": (TFRecordConfig, _convert_tfrecords, "pyACT TFRecords -> shards + manifest"),
    "demo": (DemoConfig, _demo, "the whole pipeline on a synthetic dataset, on CPU, in a few minutes"),
}


def build_parser(only: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The ``pyact`` parser, or the parser of one subcommand (for ``scripts/``)."""
    if only is not None:
        cls, run, text = COMMANDS[only]
        parser = argparse.ArgumentParser(prog=prog, description=_describe(cls))
        add_arguments(parser, cls)
        parser.set_defaults(run=run)
        return parser
    parser = argparse.ArgumentParser(prog=prog or "pyact", description=package_doc)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, run, text) in COMMANDS.items():
        sub = commands.add_parser(name, help=text, description=_describe(cls))
        add_arguments(sub, cls)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None, only: str | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` and run; returns the exit status."""
    args = build_parser(only, prog).parse_args(argv)
    try:
        args.run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    return 0


def _describe(cls: type) -> str:
    return re.split(r"\s*\(``", " ".join((cls.__doc__ or "").split()))[0] + "."
