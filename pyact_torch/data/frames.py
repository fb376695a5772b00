"""Reading and resizing frames, and decoding a whole dataset once into a frame cache.

pyACT decoded every frame once per window it belongs to (up to 6 times) and held float32
shards in memory. Here each frame is decoded exactly once, in parallel, into a flat uint8 file
(frame ``k`` at byte ``k * frame_bytes``); windows are then cut from that file with one
contiguous read each, so memory stays bounded whatever the dataset size.
"""

from __future__ import annotations

import errno
import os
import zlib
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np

from ..io import storage
from ..errors import UserError
from .labels import needed_kinds
from ..io.processes import map_unordered

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Bounds on one frame file, checked before decoding: a few MB of zeros can declare an image
#: that decodes to gigabytes. The dataset's frames are 640x480; 4096x4096 leaves room for any camera.
MAX_PNG_PIXELS = 4096 * 4096
MAX_PNG_BYTES = 256 << 20
CHANNELS = {"color": ("R", "G", "B"), "depth": ("D",), "rgbd": ("R", "G", "B", "D")}


class FrameError(ValueError):
    """A frame file that cannot be decoded as expected."""

    def __init__(self, file: str, reason: str):
        super().__init__(file, reason)  # both in args, so the error pickles across processes
        self.file = file
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass(frozen=True)
class FrameSpec:
    """How raw frames become cached frames."""

    modality: str
    image_size: int
    depth_range: tuple[int, ...]  # (low, high)

    @property
    def channels(self) -> tuple[str, ...]:
        return CHANNELS[self.modality]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.image_size, self.image_size, len(self.channels)

    @property
    def frame_bytes(self) -> int:
        height, width, channels = self.shape
        return height * width * channels


def depth_to_uint8(depth: np.ndarray, depth_range: tuple[int, ...]) -> np.ndarray:
    """Map raw depth linearly from ``[MIN, MAX]`` to ``255 .. 0`` (nearer is brighter); 0 (no
    reading) and values outside the range become 0."""
    low, high = depth_range
    values = depth.astype(np.float32)
    scaled = np.rint((high - values) * (255.0 / (high - low)))
    valid = (values >= low) & (values <= high)
    return np.where(valid, scaled, 0).astype(np.uint8)


def load_png(path: str) -> np.ndarray:
    """Decode a PNG file as stored (8 or 16 bit). A truncated file is caught by its missing
    IEND trailer before decoding, so libpng does not print its own error on stderr."""
    try:
        with storage.open_read(path) as handle:  # a regular file only: a FIFO would hang the run
            data = np.frombuffer(handle.read(MAX_PNG_BYTES + 1), np.uint8)
    except OSError as exc:
        raise FrameError(path, f"cannot read ({exc.strerror})") from None
    except UserError as exc:
        raise FrameError(path, str(exc).rpartition(": ")[2]) from None
    if data[:8].tobytes() != PNG_SIGNATURE:
        raise FrameError(path, "not a PNG file")
    if len(data) > MAX_PNG_BYTES:
        raise FrameError(path, f"larger than the {MAX_PNG_BYTES >> 20} MB a frame file can have")
    if data[12:16].tobytes() != b"IHDR":  # the first chunk, by the PNG standard
        raise FrameError(path, "corrupt PNG (no IHDR chunk first)")
    width, height = (int.from_bytes(data[i : i + 4].tobytes(), "big") for i in (16, 20))
    if width * height > MAX_PNG_PIXELS:
        raise FrameError(path, f"{width}x{height} pixels, more than the {MAX_PNG_PIXELS} a frame can have")
    if data[-8:-4].tobytes() != b"IEND":
        raise FrameError(path, "truncated PNG (no IEND chunk at the end)")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FrameError(path, "corrupt PNG")
    return image


