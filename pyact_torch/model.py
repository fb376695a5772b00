"""ConvNet3D: pyACT's C3D-style network, layer for layer, in torch (imports only torch).

Four blocks of Conv3d 3x3x3 'same' -> MaxPool3d (1,2,2) -> ReLU -> BatchNorm3d, then flatten
-> Dense -> ReLU -> Dense -> ReLU -> Dense (logits; softmax lives in the loss). Input
``(N, C, T, H, W)``. The ``c3d`` preset is pyACT's (64/128/256/512 filters, 4096 and 128 units,
Keras BatchNorm momentum 0.99 / epsilon 1e-3): 206,510,225 parameters at 6x64x64x3 and 17
classes. ``tiny`` has the same structure, narrower, for CPU tests and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Preset:
    filters: tuple[int, int, int, int]
    dense: tuple[int, int]
    bn_momentum: float  # torch convention: 1 - Keras momentum
    bn_eps: float = 1e-3


PRESETS = {
    "c3d": Preset(filters=(64, 128, 256, 512), dense=(4096, 128), bn_momentum=0.01),
    # Keras' slow BatchNorm statistics do not settle in a few hundred steps: short runs use 0.1.
    "tiny": Preset(filters=(8, 16, 32, 64), dense=(128, 32), bn_momentum=0.1),
}


def check_input(preset: Preset | str, image_size: int) -> None:
    """Raise ValueError unless the network can take ``image_size`` x ``image_size`` frames."""
    if image_size < 16 or image_size % 16:
        raise ValueError(f"ConvNet3D takes frames whose size is a multiple of 16 (four 2x2 poolings), "
                         f"not {image_size}")


class ConvNet3D(nn.Module):
    """pyACT's ConvNet3D; see the module docstring."""

    def __init__(self, preset: Preset, in_channels: int, seq_len: int, image_size: int,
                 num_classes: int):
        super().__init__()
        check_input(preset, image_size)
        blocks = []
        channels = in_channels
        for width in preset.filters:
            blocks += [
                nn.Conv3d(channels, width, kernel_size=3, padding=1),
                nn.MaxPool3d(kernel_size=(1, 2, 2), stride=(1, 2, 2)),
                nn.ReLU(inplace=True),
                nn.BatchNorm3d(width, eps=preset.bn_eps, momentum=preset.bn_momentum),
            ]
            channels = width
        self.features = nn.Sequential(*blocks)
        # computed, not inferred: nn.LazyLinear fails shape inference on XLA
        flat = channels * seq_len * (image_size // 16) ** 2
        hidden1, hidden2 = preset.dense
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden1), nn.ReLU(inplace=True),
            nn.Linear(hidden1, hidden2), nn.ReLU(inplace=True),
            nn.Linear(hidden2, num_classes),
        )

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """``(N, C, T, H, W)`` float clips -> ``(N, classes)`` logits."""
        return self.classifier(self.features(clips))


def model_input(clips: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, T, H, W, C)`` clips as the loader and detection send them -> float
    ``(N, C, T, H, W)`` in [0, 1], as the network takes them. Done on the device, inside the
    step: uint8 crosses from the loader workers to the device at a quarter of float32's bytes."""
    return clips.permute(0, 4, 1, 2, 3).float() / 255.0


class Deployed(nn.Module):
    """The network as detection and export run it: uint8 ``(N, T, H, W, C)`` clips -> logits,
    in evaluation mode (BatchNorm uses its running statistics)."""

    def __init__(self, network: ConvNet3D):
        super().__init__()
        self.network = network.eval()

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.network(model_input(clips))


def build_model(preset: str, in_channels: int, seq_len: int, image_size: int,
                num_classes: int) -> ConvNet3D:
    """A ConvNet3D of the named preset (``c3d`` or ``tiny``) for the given input shape."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r} (choose from {', '.join(PRESETS)})")
    return ConvNet3D(PRESETS[preset], in_channels, seq_len, image_size, num_classes)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (Keras' 'trainable params')."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def reorder_outputs(state_dict: dict, classes: list[str], wanted: list[str]) -> dict:
    """The same weights with the output layer's rows in the ``wanted`` class order (a pyACT
    model lists its classes in another order than a manifest)."""
    order = torch.tensor([classes.index(name) for name in wanted])
    last = [k for k in state_dict if k.startswith("classifier.") and k.endswith(".weight")][-1].rsplit(".", 1)[0]
    return {**state_dict, f"{last}.weight": state_dict[f"{last}.weight"][order],
            f"{last}.bias": state_dict[f"{last}.bias"][order]}
