"""ConvNet3D mirrors pyACT's layer list and parameter count."""

import pytest
import torch
from torch import nn

from pyact_torch.model import build_model, count_parameters


def block_outputs(model, clips):
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.append((type(mod).__name__, tuple(out.shape))))
             for m in model.modules() if isinstance(m, (nn.BatchNorm3d, nn.Flatten, nn.Linear))]
    logits = model(clips)
    for hook in hooks:
        hook.remove()
    return shapes, logits


def test_c3d_matches_pyact_parameter_count_and_shapes():
    with torch.device("meta"):
        model = build_model("c3d", in_channels=3, seq_len=6, image_size=64, num_classes=17)
        shapes, logits = block_outputs(model, torch.empty(2, 3, 6, 64, 64))
    assert count_parameters(model) == 206_510_225
    bn_stats = sum(b.numel() for name, b in model.named_buffers() if "running" in name)
    assert bn_stats == 1_920  # Keras: 206,512,145 params = 206,510,225 trainable + 1,920 moving statistics
    # pyACT's Keras summary gives (T, H, W, C) shapes; here they are (C, T, H, W)
    assert shapes == [
        ("BatchNorm3d", (2, 64, 6, 32, 32)), ("BatchNorm3d", (2, 128, 6, 16, 16)),
        ("BatchNorm3d", (2, 256, 6, 8, 8)), ("BatchNorm3d", (2, 512, 6, 4, 4)),
        ("Flatten", (2, 49_152)), ("Linear", (2, 4096)), ("Linear", (2, 128)), ("Linear", (2, 17))]
    assert logits.shape == (2, 17)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    assert all(m.momentum == pytest.approx(0.01) and m.eps == pytest.approx(1e-3) for m in norms)


def test_block_order_is_conv_pool_relu_norm():
    model = build_model("tiny", 3, 6, 64, 17)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["Conv3d", "MaxPool3d", "ReLU", "BatchNorm3d"] * 4
    conv = model.features[0]
    assert conv.kernel_size == (3, 3, 3) and conv.padding == (1, 1, 1)
    assert model.features[1].kernel_size == (1, 2, 2)


def test_tiny_follows_the_data_shape():
    model = build_model("tiny", in_channels=4, seq_len=8, image_size=32, num_classes=5)
    out = model(torch.rand(3, 4, 8, 32, 32))
    assert out.shape == (3, 5)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_model("tiny", 3, 6, 40, 17)
