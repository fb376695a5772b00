"""ConvNet3D mirrors pyACT's layer list and parameter count."""

import pytest
import torch
from torch import nn

from pyact_torch.model import build_model, count_parameters


def block_outputs(model, clips):
    shapes = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: shapes.append((type(mod).__name__, tuple(out.shape))))
        for m in model.modules()
        if isinstance(m, (nn.BatchNorm3d, nn.Flatten, nn.Linear))
    ]
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
        ("BatchNorm3d", (2, 64, 6, 32, 32)),
        ("BatchNorm3d", (2, 128, 6, 16, 16)),
        ("BatchNorm3d", (2, 256, 6, 8, 8)),
        ("BatchNorm3d", (2, 512, 6, 4, 4)),
        ("Flatten", (2, 49_152)),
        ("Linear", (2, 4096)),
        ("Linear", (2, 128)),
        ("Linear", (2, 17)),
    ]
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


def keras_convnet3d_v1_count(seq_len=6, img_dim=64, nb_channels=3, nb_classes=17) -> int:
    """Keras' 'Total params' of pyACT 1.x's convNet3D (commit 1306798, coreLib/model.py), layer
    by layer from that definition with Keras' own formulas: Conv3D (k^3 * in + 1) * filters,
    BatchNormalization 4 * channels (gamma, beta, moving mean and variance), Dense (in + 1) * units,
    MaxPooling3D (1, 2, 2) halving height and width."""
    total, channels, side = 0, nb_channels, img_dim
    conv = lambda cin, filters: (27 * cin + 1) * filters  # noqa: E731
    total += conv(channels, 64)
    channels = 64  # INITIAL_CONV3D  # noqa: E702
    side //= 2  # INITIAL_POOL3D
    total += 4 * channels  # BatchNormalization
    for nb_filter in [128, 256, 512, 512]:  # feature_spec
        total += conv(channels, nb_filter) + conv(nb_filter, nb_filter)  # CONV3D_n_C1, CONV3D_n_c2
        channels = nb_filter
        side //= 2  # POOL3D_n
        total += 4 * channels
    flat = seq_len * side * side * channels  # FLATTEN
    total += (flat + 1) * 4096 + (4096 + 1) * 4096 + (4096 + 1) * nb_classes  # DENSE_1, DENSE_2, DENSE_CLASS
    return total


def test_c3d_v1_matches_pyact_1x_parameter_count_and_shapes():
    expected = keras_convnet3d_v1_count()
    assert expected == 95_291_025  # the 'Total params' of pyACT's colab/convNet3D.ipynb summary
    with torch.device("meta"):
        model = build_model("c3d-v1", in_channels=3, seq_len=6, image_size=64, num_classes=17)
        shapes, logits = block_outputs(model, torch.empty(2, 3, 6, 64, 64))
    bn_stats = sum(b.numel() for name, b in model.named_buffers() if "running" in name)
    assert count_parameters(model) + bn_stats == expected
    assert bn_stats == 2_944  # the notebook's 'Non-trainable params'
    assert shapes == [
        ("BatchNorm3d", (2, 64, 6, 32, 32)),
        ("BatchNorm3d", (2, 128, 6, 16, 16)),
        ("BatchNorm3d", (2, 256, 6, 8, 8)),
        ("BatchNorm3d", (2, 512, 6, 4, 4)),
        ("BatchNorm3d", (2, 512, 6, 2, 2)),
        ("Flatten", (2, 12_288)),
        ("Linear", (2, 4096)),
        ("Linear", (2, 4096)),
        ("Linear", (2, 17)),
    ]
    assert logits.shape == (2, 17)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds[:5] == ["Conv3d", "ReLU", "MaxPool3d", "ReLU", "BatchNorm3d"]
    assert kinds[5:12] == ["Conv3d", "ReLU", "Conv3d", "ReLU", "MaxPool3d", "ReLU", "BatchNorm3d"]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    assert all(m.momentum == pytest.approx(0.01) and m.eps == pytest.approx(1e-3) for m in norms)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("c3d-v1", 3, 6, 48, 17)


def test_dropout_acts_after_each_hidden_dense_while_training_only():
    torch.manual_seed(0)
    model = build_model("tiny", 3, 4, 16, 5, dropout=0.5)
    plain = build_model("tiny", 3, 4, 16, 5)
    assert list(model.state_dict()) == list(plain.state_dict())  # dropout adds no weights: checkpoints keep their names
    seen = []
    hooks = [model.classifier[i].register_forward_hook(lambda m, i, o: seen.append(o.clone())) for i in (2, 4)]
    model.classifier[5].register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].clone()))
    clips = torch.rand(8, 3, 4, 16, 16)
    model.train()
    model(clips)
    relu2, after = seen[1], seen[2]
    dropped = (after == 0) & (relu2 != 0)
    assert 0.3 < dropped.float().mean() / (relu2 != 0).float().mean() < 0.7  # about half the units
    kept = after != 0
    assert torch.allclose(after[kept], 2 * relu2[kept])  # inverted dropout, as Keras: kept units scaled 1/(1-p)
    model.eval()
    seen.clear()
    model(clips)
    assert torch.equal(seen[1], seen[2])  # no dropout when evaluating
    for hook in hooks:
        hook.remove()


def test_weight_decay_is_pyacts_l2_on_the_conv_kernels():
    """--weight-decay W trains as Keras' kernel_regularizer=l2(W) on every Conv3D: Adam on the
    loss plus W * sum of the kernels' squares (biases, BatchNorm and Dense untouched)."""
    from pyact_torch.model import conv_kernels
    from pyact_torch.training.train import make_optimizer

    torch.manual_seed(0)
    base = build_model("tiny", 3, 4, 16, 5).double()
    clips, labels = torch.rand(6, 3, 4, 16, 16, dtype=torch.float64), torch.randint(0, 5, (6,))
    weight_decay = 0.1

    def trained(penalty: bool, optimizer_of):
        model = build_model("tiny", 3, 4, 16, 5).double()
        model.load_state_dict(base.state_dict())
        optimizer = optimizer_of(model)
        for _ in range(3):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(clips), labels)
            if penalty:
                loss = loss + weight_decay * sum((k**2).sum() for k in conv_kernels(model))
            loss.backward()
            optimizer.step()
        return model.state_dict()

    ours = trained(False, lambda m: make_optimizer(m, 1e-2, weight_decay))
    keras = trained(True, lambda m: torch.optim.Adam(m.parameters(), lr=1e-2))

    def gap(a, b):
        return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)

    assert gap(ours, keras) < 1e-9  # float rounding (Adam divides by a dead channel's tiny gradients)
    # the controls: decoupled AdamW, or decay on every weight, train otherwise
    for other in (
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=weight_decay),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=2 * weight_decay),
    ):
        assert gap(ours, trained(False, other)) > 1e-5
    assert len(make_optimizer(base, 1e-3, 0.0).param_groups) == 1  # without it: one group, as old checkpoints
