"""What classifies windows for detection: a checkpoint (eager PyTorch on CPU), or an exported
file (ONNX through ONNX Runtime, or a ``torch.export`` program). Each takes uint8
``(N, T, H, W, C)`` clips and gives class probabilities ``(N, classes)`` (float64, one softmax
for all), and carries :class:`ModelInfo`: what frames it takes.

This module imports neither torch nor torch_xla at the top: an ONNX model runs with
onnxruntime and numpy only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from ..errors import UserError
from ..config import CLASS_NAME
from ..data.frames import CHANNELS, FrameSpec
from ..data.labels import NO_ACTION

METADATA_KEY = "pyact"  # the ONNX metadata_props key / the .pt2 extra file holding ModelInfo
INFO_FORMAT = "pyact-torch-model/1"
METADATA_LIMIT = 1 << 16  # bytes: 17 class names and a few settings take about 500
SUBJECT_NAME = re.compile(r"[^/\x00-\x1f\x7f.][^/\x00-\x1f\x7f]{0,254}")


@dataclass(frozen=True)
class ModelInfo:
    """What a model takes and gives: frames prepared as ``modality`` at ``image_size`` (depth
    mapped from ``depth_range``), windows of ``seq_len``, one output per class."""

    classes: tuple[str, ...]
    seq_len: int
    image_size: int
    modality: str
    depth_range: tuple[int, ...] | None  # (low, high)
    eval_subjects: tuple[str, ...] | None = None

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        return self.seq_len, self.image_size, self.image_size, len(CHANNELS[self.modality])

    def spec(self, where: str) -> FrameSpec:
        """How to prepare raw frames for this model."""
        if self.modality != "color" and self.depth_range is None:
            raise UserError(
                f"{where}: does not record the depth range its frames were made with; give --depth-range MIN:MAX"
            )
        return FrameSpec(self.modality, self.image_size, tuple(self.depth_range or (0, 1)))

    def to_json(self) -> str:
        return json.dumps({"format": INFO_FORMAT, **asdict(self)})

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "ModelInfo":
        """Validated: a model file's metadata is data, like any other file's."""
        try:
            info = cls(
                tuple(data["classes"]),
                data["seq_len"],
                data["image_size"],
                data["modality"],
                None if data.get("depth_range") is None else tuple(data["depth_range"]),
                None if data.get("eval_subjects") is None else tuple(data["eval_subjects"]),
            )
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}: its pyact metadata is malformed") from None
        ok = (
            2 <= len(info.classes) <= 1000
            and all(isinstance(c, str) and CLASS_NAME.fullmatch(c) for c in info.classes)
            and len(set(info.classes)) == len(info.classes)
            and NO_ACTION in info.classes
            and isinstance(info.seq_len, int)
            and 2 <= info.seq_len <= 1000
            and isinstance(info.image_size, int)
            and 16 <= info.image_size <= 4096
            and info.modality in CHANNELS
            and (
                info.depth_range is None
                or (
                    len(info.depth_range) == 2
                    and all(isinstance(v, int) for v in info.depth_range)
                    and 0 <= info.depth_range[0] < info.depth_range[1] <= 65535
                )
            )
            and (
                info.eval_subjects is None
                or (
                    len(info.eval_subjects) <= 10_000
                    and all(isinstance(s, str) and SUBJECT_NAME.fullmatch(s) for s in info.eval_subjects)
                )
            )
        )
        if not ok:
            raise UserError(
                f"{where}: its pyact metadata is out of range (classes: distinct names of letters, digits "
                f"and _.+-, with no-action; seq_len, image_size, modality, depth_range or eval_subjects)"
            )
        return info

    @classmethod
    def from_json(cls, text: str, where: str) -> "ModelInfo":
        """From a model file's metadata text, bounded before it is parsed."""
        if len(text) > METADATA_LIMIT:
            raise UserError(f"{where}: its pyact metadata is larger than {METADATA_LIMIT} bytes")
        try:
            return cls.from_dict(json.loads(text), where)
        except (json.JSONDecodeError, RecursionError):
            raise UserError(f"{where}: its pyact metadata is not JSON") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (one implementation for every runner)."""
    values = np.asarray(logits, np.float64)
    values = np.exp(values - values.max(axis=1, keepdims=True))
    return values / values.sum(axis=1, keepdims=True)


class Runner:
    """Probabilities for uint8 clips; ``info`` says what the clips must be."""

    info: ModelInfo
    name: str
    trained_on: str = ""  # a checkpoint's recorded --data (the shards it was trained on)

    def logits(self, clips: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def set_threads(self, threads: int) -> None:
        """Run the network with ``threads`` intra-op threads (on the CPU)."""
        raise NotImplementedError

    def __call__(self, clips: np.ndarray) -> np.ndarray:
        """Probabilities; a model whose outputs are not one finite row per clip and class is
        refused in one line (an exported graph's declared shapes are data, not a promise)."""
        try:
            logits = np.asarray(self.logits(clips))
        except UserError:
            raise
        except Exception as exc:  # ONNX Runtime's and torch's own errors while running the graph
            raise UserError(
                f"{self.name}: failed on clips of shape {list(clips.shape)} "
                f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
            ) from None
        if logits.shape != (len(clips), len(self.info.classes)) or not np.isfinite(logits).all():
            raise UserError(
                f"{self.name}: gave outputs of shape {list(logits.shape)} (or non-finite values) for "
                f"{len(clips)} clips; its metadata says {len(self.info.classes)} classes"
            )
        return softmax(logits)


class TorchRunner(Runner):
    """A ``Deployed`` network in eager PyTorch on the CPU or a GPU (``device``)."""

    def __init__(self, module: Any, info: ModelInfo, name: str, device: str = "cpu"):
        import torch

        self._torch, self.info, self.name = torch, info, name
        self.device = torch.device("cpu")
        if device == "cuda":
            from ..training.devices import cuda_device

            self.device = cuda_device(0)
            # float32 stays float32 (no TF32 convolutions): the logits agree with the CPU's
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        self.module = module.to(self.device)

    def set_threads(self, threads: int) -> None:
        self._torch.set_num_threads(threads)  # the process's: detection runs one network

    def logits(self, clips: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            batch = self._torch.from_numpy(np.ascontiguousarray(clips)).to(self.device)
            return self.module(batch).float().cpu().numpy()


class OnnxRunner(Runner):
    """An exported ONNX file through ONNX Runtime (CPU)."""

    def __init__(self, path: str):
        try:
            import onnxruntime
        except ImportError:
            raise UserError(f"{path}: running an ONNX model needs onnxruntime: pip install -e '.[export]'") from None
        self.path = path
        self.session = self._session(onnxruntime, 0)
        metadata = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if metadata is None:
            raise UserError(f"{path}: not a model written by pyact export (no {METADATA_KEY!r} metadata)")
        self.info = ModelInfo.from_json(metadata, path)
        self.name = path
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{path}: expected one input and one output, found {len(inputs)} and {len(outputs)}")
        expected = list(self.info.clip_shape)
        shape = inputs[0].shape
        if (
            inputs[0].type != "tensor(uint8)"
            or len(shape) != 5
            or list(shape[1:]) != expected
            or isinstance(shape[0], int)
            or list(outputs[0].shape[1:]) != [len(self.info.classes)]
        ):
            raise UserError(
                f"{path}: takes {inputs[0].type} clips of shape {shape} and gives {outputs[0].shape}; its "
                f"metadata says uint8 [batch, {', '.join(map(str, expected))}] -> "
                f"[batch, {len(self.info.classes)}]: not this model's shape"
            )
        self._input = inputs[0].name

    def _session(self, onnxruntime: Any, threads: int) -> Any:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # its warnings are not the user's business
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per core)
        try:
            return onnxruntime.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception classes are not importable by name
            raise UserError(f"{self.path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})") from None

    def set_threads(self, threads: int) -> None:
        import onnxruntime

        self.session = self._session(onnxruntime, threads)  # a session's thread pool is fixed when it is made

    def logits(self, clips: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: np.ascontiguousarray(clips, np.uint8)})[0]


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_threads(runner: Runner, budget_s: float = 3.0, per_count_s: float = 0.25) -> tuple[int, dict[int, float]]:
    """The intra-op thread count (all cores, 1, then 2, 4, ...) that classifies one window
    fastest here and now, measured (the median of at least 5 windows and ``per_count_s`` after
    a warm-up; the rest are skipped once ``budget_s`` is spent); the runner is left set to it.
    For one window at a time, threads cost more to hand work out than they save, and on a
    busy machine they wait for cores: the best count depends on the model and the machine's
    load. Returns it and the seconds per window of each count tried."""
    # the library's default (one per core) and 1 first: never slower than before, whatever the budget
    counts = [cores()] + ([1] if cores() > 1 else []) + [2**k for k in range(1, 8) if 2**k < cores()]
    clip = np.random.default_rng(0).integers(0, 256, (1, *runner.info.clip_shape), dtype=np.uint8)
    seconds: dict[int, float] = {}
    started = time.perf_counter()
    for count in counts:
        if seconds and time.perf_counter() - started > budget_s:
            break
        runner.set_threads(count)
        runner(clip)
        runner(clip)
        times: list[float] = []
        while len(times) < 5 or (sum(times) < per_count_s and len(times) < 50):
            begin = time.perf_counter()
            runner(clip)
            times.append(time.perf_counter() - begin)
        seconds[count] = float(np.median(times))
    best = min(seconds, key=lambda c: seconds[c])
    runner.set_threads(best)
    return best, seconds


