"""ConvNet3D: pyACT's C3D-style networks, layer for layer, in torch (imports only torch).

Blocks of Conv3d 3x3x3 'same' (one or two) -> MaxPool3d (1,2,2) -> ReLU -> BatchNorm3d, then
flatten -> Dense -> ReLU -> Dense -> ReLU -> Dense (logits; softmax lives in the loss), with
optional dropout after each hidden Dense (pyACT 1.0.2+). Input ``(N, C, T, H, W)``.

- ``c3d``: pyACT 0.0.7's network (four blocks of one conv, 64/128/256/512 filters, 4096 and 128
  units): 206,510,225 parameters at 6x64x64x3 and 17 classes.
- ``c3d-v1``: pyACT 1.x's (commit 1306798, ``coreLib/model.py``): an initial conv of 64 filters
  then four blocks of two convs (128/256/512/512 filters), every conv followed by a ReLU
  (Keras' ``activation='relu'``), 4096 and 4096 units: 95,291,025 values in Keras' count
  (weights plus BatchNorm's moving statistics) at 6x64x64x3 and 17 classes.
- ``tiny``: c3d's structure, narrower, for CPU tests and the demo.

Keras' BatchNorm (momentum 0.99, epsilon 1e-3) in all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Preset:
    blocks: tuple[tuple[int, int], ...]  # (filters, convolutions) of each pooling block
    dense: tuple[int, int]
    bn_momentum: float  # torch convention: 1 - Keras momentum
    bn_eps: float = 1e-3
    conv_relu: bool = False  # a ReLU after every conv (pyACT 1.x), not only after each pooling

    @property
    def filters(self) -> tuple[int, ...]:
        return tuple(width for width, _ in self.blocks)

    @property
    def pooling(self) -> int:
        """How many times the frames are halved: their size must be a multiple of this."""
        return 2 ** len(self.blocks)


PRESETS = {
    "c3d": Preset(blocks=((64, 1), (128, 1), (256, 1), (512, 1)), dense=(4096, 128), bn_momentum=0.01),
    "c3d-v1": Preset(
        blocks=((64, 1), (128, 2), (256, 2), (512, 2), (512, 2)), dense=(4096, 4096), bn_momentum=0.01, conv_relu=True
    ),
    # Keras' slow BatchNorm statistics do not settle in a few hundred steps: short runs use 0.1.
    "tiny": Preset(blocks=((8, 1), (16, 1), (32, 1), (64, 1)), dense=(128, 32), bn_momentum=0.1),
}


def preset_of(preset: Preset | str) -> Preset:
    """The named preset (``c3d``, ``c3d-v1`` or ``tiny``), or ``preset`` itself."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r} (choose from {', '.join(PRESETS)})")
    return PRESETS[preset]


def check_input(preset: Preset | str, image_size: int) -> None:
    """Raise ValueError unless the network can take ``image_size`` x ``image_size`` frames."""
    spec = preset_of(preset)
    if image_size < spec.pooling or image_size % spec.pooling:
        raise ValueError(
            f"this network takes frames whose size is a multiple of {spec.pooling} "
            f"({len(spec.blocks)} 2x2 poolings), not {image_size}"
        )


class Classifier(nn.Sequential):
    """Flatten -> Dense -> ReLU -> Dense -> ReLU -> Dense, with dropout after each ReLU while
    training (pyACT 1.0.2's DROP_OUT_D-1 and D-2). The dropout is applied in ``forward``, not
    as modules, so the weights keep the names every checkpoint has used."""

    def __init__(self, *layers: nn.Module, dropout: float = 0.0):
        super().__init__(*layers)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x)
            if self.dropout and isinstance(layer, nn.ReLU):
                x = F.dropout(x, self.dropout, self.training)
        return x


class ConvNet3D(nn.Module):
    """pyACT's ConvNet3D; see the module docstring."""

    def __init__(
        self, preset: Preset, in_channels: int, seq_len: int, image_size: int, num_classes: int, dropout: float = 0.0
    ):
        super().__init__()
        check_input(preset, image_size)
        layers: list[nn.Module] = []
        channels = in_channels
        for width, convs in preset.blocks:
            for _ in range(convs):
                layers.append(nn.Conv3d(channels, width, kernel_size=3, padding=1))
                if preset.conv_relu:
                    layers.append(nn.ReLU(inplace=True))
                channels = width
            layers += [
                nn.MaxPool3d(kernel_size=(1, 2, 2), stride=(1, 2, 2)),
                nn.ReLU(inplace=True),
                nn.BatchNorm3d(width, eps=preset.bn_eps, momentum=preset.bn_momentum),
            ]
        self.features = nn.Sequential(*layers)
        # computed, not inferred: nn.LazyLinear fails shape inference on XLA
        flat = channels * seq_len * (image_size // preset.pooling) ** 2
        hidden1, hidden2 = preset.dense
        self.classifier = Classifier(
            nn.Flatten(),
            nn.Linear(flat, hidden1),
            nn.ReLU(inplace=True),
            nn.Linear(hidden1, hidden2),
            nn.ReLU(inplace=True),
            nn.Linear(hidden2, num_classes),
            dropout=dropout,
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


def build_model(
    preset: str, in_channels: int, seq_len: int, image_size: int, num_classes: int, dropout: float = 0.0
) -> ConvNet3D:
    """A ConvNet3D of the named preset (``c3d``, ``c3d-v1`` or ``tiny``) for the given input
    shape, with ``dropout`` after each hidden Dense while training."""
    return ConvNet3D(preset_of(preset), in_channels, seq_len, image_size, num_classes, dropout)


def conv_kernels(model: nn.Module) -> list[torch.Tensor]:
    """Every Conv3d kernel (not biases): what pyACT 1.0.3's L2 ``kernel_regularizer`` covers."""
    return [module.weight for module in model.modules() if isinstance(module, nn.Conv3d)]


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (Keras' 'trainable params')."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def reorder_outputs(state_dict: dict, classes: list[str], wanted: list[str]) -> dict:
    """The same weights with the output layer's rows in the ``wanted`` class order (a pyACT
    model lists its classes in another order than a manifest)."""
    order = torch.tensor([classes.index(name) for name in wanted])
    layers = [k.rsplit(".", 1)[0] for k in state_dict if k.startswith("classifier.") and k.endswith(".weight")]
    if not layers or f"{layers[-1]}.bias" not in state_dict or len(state_dict[f"{layers[-1]}.weight"]) != len(classes):
        raise ValueError(f"its weights have no output layer of {len(classes)} classes")
    last = layers[-1]
    return {
        **state_dict,
        f"{last}.weight": state_dict[f"{last}.weight"][order],
        f"{last}.bias": state_dict[f"{last}.bias"][order],
    }