def color_plane(image: np.ndarray, size: int, source: str) -> np.ndarray:
    """An 8-bit BGR(A) colour image (a PNG, a video frame) as uint8 RGB ``(size, size, 3)``."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise FrameError(source, f"expected an 8-bit colour image, got {image.dtype} {image.shape}")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB if image.shape[2] == 3 else cv2.COLOR_BGRA2RGB)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def depth_plane(depth: np.ndarray, spec: FrameSpec, source: str) -> np.ndarray:
    """A 16-bit depth image as uint8 ``(size, size, 1)``, nearer is brighter."""
    if depth.dtype != np.uint16 or depth.ndim != 2:
        raise FrameError(source, f"expected a 16-bit single-channel depth image, got {depth.dtype} {depth.shape}")
    # Nearest neighbour: averaging would blend 0 ("no reading") into real depths at edges.
    depth = cv2.resize(depth, (spec.image_size, spec.image_size), interpolation=cv2.INTER_NEAREST)
    return depth_to_uint8(depth, spec.depth_range)[..., None]


def prepare(raw: dict[str, np.ndarray], spec: FrameSpec, sources: dict[str, str]) -> np.ndarray:
    """Decoded frame files (``{"color": BGR, "depth": uint16}``) as the model's uint8
    ``(S, S, C)`` frame (channels RGB[D]): the one preprocessing of shards and of detection.
    ``sources`` names each kind's file (or stream) for errors."""
    planes = []
    if "color" in needed_kinds(spec.modality):
        planes.append(color_plane(raw["color"], spec.image_size, sources["color"]))
    if "depth" in needed_kinds(spec.modality):
        planes.append(depth_plane(raw["depth"], spec, sources["depth"]))
    return planes[0] if len(planes) == 1 else np.concatenate(planes, axis=2)


def frame_files(folder: str, index: int, modality: str) -> dict[str, str]:
    """The PNG files of frame ``index`` that ``modality`` reads."""
    return {kind: os.path.join(folder, f"{kind}_{index}.png") for kind in needed_kinds(modality)}


def read_frame(folder: str, index: int, spec: FrameSpec) -> np.ndarray:
    """Frame ``index`` of a sequence folder as uint8 ``(S, S, C)`` (channels RGB[D])."""
    files = frame_files(folder, index, spec.modality)
    return prepare({kind: load_png(path) for kind, path in files.items()}, spec, files)


@dataclass(frozen=True)
class DecodeChunk:
    """Frames ``first .. first+count-1`` of the sequence in ``folder``, to be stored at cache
    frame ``slot`` onwards."""

    chunk_id: int
    folder: str
    first: int
    count: int
    slot: int


@dataclass(frozen=True)
class ChunkResult:
    chunk_id: int
    decoded: int
    error: FrameError | None
    crc: int = 0  # CRC-32 of the bytes written to the cache (checked again on resume)


_worker: dict = {}


def _init_worker(cache_path: str, spec: FrameSpec) -> None:
    _worker["fd"] = os.open(cache_path, os.O_WRONLY)
    _worker["spec"] = spec


def _decode_chunk(chunk: DecodeChunk) -> ChunkResult:
    spec: FrameSpec = _worker["spec"]
    frames = []
    for index in range(chunk.first, chunk.first + chunk.count):
        try:
            frames.append(read_frame(chunk.folder, index, spec))
        except FrameError as exc:
            return ChunkResult(chunk.chunk_id, len(frames) + 1, exc)
    data = np.stack(frames).tobytes()
    write_all(_worker["fd"], data, chunk.slot * spec.frame_bytes)
    return ChunkResult(chunk.chunk_id, len(frames), None, zlib.crc32(data))


def write_all(fd: int, data: bytes, offset: int) -> None:
    """``pwrite`` all of ``data`` (a short write is retried; no progress is an error)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[written:], offset + written


def decode_into_cache(
    chunks: list[DecodeChunk], cache_path: str, spec: FrameSpec, processes: int
) -> Iterator[ChunkResult]:
    """Decode ``chunks`` into the cache file, yielding results as chunks finish (in any
    order). ``processes == 1`` decodes in this process."""
    try:
        yield from map_unordered(_decode_chunk, chunks, processes, _init_worker, (cache_path, spec))
    finally:
        if "fd" in _worker:  # opened in this process (processes == 1)
            os.close(_worker.pop("fd"))


class FrameCache:
    """Read access to the decoded frames (a flat file of uint8 frames)."""

    def __init__(self, path: str, spec: FrameSpec):
        self.spec = spec
        self._fd = os.open(path, os.O_RDONLY)

    def read_bytes(self, slot: int, count: int) -> bytes:
        """The bytes of frames ``slot .. slot+count-1``."""
        size = self.spec.frame_bytes
        data = os.pread(self._fd, count * size, slot * size)
        if len(data) != count * size:
            raise OSError(f"frame cache is shorter than expected (slot {slot})")
        return data

    def read(self, slot: int, count: int) -> np.ndarray:
        """Frames ``slot .. slot+count-1`` as uint8 ``(count, S, S, C)``."""
        return np.frombuffer(self.read_bytes(slot, count), np.uint8).reshape((count,) + self.spec.shape)

    def close(self) -> None:
        os.close(self._fd)