def load_exported(path: str) -> Runner:
    """The runner of an exported file: ``.onnx`` (ONNX Runtime) or ``.pt2`` (torch.export)."""
    if not os.path.isfile(path):
        raise UserError(f"--model {path}: no such file")
    suffix = os.path.splitext(path)[1]
    if suffix == ".onnx":
        return OnnxRunner(path)
    if suffix == ".pt2":
        return _load_program(path)
    raise UserError(f"--model {path}: expected a .onnx or .pt2 file written by pyact export")


def _load_program(path: str) -> Runner:
    import torch

    extra = {METADATA_KEY + ".json": ""}
    logger = logging.getLogger("torch.export")
    level = logger.level
    try:
        logger.setLevel(logging.CRITICAL)  # it logs a failed load as well as raising it
        with warnings.catch_warnings():  # torch warns about its own read-only weight buffers
            warnings.simplefilter("ignore", UserWarning)
            program = torch.export.load(path, extra_files=extra)
    except Exception as exc:  # a damaged archive fails in many ways inside torch
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a torch.export program ({reason})") from None
    finally:
        logger.setLevel(level)
    if not extra[METADATA_KEY + ".json"]:
        raise UserError(f"{path}: not a model written by pyact export (no {METADATA_KEY} metadata)")
    runner = TorchRunner(program.module(), ModelInfo.from_json(extra[METADATA_KEY + ".json"], path), path)
    try:  # the metadata must describe what the graph takes and gives (ONNX's is checked statically)
        shape = runner.logits(np.zeros((1,) + runner.info.clip_shape, np.uint8)).shape
    except Exception:  # a guard of the program: another input shape
        shape = None
    if shape != (1, len(runner.info.classes)):
        raise UserError(
            f"{path}: its graph does not take uint8 [batch, {', '.join(map(str, runner.info.clip_shape))}] "
            f"clips to {len(runner.info.classes)} outputs as its metadata says: not this model's shape"
        )
    return runner


