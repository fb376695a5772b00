"""Clip augmentation on the fly, for training windows only (``pyact train --augment``).

One transform is drawn per window and applied the same to every frame of it: an action is a
motion, and frames that jitter against each other would be another one. The draws come from a
generator seeded by the run's seed, the epoch, the replica and the loader worker, and are taken
in the order the worker yields its windows, which is fixed by the same seeds: a resumed epoch,
which reads its windows again from the start, draws exactly what the uninterrupted run drew.

Presets:

- ``none``: pyACT 0.0.7 (no augmentation).
- ``pyact``: pyACT 1.0.4's set (``coreLib/utils.py``, commit 492f635), which wrote every
  training window 32 times: PIL's ``rotate(angle)`` for angle 0, 5, ..., 35 (counter-clockwise
  about the centre, nearest pixel, black fill), then flip 0 none, 1 left-right, 2 top-bottom,
  3 both. Here one of the 32 is drawn per window and nothing is stored.
- ``standard``: small geometric changes (rotation, scale, shift) and photometric ones (gamma,
  contrast, brightness, a gain per colour channel: room light and skin tone). No flips: a
  left-right flip turns a leftward swipe into a rightward one.

Geometric transforms move every channel alike and sample the nearest pixel, as PIL's default
that pyACT used: for depth a blend would invent depths between a hand and the wall, or between
a reading and 0 ("no reading"), and for colour a bilinear warp cost 1.8x (32x32) to 3.4x (64x64) as much
in the loader (docs/benchmarks.md). Depth gets no photometric change. Works on uint8 ``(T, H, W, C)`` clips
with OpenCV, in the loader workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import cv2
import numpy as np

PRESETS = ("none", "pyact", "standard")
PYACT_ANGLES = tuple(range(0, 40, 5))  # pyACT 1.0.4: range(rot_start=0, rot_stop=40, rot_step=5)

# the standard preset's ranges (its held-out accuracy: bench/generalise.py, docs/benchmarks.md)
ROTATE_DEGREES = 10.0
SCALE = (0.9, 1.1)
SHIFT = 0.08  # of the frame's size, each axis
GAMMA = 1.25  # drawn log-uniformly in [1/GAMMA, GAMMA]
CONTRAST = (0.75, 1.25)
BRIGHTNESS = 25.0  # added, in 0..255 units
GAIN = (0.85, 1.15)  # per colour channel


@dataclass(frozen=True)
class Transform:
    """One window's transform. Geometry: rotation ``angle`` degrees counter-clockwise about the
    centre, ``scale`` about it, ``shift`` (fractions of the size, right and down), then ``flip``
    (pyACT's code). Colour: gamma, contrast about mid-grey, brightness, then a gain per channel."""

    angle: float = 0.0
    flip: int = 0  # 0 none, 1 left-right, 2 top-bottom, 3 both
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    gamma: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0
    gain: tuple[float, ...] = ()

    @property
    def moves(self) -> bool:
        """Whether pixels move other than by flips."""
        return bool(self.angle or self.scale != 1.0 or any(self.shift))

    @property
    def photometric(self) -> bool:
        return bool(self.gamma != 1.0 or self.contrast != 1.0 or self.brightness or any(g != 1.0 for g in self.gain))


IDENTITY = Transform()
NUDGE = 1e-4  # pixels: less than OpenCV's 1/1024 fixed point, more than float rounding
_LEVELS = np.arange(256, dtype=np.float64)[:, None] / 255.0


def draw(preset: str, rng: np.random.Generator, colours: int) -> Transform:
    """One window's transform of ``preset`` (``colours``: how many colour channels it has)."""
    if preset == "none":
        return IDENTITY
    if preset == "pyact":
        pick = int(rng.integers(len(PYACT_ANGLES) * 4))
        return Transform(angle=float(PYACT_ANGLES[pick // 4]), flip=pick % 4)
    if preset == "standard":
        u = rng.random(7 + colours).tolist()  # one call: the draws are a loader worker's hot path
        spread = lambda low, high, x: low + (high - low) * x  # noqa: E731
        return Transform(
            angle=spread(-ROTATE_DEGREES, ROTATE_DEGREES, u[0]),
            scale=spread(*SCALE, u[1]),
            shift=(spread(-SHIFT, SHIFT, u[2]), spread(-SHIFT, SHIFT, u[3])),
            gamma=math.exp(spread(-math.log(GAMMA), math.log(GAMMA), u[4])),
            contrast=spread(*CONTRAST, u[5]),
            brightness=spread(-BRIGHTNESS, BRIGHTNESS, u[6]),
            gain=tuple(spread(*GAIN, x) for x in u[7:]),
        )
    raise ValueError(f"unknown augmentation preset {preset!r} (choose from {', '.join(PRESETS)})")


def inverse_matrix(transform: Transform, height: int, width: int) -> np.ndarray:
    """The 2x3 matrix taking an output pixel to where it is read from in the input (OpenCV's
    pixel centres at integers). The rotation is PIL's ``rotate``: about (w/2, h/2) of a frame
    whose pixel centres sit at +0.5, counter-clockwise on screen for a positive angle; then the
    scale about the same centre, the shift, and last the flips."""
    theta = math.radians(transform.angle)
    cos, sin = math.cos(theta) / transform.scale, math.sin(theta) / transform.scale
    cx, cy = width / 2, height / 2
    # output pixel x (after undoing the flips) -> u = x + 0.5 - cx - shift (PIL's centred coordinates)
    fx, ox = (-1.0, width - 1.0) if transform.flip & 1 else (1.0, 0.0)
    fy, oy = (-1.0, height - 1.0) if transform.flip & 2 else (1.0, 0.0)
    du = ox + 0.5 - cx - transform.shift[0] * width
    dv = oy + 0.5 - cy - transform.shift[1] * height
    # PIL's inverse of rotate(angle) in screen coordinates (y down): (cos, -sin; sin, cos), then back by 0.5
    return np.array(
        [
            [cos * fx, -sin * fy, cos * du - sin * dv + cx - 0.5 + NUDGE],
            [sin * fx, cos * fy, sin * du + cos * dv + cy - 0.5 + NUDGE],
        ]
    )


def _warp(frames: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Every frame of ``frames`` (T, H, W, C; C <= 4) through the same matrix at the nearest
    pixel, 0 outside. OpenCV's nearest rounds the source point, which for these pixel centres
    is PIL's floor; ``NUDGE`` sends a point exactly between two pixels up, as the floor does."""
    height, width = frames.shape[1:3]
    out = np.empty_like(frames)
    for t in range(frames.shape[0]):
        warped = cv2.warpAffine(
            frames[t],
            matrix,
            (width, height),
            flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        out[t] = warped.reshape(out[t].shape)  # OpenCV drops a single channel's axis
    return out


def colour_table(transform: Transform, channels: int) -> np.ndarray:
    """The photometric change as a uint8 table per colour channel, ``(256, channels)``."""
    x = (_LEVELS**transform.gamma - 0.5) * transform.contrast + 0.5 + transform.brightness / 255.0
    gains = np.array(transform.gain[:channels] if transform.gain else (1.0,) * channels)
    return np.clip(np.rint(x * (gains * 255.0)), 0, 255).astype(np.uint8)


def apply(clip: np.ndarray, transform: Transform, colours: int) -> np.ndarray:
    """``clip`` (uint8 T, H, W, C; its first ``colours`` channels colour, the rest depth)
    through ``transform``, the same on every frame."""
    if transform == IDENTITY:
        return clip
    out = clip
    if transform.moves:
        out = _warp(clip, inverse_matrix(transform, clip.shape[1], clip.shape[2]))
    elif transform.flip:  # a flip alone moves whole rows and columns
        out = np.ascontiguousarray(clip[:, :: -1 if transform.flip & 2 else 1, :: -1 if transform.flip & 1 else 1])
    if transform.photometric and colours:
        table = colour_table(transform, colours)
        colour = np.ascontiguousarray(out[..., :colours])
        frames = colour.reshape(-1, colour.shape[2], colours)  # (T*H, W, c): one image for cv2.LUT
        changed = cv2.LUT(frames, table.reshape(1, 256, colours)).reshape(colour.shape)
        if colours == clip.shape[3]:
            return changed
        out = out.copy() if out is clip else out
        out[..., :colours] = changed
    return out


def colour_channels(channels: Iterable[str]) -> int:
    """How many of a manifest's channels (``R``, ``G``, ``B``, ``D``) are colour; they come first."""
    return sum(1 for name in channels if name != "D")


def augmented(
    items: Iterable[tuple[np.ndarray, int]], preset: str, rng: np.random.Generator, colours: int
) -> Iterator[tuple[np.ndarray, int]]:
    """``(clip, label)`` pairs, each clip through its own draw of ``preset``."""
    if preset == "none":
        yield from items
        return
    for clip, label in items:
        yield apply(clip, draw(preset, rng, colours), colours), label
