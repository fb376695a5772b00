"""Frozen run settings. The command-line interface is generated from these dataclasses, so a
flag, its default, its help text and its validation live in exactly one place."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UserError, under_torchrun
from .io.storage import check_location, is_gcs

# a class name as the project writes it (the actions' own names): printed, drawn and used as a
# key, so no paths, spaces or control characters; checked in --classes and in every file that
# names classes (label files, manifests, exported models)
CLASS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")

MODALITIES = ("color", "depth", "rgbd")
AUGMENT_PRESETS = ("none", "pyact", "standard")
# pyact detect's defaults, chosen on the synthetic eval split (docs/benchmarks.md, bench/detect.py)
DETECT_SMOOTH, DETECT_MIN_LENGTH = 1, 3
MAX_BATCH = 4096  # the largest batch detection sends and an exported program takes
MAX_DISPLAY = 2048  # the largest frame drawn for a person (a screen's width)


def _arg(
    help: str,
    *,
    positional: bool = False,
    required: bool = False,
    parse: Callable[[str], Any] | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    output: bool = True,
) -> dict:
    """Field metadata for the CLI generator. ``output=False`` marks settings that do not
    change what a run writes (worker counts, paths of scratch space), so they may differ
    between a run and its resumption."""
    return {
        "help": help,
        "positional": positional,
        "required": required,
        "parse": parse,
        "choices": choices,
        "metavar": metavar,
        "output": output,
    }


def parse_names(text: str) -> tuple[str, ...]:
    """``"LN,ZZ"`` -> ``("LN", "ZZ")``; empty parts are dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_class_names(text: str) -> tuple[str, ...]:
    """``--classes``: distinct names of the form the project writes (letters, digits, ``_.+-``)."""
    names = parse_names(text)
    odd = [name for name in names if not CLASS_NAME.fullmatch(name)]
    if odd:
        raise argparse.ArgumentTypeError(
            f"{odd[0][:40]!r} is not a class name (letters, digits and '_.+-', starting with a letter or digit)"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a class is named twice in {text[:80]!r}")
    if len(names) == 1:
        raise argparse.ArgumentTypeError("give at least 2 class names (a classifier of one class says nothing)")
    return names


def parse_range(text: str) -> tuple[int, int]:
    """``"150:1000"`` -> ``(150, 1000)``."""
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with integers, got {text!r}") from None
    return low, high


def parse_counts(text: str) -> tuple[int, int, int]:
    """``"8,1,3"`` -> ``(8, 1, 3)`` (train, eval, test subjects)."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if len(counts) != 3:
        raise argparse.ArgumentTypeError(f"expected TRAIN,EVAL,TEST counts, got {text!r}")
    return counts


def parse_size(text: str) -> tuple[int, int]:
    """``"640x480"`` -> ``(640, 480)`` (width, height)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    return width, height


def default_workers() -> int:
    """All cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class PreprocessConfig:
    """Raw Hand Action dataset -> WebDataset shards (``pyact preprocess``)."""

    src: str = field(
        metadata=_arg("raw dataset folder holding Train/ and Test/ (and optionally Eval/)", positional=True)
    )
    dest: str = field(metadata=_arg("output folder or gs://bucket/prefix", positional=True))
    image_size: int = field(
        default=64,
        metadata=_arg(
            "frames are resized to SIZE x SIZE pixels, a multiple of 16 (pyACT trained at 64)", metavar="SIZE"
        ),
    )
    seq_len: int = field(
        default=0,
        metadata=_arg(
            "window length in frames; 0 = the smallest segment length over all label files, "
            "pyACT's rule (6 on the real dataset)",
            metavar="T",
        ),
    )
    shard_size: int = field(default=512, metadata=_arg("windows per shard", metavar="N"))
    workers: int = field(
        default=0,
        metadata=_arg("processes decoding frames and writing shards; 0 = all cores", metavar="N", output=False),
    )
    eval_subjects: tuple[str, ...] = field(
        default=(),
        metadata=_arg(
            "Train subjects to move to the eval split (comma-separated), added to the Eval/ folder's sequences "
            "if there is one; with neither, one Train subject is chosen by --seed",
            parse=parse_names,
            metavar="NAME[,NAME]",
        ),
    )
    modality: str = field(
        default="color",
        metadata=_arg(
            "frames to use: color (RGB, as pyACT), depth (16-bit depth mapped to 8 bits), rgbd (both, 4 channels)",
            choices=MODALITIES,
        ),
    )
    depth_range: tuple[int, int] = field(
        default=(150, 1000),
        metadata=_arg(
            "depth range in the PNG's units (millimetres on the real camera) mapped linearly to "
            "255..0: nearer is brighter; 0 (no reading) and values outside the range become 0",
            parse=parse_range,
            metavar="MIN:MAX",
        ),
    )
    seed: int = field(default=0, metadata=_arg("seed for the eval subject choice, no-action sampling and shard order"))
    overwrite: bool = field(
        default=False,
        metadata=_arg(
            "replace DEST's previous output when it was made with other settings or inputs (only pyact's own "
            "files are deleted)",
            output=False,
        ),
    )
    skip_bad_sequences: bool = field(
        default=False,
        metadata=_arg(
            "skip broken sequences (bad label file, missing or unreadable frames) instead of "
            "stopping; they are listed at the end and recorded in the manifest"
        ),
    )
    cache_dir: str = field(
        default="",
        metadata=_arg(
            "local folder in which the decoded-frame cache (a pyact-cache-<hash> folder, deleted when done) is "
            "made; without it DEST/.pyact-cache for a local DEST, the system temp dir for gs://",
            metavar="DIR",
            output=False,
        ),
    )

    def __post_init__(self) -> None:
        _locations(SRC=self.src, DEST=self.dest)
        if self.cache_dir:
            _locations(**{"--cache-dir": self.cache_dir})
        if is_gcs(self.src) or is_gcs(self.cache_dir):
            raise UserError("SRC and --cache-dir are local folders")
        _positive(image_size=self.image_size, shard_size=self.shard_size)
        if self.image_size % 16:
            raise UserError(
                f"--image-size must be a multiple of 16 (ConvNet3D pools 2x2 four times), got {self.image_size}"
            )
        if self.seq_len == 1 or self.seq_len < 0:
            raise UserError(f"--seq-len must be 0 (from the label files) or at least 2, got {self.seq_len}")
        if self.workers < 0:
            raise UserError(f"--workers must be 0 (all cores) or positive, got {self.workers}")
        low, high = self.depth_range
        if not 0 <= low < high:
            raise UserError(f"--depth-range: expected 0 <= MIN < MAX, got {low}:{high}")

    @property
    def processes(self) -> int:
        return self.workers or default_workers()


@dataclass(frozen=True)
class SynthConfig:
    """A synthetic dataset in the exact layout of the real one (``pyact synth``)."""

    out: str = field(metadata=_arg("folder to create (it must not exist or be empty)", positional=True))
    subjects: tuple[int, int, int] = field(
        default=(8, 0, 3),
        metadata=_arg(
            "number of Train, Eval and Test subjects; EVAL 0 = no Eval/ folder",
            parse=parse_counts,
            metavar="TRAIN,EVAL,TEST",
        ),
    )
    frames: tuple[int, int] = field(
        default=(60, 100),
        metadata=_arg("frames per sequence, drawn uniformly from MIN..MAX", parse=parse_range, metavar="MIN:MAX"),
    )
    size: tuple[int, int] = field(
        default=(640, 480),
        metadata=_arg(
            "color frame size; depth and confidence frames are half of it, as on the real camera",
            parse=parse_size,
            metavar="WxH",
        ),
    )
    min_segment: int = field(
        default=6,
        metadata=_arg(
            "shortest action segment; the first segment of each subject's first action has exactly this "
            "length, so it becomes the window length (--frames MIN must be at least 2N+2)",
            metavar="N",
        ),
    )
    detection: int = field(
        default=10,
        metadata=_arg(
            "long recordings in TestDetection/ (as the real dataset's 10), each by a subject of its own with 4 to 7 "
            "actions of different classes between background runs; 0 = no TestDetection/",
            metavar="N",
        ),
    )
    seed: int = field(default=0, metadata=_arg("random seed; the same seed gives the same files"))
    workers: int = field(default=0, metadata=_arg("processes writing frames; 0 = all cores", metavar="N", output=False))

    def __post_init__(self) -> None:
        _locations(OUT=self.out)
        if is_gcs(self.out):
            raise UserError(f"{self.out}: the synthetic dataset is written to a local folder")
        n_train, n_eval, n_test = self.subjects
        if n_train < 1 or n_test < 1 or n_eval < 0:
            raise UserError("--subjects: need at least 1 Train and 1 Test subject")
        low, high = self.frames
        if not 2 * self.min_segment + 2 <= low <= high:
            raise UserError(f"--frames: need {2 * self.min_segment + 2} <= MIN <= MAX, got {low}:{high}")
        if self.min_segment < 2:  # the window length: preprocessing needs at least 2 frames
            raise UserError(f"--min-segment must be at least 2, got {self.min_segment}")
        if not 0 <= self.detection <= 100:
            raise UserError(f"--detection must be 0 to 100, got {self.detection}")
        if not 16 <= min(self.size) <= max(self.size) <= 4096:  # as any frame file preprocessing reads
            raise UserError(f"--size: frames must be 16x16 to 4096x4096, got {self.size[0]}x{self.size[1]}")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must be 0 to {2**32 - 1}, got {self.seed}")
        if self.workers < 0:
            raise UserError(f"--workers must be 0 (all cores) or positive, got {self.workers}")

    @property
    def processes(self) -> int:
        return self.workers or default_workers()


@dataclass(frozen=True)
class TrainConfig:
    """Train ConvNet3D on every replica: TPU cores (xmp.spawn or SPMD), or CPUs and GPUs (one
    process, or one per device under torchrun) (``pyact train``)."""

    data: str = field(
        metadata=_arg("preprocessed dataset (folder or gs://) holding manifest.json", required=True, metavar="DEST")
    )
    run_dir: str = field(
        metadata=_arg(
            "where checkpoints, metrics.jsonl, config.json and the loss plot go (folder or gs://bucket/prefix)",
            required=True,
            metavar="DIR",
        )
    )
    model: str = field(
        default="c3d",
        metadata=_arg(
            "network: c3d (pyACT 0.0.7's ConvNet3D, 206.5M parameters at its 6x64x64 RGB input), c3d-v1 (pyACT "
            "1.x's: an initial conv and four blocks of two, 95.3M; frames a multiple of 32) or tiny (c3d's layers, "
            "narrow)",
            choices=("c3d", "c3d-v1", "tiny"),
        ),
    )
    epochs: int = field(default=250, metadata=_arg("passes over the training split (pyACT: 250)", metavar="N"))
    batch_size: int = field(
        default=32, metadata=_arg("global batch, divided evenly across replicas (pyACT: 32 over 8 cores)", metavar="N")
    )
    lr: float = field(default=1e-3, metadata=_arg("Adam learning rate (pyACT: Keras default 1e-3)"))
    lr_schedule: str = field(
        default="constant",
        metadata=_arg("constant (pyACT) or cosine decay to 0 over all steps", choices=("constant", "cosine")),
    )
    device: str = field(
        default="auto",
        metadata=_arg(
            "auto: xla when torch_xla is installed and a TPU is attached or PJRT_DEVICE is set (never under "
            "torchrun), else cuda when there is a GPU, else cpu (the choice is printed); xla: torch_xla on every "
            "local core (the TPU's, else XLA:CPU); "
            "cpu: plain eager PyTorch; cuda: a GPU. cpu and cuda run one replica, or under torchrun one per "
            "process (gloo between CPU processes, NCCL between GPUs, the GPU of each process set by LOCAL_RANK)",
            choices=("auto", "xla", "cpu", "cuda"),
            output=False,
        ),
    )
    parallel: str = field(
        default="xmp",
        metadata=_arg(
            "with --device xla: xmp = one process per device (xmp.spawn), BatchNorm statistics per device; "
            "spmd = one process per host sharding the global batch over every device, BatchNorm statistics "
            "over the global batch",
            choices=("xmp", "spmd"),
            output=False,
        ),
    )
    precision: str = field(
        default="fp32",
        metadata=_arg("fp32, or bf16 autocast (TPU, GPU; the loss stays fp32)", choices=("fp32", "bf16")),
    )
    sync_bn: bool = field(
        default=False,
        metadata=_arg(
            "with --device cuda under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm, as "
            "under --parallel spmd) instead of per replica (as under xmp.spawn and pyACT)"
        ),
    )
    compile: bool = field(
        default=False,
        metadata=_arg(
            "with --device cpu or cuda: run the model through torch.compile (slower start, faster steps)", output=False
        ),
    )
    collective_timeout: float = field(
        default=600.0,
        metadata=_arg(
            "under torchrun: seconds a replica waits in a collective for the others before it gives up with "
            "one line (a replica died or hangs); long enough for a checkpoint upload",
            metavar="SECONDS",
            output=False,
        ),
    )
    ckpt_every: int = field(
        default=1000,
        metadata=_arg(
            "checkpoint every N steps as well as at each epoch end; 0 = epoch ends only", metavar="N", output=False
        ),
    )
    keep: int = field(default=3, metadata=_arg("checkpoints kept besides the best", metavar="N", output=False))
    resume: str = field(
        default="auto",
        metadata=_arg(
            "auto: continue from RUN_DIR/latest.json if present; none: start over; or the path of a training "
            "checkpoint to continue (same data and settings; weights-only files are refused)",
            metavar="auto|none|PATH",
            output=False,
        ),
    )
    log_every: int = field(
        default=50,
        metadata=_arg(
            "log loss and windows/s every N steps, and at the last step of every epoch", metavar="N", output=False
        ),
    )
    workers: int = field(
        default=2,
        metadata=_arg(
            "data-loading processes per replica (0 = load in the training process); a lone replica uses at most "
            "one per train shard; several need replicas x workers shards; keep it to resume",
            metavar="N",
            output=False,
        ),
    )
    shuffle_buffer: int = field(
        default=1000,
        metadata=_arg(
            "windows in each loader's shuffle buffer (0 or 1 = no window shuffle; shard order is still shuffled)",
            metavar="N",
        ),
    )
    augment: str = field(
        default="none",
        metadata=_arg(
            "transform each training window on the fly, the same way on all its frames (eval and test windows "
            "never): none (pyACT 0.0.7); pyact (pyACT 1.0.4's set: a rotation by 0, 5, ..., 35 degrees times no "
            "flip, a left-right, a top-bottom or both flips, one drawn per window); standard (small rotation, "
            "scale and shift, brightness, contrast, gamma and per-channel gain; no flips, which reverse an action's "
            "motion)",
            choices=AUGMENT_PRESETS,
        ),
    )
    dropout: float = field(
        default=0.0,
        metadata=_arg(
            "dropout probability after each of the two hidden Dense layers while training (pyACT 1.0.2+: 0.2; "
            "0.0.7: 0)",
            metavar="P",
        ),
    )
    weight_decay: float = field(
        default=0.0,
        metadata=_arg(
            "L2 penalty on every Conv3d kernel as pyACT 1.0.3's kernel_regularizer=l2(W) (1e-4 there): the loss "
            "gains W x the sum of the kernels' squares, so Adam sees it like the data's gradient (biases, BatchNorm "
            "and Dense are not decayed)",
            metavar="W",
        ),
    )
    seed: int = field(default=0, metadata=_arg("seed for weights, shard order, shuffling, augmentation and dropout"))

    def __post_init__(self) -> None:
        _locations(**{"--data": self.data, "--run-dir": self.run_dir})
        if not (math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            raise UserError(f"--dropout must be at least 0 and below 1, got {self.dropout:g}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay <= 1):
            raise UserError(f"--weight-decay must be 0 to 1 (pyACT 1.x: 1e-4), got {self.weight_decay:g}")
        if self.resume not in ("auto", "none"):
            _locations(**{"--resume": self.resume})
        _positive(epochs=self.epochs, batch_size=self.batch_size, keep=self.keep, log_every=self.log_every)
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1e3):  # float32 overflows inside Adam near 1e38
            raise UserError(f"--lr must be a positive number up to 1000, got {self.lr:g}")
        if self.ckpt_every < 0 or self.workers < 0 or self.shuffle_buffer < 0:
            raise UserError("--ckpt-every, --workers and --shuffle-buffer must be 0 or positive")
        if self.parallel == "spmd" and self.device not in ("xla", "auto"):
            raise UserError("--parallel spmd needs --device xla")
        if self.sync_bn and self.device not in ("cuda", "auto"):
            raise UserError(
                "--sync-bn needs --device cuda (SyncBatchNorm runs on GPUs only); on TPUs "
                "--parallel spmd computes BatchNorm statistics over the global batch"
            )
        if self.compile and self.device == "xla":
            raise UserError("--compile is for --device cpu or cuda (XLA compiles every step already)")
        if not (math.isfinite(self.collective_timeout) and 1 <= self.collective_timeout <= 86400):
            raise UserError(f"--collective-timeout must be 1 to 86400 seconds, got {self.collective_timeout}")
        if self.distributed and self.device == "xla":
            raise UserError(
                "torchrun runs --device cpu or cuda; on TPUs run the command itself on every host "
                "(xmp.spawn or --parallel spmd starts the replicas)"
            )

    @property
    def backend(self) -> str:
        """The device backend to run: ``cpu``, ``cuda``, ``xla`` (xmp.spawn) or ``spmd``."""
        return "spmd" if self.device == "xla" and self.parallel == "spmd" else self.device

    @property
    def distributed(self) -> bool:
        """One replica of a torchrun launch (torch.distributed)."""
        return under_torchrun()


@dataclass(frozen=True)
class EvaluateConfig:
    """Score a checkpoint on one split: metrics, per-class table, confusion matrix, one
    prediction row per window (``pyact evaluate``)."""

    checkpoint: str = field(
        metadata=_arg(
            "a checkpoint object (.pt), or a run directory (its best.json, else final.json, else latest.json, "
            "else the newest ckpt-<step>.pt); folder or gs://",
            required=True,
            metavar="CKPT",
        )
    )
    data: str = field(
        metadata=_arg("preprocessed dataset (folder or gs://) holding manifest.json", required=True, metavar="DEST")
    )
    out: str = field(
        metadata=_arg(
            "folder (or gs://) for metrics.json, per_class.txt, confusion_matrix.png and predictions.json",
            required=True,
            metavar="DIR",
        )
    )
    split: str = field(default="test", metadata=_arg("split to score", choices=("train", "eval", "test")))
    device: str = field(
        default="auto",
        metadata=_arg(
            "auto: xla when torch_xla is installed and a TPU is attached or PJRT_DEVICE is set, else cuda when "
            "there is a GPU, else cpu (the choice is printed); xla: one XLA device (TPU, else XLA:CPU); "
            "cpu: plain eager PyTorch; cuda: one GPU",
            choices=("auto", "xla", "cpu", "cuda"),
        ),
    )
    batch_size: int = field(default=32, metadata=_arg(f"windows per forward pass (at most {MAX_BATCH})", metavar="N"))

    def __post_init__(self) -> None:
        _locations(**{"--checkpoint": self.checkpoint, "--data": self.data, "--out": self.out})
        _positive(batch_size=self.batch_size)
        if self.batch_size > MAX_BATCH:
            raise UserError(f"--batch-size must be at most {MAX_BATCH}, got {self.batch_size}")


@dataclass(frozen=True)
class VideoConfig:
    """The prediction video, sequence by sequence in frame order, each frame once with the
    sequence, the frame number and the truth and prediction of the window ending at it; plus a
    PNG contact sheet of windows, the classes in turn (``pyact video``)."""

    predictions: str = field(metadata=_arg("predictions.json written by pyact evaluate", positional=True))
    out: str = field(
        metadata=_arg(
            "video file to write (.mp4, .m4v, .mov or .avi; an .avi with MJPG where mp4 is "
            "missing); the contact sheet goes next to it as <name>-sheet.png",
            positional=True,
        )
    )
    src: str = field(default="", metadata=_arg("raw dataset folder to take full-size frames from", metavar="SRC"))
    data: str = field(
        default="", metadata=_arg("without --src: the shards (folder or gs://) to take the frames from", metavar="DEST")
    )
    split: str = field(
        default="test", metadata=_arg("with --data: the split that was scored", choices=("train", "eval", "test"))
    )
    sequences: tuple[str, ...] = field(
        default=(),
        metadata=_arg(
            "only these sequences: comma-separated names or patterns with * and ?, e.g. 'Test/alvin/*,*/asl-z'",
            parse=parse_names,
            metavar="PATTERNS",
        ),
    )
    wrong: bool = field(
        default=False, metadata=_arg("only the wrongly classified windows (each shown with its frames, once)")
    )
    fps: float = field(default=30.0, metadata=_arg("frames per second of the video (the camera's: 30; at most 240)"))
    size: int = field(
        default=256,
        metadata=_arg(
            "video frames are padded to a square and shown at SIZE x SIZE (the contact sheet's are 128)", metavar="SIZE"
        ),
    )
    sheet_windows: int = field(
        default=16,
        metadata=_arg(
            "windows on the contact sheet (at most 1000), the truth classes in turn, each spread evenly", metavar="N"
        ),
    )
    max_windows: int = field(
        default=0,
        metadata=_arg(
            "only the first N windows in sequence and frame order (after --sequences and --wrong); 0 = all", metavar="N"
        ),
    )

    def __post_init__(self) -> None:
        _locations(PREDICTIONS=self.predictions, OUT=self.out)
        for flag, value in (("--src", self.src), ("--data", self.data)):
            if value:
                _locations(**{flag: value})
        _positive(size=self.size, sheet_windows=self.sheet_windows)
        _at_most(MAX_DISPLAY, size=self.size)
        _at_most(1000, sheet_windows=self.sheet_windows)
        if not (math.isfinite(self.fps) and 0 < self.fps <= 240):
            raise UserError(f"--fps must be positive and at most 240, got {self.fps:g}")
        if self.max_windows < 0:
            raise UserError(f"--max-windows must be 0 (all) or positive, got {self.max_windows}")


@dataclass(frozen=True)
class DetectConfig:
    """Find hand actions in whole sequences, a video file or a live camera, frame by frame:
    segments, metrics against the label files, timeline and annotated video (``pyact detect``)."""

    checkpoint: str = field(
        default="",
        metadata=_arg(
            "the model: a checkpoint object (.pt) or run directory (folder or gs://), run with eager PyTorch (on "
            "the CPU, or a GPU with --device cuda)",
            metavar="CKPT",
        ),
    )
    model: str = field(
        default="",
        metadata=_arg(
            "instead of --checkpoint: a file written by pyact export (.onnx runs on ONNX Runtime without "
            "torch; .pt2 is a torch.export program)",
            metavar="FILE",
        ),
    )
    src: str = field(
        default="",
        metadata=_arg(
            "a raw dataset folder (every sequence of --split) or one sequence folder (its color_<i>.png "
            "frames; its <folder>.xml label file is used when present)",
            metavar="SRC",
        ),
    )
    split: str = field(
        default="test",
        metadata=_arg(
            "with a dataset --src: the split to run over (eval = the Eval/ folder plus the Train subjects "
            "the checkpoint's data moved there; testdetection = the long recordings of TestDetection/, several "
            "actions each, their segments labelled one by one)",
            choices=("train", "eval", "test", "testdetection"),
        ),
    )
    labels: str = field(
        default="",
        metadata=_arg(
            "a segment list to score against instead of the label files: CSV with the header "
            "sequence,action,first,last (frames inclusive) or JSON, a list of such objects; a row's sequence is a "
            "source's name as detect prints it, or its last part (a recording's folder name)",
            metavar="FILE",
        ),
    )
    video: str = field(default="", metadata=_arg("a video file (colour only)", metavar="FILE"))
    camera: int = field(
        default=-1,
        metadata=_arg(
            "a camera index for OpenCV (colour only; -1 = none); segments are printed as they are found; "
            "Ctrl-C stops and writes what was found",
            metavar="N",
        ),
    )
    out: str = field(
        default="",
        metadata=_arg(
            "folder (or gs://) for detections.json, probabilities.npz, metrics.json, timeline.png and "
            "detections.mp4 (local folders only; .avi where OpenCV cannot write mp4); optional with --camera",
            metavar="DIR",
        ),
    )
    smooth: int = field(
        default=DETECT_SMOOTH,
        metadata=_arg(
            "average each window's class probabilities with the K-1 windows before it (causal) before "
            "taking the label; odd (at most 999; 1 = none), so the lag is whole frames; chosen on the synthetic "
            "eval split",
            metavar="K",
        ),
    )
    min_length: int = field(
        default=DETECT_MIN_LENGTH,
        metadata=_arg("an action run of fewer windows is background; chosen on the synthetic eval split", metavar="N"),
    )
    batch_size: int = field(
        default=32,
        metadata=_arg(
            f"windows per forward pass (at most {MAX_BATCH}) for folders and splits (the same probabilities as one "
            "at a time, up to float rounding); video and camera go one frame at a time",
            metavar="N",
        ),
    )
    streaming: bool = field(
        default=False,
        metadata=_arg("classify folders and splits one frame at a time too, exactly as a camera (measures latency)"),
    )
    depth_range: tuple[int, int] | tuple[()] = field(
        default=(),
        metadata=_arg(
            "depth range of depth/rgbd frames: needed when the checkpoint (or exported file) records none, used "
            "instead of the recorded one when given",
            parse=parse_range,
            metavar="MIN:MAX",
        ),
    )
    max_frames: int = field(
        default=0, metadata=_arg("video/camera: stop after N frames; 0 = until it ends", metavar="N")
    )
    no_video: bool = field(default=False, metadata=_arg("do not write the annotated video"))
    video_size: int = field(default=256, metadata=_arg("frames of the annotated video are SIZE x SIZE", metavar="SIZE"))
    device: str = field(
        default="cpu",
        metadata=_arg(
            "with --checkpoint: cpu, or cuda to run the network on a GPU (--model files run on the CPU)",
            choices=("cpu", "cuda"),
        ),
    )
    threads: int = field(
        default=0,
        metadata=_arg(
            "intra-op CPU threads of the network; 0 = automatic: when windows go one at a time (--streaming, "
            "--video, --camera) the fastest of 1, 2, 4, ... is measured at the start and printed; for batches, and "
            "with --device cuda, the library's default (one per core)",
            metavar="N",
        ),
    )

    def __post_init__(self) -> None:
        if self.threads < 0 or self.threads > 1024:
            raise UserError(f"--threads must be 0 (choose by measurement) or 1 to 1024, got {self.threads}")
        if bool(self.checkpoint) == bool(self.model):
            raise UserError("give one of --checkpoint (a checkpoint or run directory) or --model (an exported file)")
        sources = [
            flag
            for flag, given in (("--src", self.src), ("--video", self.video), ("--camera", self.camera >= 0))
            if given
        ]
        if len(sources) != 1:
            raise UserError(
                "give exactly one source: --src (dataset or sequence folder), --video FILE or --camera N"
                + (f" (got {', '.join(sources)})" if sources else "")
            )
        for flag, value in (
            ("--checkpoint", self.checkpoint),
            ("--src", self.src),
            ("--video", self.video),
            ("--out", self.out),
            ("--model", self.model),
        ):
            if value:
                _locations(**{flag: value})
        if not self.out and self.camera < 0:
            raise UserError("--out is required (only --camera may run without it)")
        if self.labels and not self.src:
            raise UserError(
                "--labels scores frame folders and dataset splits (--src); a video or camera has no "
                "frame numbers to match it"
            )
        if self.labels:
            _locations(**{"--labels": self.labels})
        if any(is_gcs(value) for value in (self.src, self.video, self.model, self.labels)):
            raise UserError("--src, --video, --model and --labels are read from local paths")
        if is_gcs(self.out) and not self.no_video:
            raise UserError(f"--out {self.out}: the annotated video is written to a local folder; add --no-video")
        _positive(
            smooth=self.smooth, min_length=self.min_length, batch_size=self.batch_size, video_size=self.video_size
        )
        if self.smooth % 2 == 0 or self.smooth > 999:
            raise UserError(f"--smooth must be odd and at most 999, got {self.smooth}")
        _at_most(100_000, min_length=self.min_length)
        _at_most(MAX_BATCH, batch_size=self.batch_size)
        _at_most(MAX_DISPLAY, video_size=self.video_size)
        if self.max_frames < 0:
            raise UserError("--max-frames must be 0 or positive")
        if self.device == "cuda" and self.model:
            raise UserError(
                "--device cuda runs a --checkpoint; a --model file runs on the CPU (ONNX Runtime or "
                "torch.export as exported)"
            )
        if self.depth_range and not 0 <= self.depth_range[0] < self.depth_range[1] <= 65535:
            raise UserError(f"--depth-range {self.depth_range[0]}:{self.depth_range[1]}: need 0 <= MIN < MAX <= 65535")


@dataclass(frozen=True)
class ExportConfig:
    """Export a checkpoint as ONNX (dynamic batch) or a torch.export program, checked against
    the checkpoint on real windows before it is written (``pyact export``)."""

    checkpoint: str = field(
        metadata=_arg("checkpoint object (.pt) or run directory (folder or gs://)", required=True, metavar="CKPT")
    )
    out: str = field(
        metadata=_arg(
            "file to write: .onnx (ONNX, run by ONNX Runtime) or .pt2 (torch.export)", required=True, metavar="FILE"
        )
    )
    src: str = field(
        default="",
        metadata=_arg(
            "raw dataset folder (the first windows of its first Test sequence) or one sequence folder, whose "
            "windows check the export",
            metavar="SRC",
        ),
    )
    data: str = field(
        default="",
        metadata=_arg(
            "instead of --src: shards (folder or gs://) whose first test windows check the export; with "
            "neither, the shards the checkpoint was trained on (its recorded --data)",
            metavar="DEST",
        ),
    )
    windows: int = field(default=8, metadata=_arg("real windows the export is checked on", metavar="N"))
    device: str = field(
        default="cpu",
        metadata=_arg(
            "cpu, or cuda to run the checkpoint's reference logits on a GPU (without TF32; the check then allows "
            "1e-3 instead of 1e-4 for the other device's rounding); the file itself is traced on the CPU and runs "
            "anywhere",
            choices=("cpu", "cuda"),
        ),
    )
    depth_range: tuple[int, int] | tuple[()] = field(
        default=(),
        metadata=_arg(
            "depth range of depth/rgbd frames: needed when the checkpoint (or exported file) records none, used "
            "instead of the recorded one when given",
            parse=parse_range,
            metavar="MIN:MAX",
        ),
    )

    def __post_init__(self) -> None:
        _locations(**{"--checkpoint": self.checkpoint, "--out": self.out})
        if is_gcs(self.out) or os.path.splitext(self.out)[1] not in (".onnx", ".pt2"):
            raise UserError(f"--out {self.out}: give a local .onnx or .pt2 file")
        if self.src and self.data:
            raise UserError("give one of --src (raw frames) or --data (shards) for the windows that check the export")
        for flag, value in (("--src", self.src), ("--data", self.data)):
            if value:
                _locations(**{flag: value})
        _positive(windows=self.windows)
        if self.windows > MAX_BATCH:
            raise UserError(f"--windows must be at most {MAX_BATCH}, got {self.windows}")


@dataclass(frozen=True)
class InspectConfig:
    """Check shards against their manifest and draw sampled windows (``pyact inspect``)."""

    data: str = field(
        metadata=_arg("preprocessed dataset (folder or gs://) holding manifest.json", positional=True, metavar="DEST")
    )
    out: str = field(metadata=_arg("PNG grid of sampled windows to write", required=True, metavar="PNG"))
    split: str = field(default="train", metadata=_arg("split to inspect", choices=("train", "eval", "test")))
    n: int = field(default=16, metadata=_arg("windows to draw, one row each (at most 1000)", metavar="N"))
    size: int = field(
        default=96, metadata=_arg("frames are shown at SIZE x SIZE pixels in the grid (at most 2048)", metavar="SIZE")
    )
    seed: int = field(default=0, metadata=_arg("seed for the choice of windows"))

    def __post_init__(self) -> None:
        _locations(DEST=self.data, **{"--out": self.out})
        _positive(n=self.n, size=self.size)
        _at_most(MAX_DISPLAY, size=self.size)
        _at_most(1000, n=self.n)


@dataclass(frozen=True)
class KerasConfig:
    """Convert pyACT's Keras HDF5 weights (save_weights or ModelCheckpoint file) to a
    pyact-torch checkpoint, without TensorFlow (``pyact convert-keras``)."""

    h5: str = field(metadata=_arg("pyACT's .h5 file (weights-only or whole model)", positional=True))
    out: str = field(metadata=_arg("checkpoint to write (.pt; local or gs://)", positional=True))
    classes: tuple[str, ...] = field(
        default=(),
        metadata=_arg(
            "the model's output classes in order, comma-separated; none = the order of pyACT's score.py",
            parse=parse_class_names,
            metavar="NAME,...",
        ),
    )
    seq_len: int = field(
        default=6,
        metadata=_arg(
            "frames per window, used when the file has no model config to read the input shape from", metavar="T"
        ),
    )
    model: str = field(
        default="auto",
        metadata=_arg(
            "the network the file must hold: auto = read from its layer names (CONV3D_1..4: pyACT 0.0.7's, as c3d or "
            "tiny; INITIAL_CONV3D and CONV3D_n_C1/c2: pyACT 1.x's, as c3d-v1); another network is refused",
            choices=("auto", "c3d", "c3d-v1", "tiny"),
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=_arg("replace OUT when it exists; only a pyact-torch checkpoint is ever replaced", output=False),
    )

    def __post_init__(self) -> None:
        _locations(H5=self.h5, OUT=self.out)
        _positive(seq_len=self.seq_len)


@dataclass(frozen=True)
class TFRecordConfig:
    """Convert pyACT's TFRecords of one split to shards + manifest, without TensorFlow
    (``pyact convert-tfrecords``)."""

    src: str = field(
        metadata=_arg("a .tfrecords file, or a folder or gs:// prefix of them (one split)", positional=True)
    )
    dest: str = field(
        metadata=_arg(
            "output folder or gs://bucket/prefix; converting another split into the "
            "same DEST adds it to the manifest, converting a split it holds replaces "
            "that split's shards",
            positional=True,
        )
    )
    split: str = field(
        default="",
        metadata=_arg(
            "split of records whose folder and file names name none; a name with a word train, eval/val/"
            "validation or test (the nearest to the records) outranks it, and a conflict is refused; none = "
            "train for such records. A SRC whose records fall in several splits is refused",
            choices=("train", "eval", "test"),
        ),
    )
    classes: tuple[str, ...] = field(
        default=(),
        metadata=_arg(
            "class names of the label indices, comma-separated; none = the order of pyACT's score.py",
            parse=parse_class_names,
            metavar="NAME,...",
        ),
    )
    seq_len: int = field(default=6, metadata=_arg("frames per window (pyACT: 6)", metavar="T"))
    shard_size: int = field(default=512, metadata=_arg("windows per shard", metavar="N"))
    skip_corrupt: bool = field(
        default=False,
        metadata=_arg("skip records that fail their CRC check (and the rest of a truncated file) instead of stopping"),
    )

    def __post_init__(self) -> None:
        _locations(SRC=self.src, DEST=self.dest)
        _positive(seq_len=self.seq_len, shard_size=self.shard_size)


@dataclass(frozen=True)
class DemoConfig:
    """The whole pipeline on a small synthetic dataset, on CPU: synth -> preprocess -> train
    tiny (--augment standard) -> score the test split -> video -> detect (``pyact demo``)."""

    out: str = field(
        default="demo-output",
        metadata=_arg(
            "folder for everything: raw/, shards/, run/ (checkpoints, metrics, loss plot), the scoring "
            "outputs, loss.png, the video and detection/; an earlier demo's output there is replaced, any other "
            "non-empty folder is refused",
            metavar="DIR",
        ),
    )
    gcs_emulator: bool = field(
        default=False,
        metadata=_arg(
            "keep shards and checkpoints in a bucket of a local fake-gcs-server (its files under DIR/gcs), "
            "to see the gs:// path work without a cloud account"
        ),
    )
    device: str = field(
        default="cpu",
        metadata=_arg(
            "cpu: eager PyTorch (fastest here); xla: the TPU code path on XLA:CPU (xmp.spawn, ~5x slower)",
            choices=("cpu", "xla"),
        ),
    )
    epochs: int = field(default=10, metadata=_arg("training epochs", metavar="N"))
    seed: int = field(default=3, metadata=_arg("seed of the synthetic dataset and of training"))

    def __post_init__(self) -> None:
        _locations(**{"--out": self.out})
        if is_gcs(self.out):
            raise UserError("--out: the demo writes to a local folder (use --gcs-emulator for gs://)")
        _positive(epochs=self.epochs)


def _locations(**values: str) -> None:
    """Every location flag is a non-empty local path or gs:// URL (never another URL scheme)."""
    for flag, value in values.items():
        check_location(value, flag)


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _at_most(limit: int, **values: int) -> None:
    for name, value in values.items():
        if value > limit:
            raise UserError(f"--{name.replace('_', '-')} must be at most {limit}, got {value}")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argparse argument per dataclass field of ``cls``."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        name = f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"help": meta["help"]}
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if meta["positional"]:
            parser.add_argument(f.name, **kwargs)
            continue
        if meta["required"]:
            parser.add_argument(f"--{name}", required=True, dest=f.name, **kwargs)
            continue
        if f.type in ("bool", bool):
            parser.add_argument(f"--{name}", action="store_true", dest=f.name, help=meta["help"])
            continue
        default: Any = f.default
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        kwargs["type"] = meta["parse"] or type(default)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if meta["parse"] is parse_range or meta["parse"] is parse_size:
            shown = ("x" if meta["parse"] is parse_size else ":").join(map(str, default))
        kwargs["help"] = f"{meta['help']} (default: {shown if shown != '' else 'none'})"
        parser.add_argument(f"--{name}", default=default, dest=f.name, **kwargs)


def from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    """Build ``cls`` from parsed arguments."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


def output_settings(config: Any) -> dict:
    """The settings that determine a run's output (those a resumed run must share)."""
    return {
        f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config) if f.metadata.get("output", True)
    }


def to_dict(config: Any) -> dict:
    """All settings, JSON-ready."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