def load_checkpoint_runner(
    url: str, depth_range: tuple[int, ...] | None = None, log: Callable[[str], None] = print, device: str = "cpu"
) -> TorchRunner:
    """The checkpoint's network on ``device`` (cpu or cuda) with what it was trained on (classes, clip shape,
    the depth range and eval subjects its data recorded)."""
    from ..training.checkpoint import load_checkpoint
    from ..model import Deployed, build_model

    state, url = load_checkpoint(url, log=log)
    shape = state.get("data_shape")
    if not isinstance(shape, dict):
        raise UserError(f"{url}: records no clip shape; it cannot say what frames it takes")
    source = state.get("source")
    if not isinstance(source, dict):
        source = {}
    info = ModelInfo.from_dict(
        {
            "classes": state["classes"],
            "seq_len": shape.get("seq_len"),
            "image_size": shape.get("image_size"),
            "modality": shape.get("modality"),
            "depth_range": depth_range or source.get("depth_range"),
            "eval_subjects": source.get("eval_subjects"),
        },
        url,
    )
    try:
        network = build_model(
            state["config"].get("model"), len(CHANNELS[info.modality]), info.seq_len, info.image_size, len(info.classes)
        )
        network.load_state_dict(state["model"])
    except (ValueError, RuntimeError):
        raise UserError(
            f"{url}: its weights do not fit a {state['config'].get('model')} model of its recorded shape"
        ) from None
    runner = TorchRunner(Deployed(network), info, url, device)
    data = state["config"].get("data")
    runner.trained_on = data if isinstance(data, str) and 0 < len(data) <= 4096 else ""
    return runner
