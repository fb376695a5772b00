#!/usr/bin/env python3
"""The road not taken for ``--augment``: the same per-window geometry and colour gain on the
device, inside the step (``affine_grid`` + ``grid_sample``, nearest pixel, one transform per
window on all its frames), timed per batch of 32 ``tiny`` clips (6x32x32x3) and, on XLA,
counted for new compilations and CPU fallbacks after warm-up. Figures in docs/benchmarks.md.

    .venv/bin/python bench/augment_device.py cpu
    PJRT_DEVICE=CPU .venv/bin/python bench/augment_device.py xla
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

BATCH, STEPS = 32, 20


def device_augment(clips: torch.Tensor, theta: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """``clips`` (N, C, T, H, W) in [0, 1]; ``theta`` (N, 2, 3) one affine per window; ``gains`` (N, C)."""
    n, c, t, h, w = clips.shape
    frames = clips.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
    grid = F.affine_grid(theta.repeat_interleave(t, 0), [n * t, c, h, w], align_corners=False)
    out = F.grid_sample(frames, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return (out.reshape(n, t, c, h, w).permute(0, 2, 1, 3, 4) * gains[:, :, None, None, None]).clamp(0, 1)


def draws(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    angle = torch.rand(BATCH) * 0.35  # up to 20 degrees
    zero = torch.zeros(BATCH)
    theta = torch.stack(
        [torch.stack([angle.cos(), -angle.sin(), zero], 1), torch.stack([angle.sin(), angle.cos(), zero], 1)], 1
    )
    return theta.to(device), (torch.rand(BATCH, 3) * 0.3 + 0.85).to(device)


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    if kind == "xla":
        import torch_xla
        import torch_xla.debug.metrics as met

        device, sync = torch_xla.device(), torch_xla.sync

        def counts() -> tuple[int, int]:
            return (
                int(met.counter_value("UncachedCompile") or 0),
                sum(int(met.counter_value(k) or 0) for k in met.counter_names() if k.startswith("aten::")),
            )
    else:
        device, sync, counts = torch.device("cpu"), (lambda: None), (lambda: (0, 0))
    clips = torch.rand(BATCH, 3, 6, 32, 32, device=device)
    for _ in range(3):
        out = device_augment(clips, *draws(device))
        sync()
    out.cpu()
    before = counts()
    started = time.perf_counter()
    for _ in range(STEPS):
        out = device_augment(clips, *draws(device))
        sync()
    out.cpu()
    seconds = (time.perf_counter() - started) / STEPS
    after = counts()
    print(
        f"{kind}: {seconds * 1000:.2f} ms per batch of {BATCH} = {seconds / BATCH * 1e6:.0f} us/window"
        + (
            f"; after warm-up {after[0] - before[0]} compilations, {(after[1] - before[1]) / STEPS:.0f} CPU "
            f"fallbacks per step"
            if kind == "xla"
            else ""
        )
    )


if __name__ == "__main__":
    main()
