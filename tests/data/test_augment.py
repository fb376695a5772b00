"""Clip augmentation: pyACT 1.0.4's rotations and flips as PIL made them, one transform per window
on every frame, training windows only, draws fixed by the seeds and different per replica."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pyact_torch.data.augment import PYACT_ANGLES, Transform, apply, draw
from pyact_torch.data.loader import Part, WindowDataset, window_draws
from pyact_torch.data.shards import read_manifest


def asymmetric_image(height=32, width=40, seed=0) -> np.ndarray:
    """No symmetry to hide a wrong direction or centre: random pixels plus an off-centre bar."""
    image = np.random.default_rng(seed).integers(1, 256, (height, width, 3), dtype=np.uint8)
    image[3:7, 5:30] = (255, 0, 0)
    return image


def pil_pyact(image: np.ndarray, angle: int, flip: int) -> np.ndarray:
    """pyACT 1.0.4's read_image after the resize: ``img.rotate(angle)``, then getFlipDataById."""
    img = Image.fromarray(image)
    if angle:
        img = img.rotate(angle)
    if flip == 1:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    elif flip == 2:
        img = img.transpose(Image.FLIP_TOP_BOTTOM)
    elif flip == 3:
        img = img.transpose(Image.FLIP_TOP_BOTTOM).transpose(Image.FLIP_LEFT_RIGHT)
    return np.array(img)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).all(axis=-1).mean())


@pytest.mark.parametrize("size", [(32, 40), (64, 64), (47, 47)])
def test_rotations_and_flips_match_pil_as_pyact_made_them(size):
    image = asymmetric_image(*size)
    for angle in PYACT_ANGLES:
        for flip in range(4):
            ours = apply(image[None], Transform(angle=angle, flip=flip), colours=3)[0]
            # PIL's fixed-point arithmetic puts the odd pixel exactly on a boundary the other way
            assert agreement(ours, pil_pyact(image, angle, flip)) > 0.998, (angle, flip)
            if angle >= 10:  # the controls: clockwise, or about the top-left corner, is another image
                assert (
                    agreement(
                        apply(image[None], Transform(angle=-angle, flip=flip), 3)[0], pil_pyact(image, angle, flip)
                    )
                    < 0.5
                )
                assert (
                    agreement(
                        pil_pyact(image, angle, flip), np.array(Image.fromarray(image).rotate(angle, center=(0, 0)))
                    )
                    < 0.5
                )
    rotated = apply(image[None], Transform(angle=35), 3)[0]
    assert (rotated[0, 0] == 0).all() and (rotated[-1, -1] == 0).all()  # black fill where nothing was


def test_flips_are_pyacts_codes_and_angle_0_no_flip_is_the_identity():
    image = asymmetric_image()
    clip = image[None]
    assert np.array_equal(apply(clip, Transform(angle=0, flip=0), 3), clip)
    assert np.array_equal(apply(clip, Transform(flip=1), 3)[0], image[:, ::-1])  # left-right
    assert np.array_equal(apply(clip, Transform(flip=2), 3)[0], image[::-1])  # top-bottom
    assert np.array_equal(apply(clip, Transform(flip=3), 3)[0], image[::-1, ::-1])  # both
    assert apply(clip, draw("none", np.random.default_rng(0), 3), 3) is clip


@pytest.mark.parametrize("preset", ["pyact", "standard"])
def test_one_transform_moves_every_frame_of_a_window_alike(preset):
    frames = np.stack([asymmetric_image(seed=t) for t in range(6)])  # frames that differ
    rng = np.random.default_rng(3)
    for _ in range(10):
        transform = draw(preset, rng, 3)
        out = apply(frames, transform, 3)
        for t in range(6):
            assert np.array_equal(out[t], apply(frames[t : t + 1], transform, 3)[0])
    # the control: a draw per frame (jitter) gives frames no single transform explains
    jittered = np.stack([apply(frames[t : t + 1], draw(preset, rng, 3), 3)[0] for t in range(6)])
    transform = draw(preset, np.random.default_rng(3), 3)
    assert not np.array_equal(jittered, apply(frames, transform, 3))


def test_depth_moves_with_the_colour_but_keeps_its_readings():
    rng = np.random.default_rng(5)
    clip = rng.integers(0, 256, (4, 32, 32, 4), dtype=np.uint8)
    clip[..., 3] = rng.choice(np.array([0, 90, 200], np.uint8), size=(4, 32, 32))  # 0 = no reading
    for _ in range(20):
        transform = draw("standard", rng, colours=3)
        assert transform.photometric and len(transform.gain) == 3  # gains for R, G, B only
        out = apply(clip, transform, colours=3)
        # nearest pixel, no photometric change: every depth is one the clip had (0 stays 0, no blends)
        assert set(np.unique(out[..., 3])) <= {0, 90, 200}
        geometric = Transform(angle=transform.angle, scale=transform.scale, shift=transform.shift)
        assert np.array_equal(out[..., 3], apply(clip, geometric, colours=3)[..., 3])
    depth = clip[..., 3:]
    assert np.array_equal(apply(depth, Transform(gamma=2.0, brightness=50.0), colours=0), depth)


def test_standard_changes_brightness_and_each_channel_within_its_ranges():
    rng = np.random.default_rng(9)
    grey = np.full((2, 16, 16, 3), 128, np.uint8)
    means = np.array([apply(grey, draw("standard", rng, 3), 3)[:, 6:10, 6:10].mean(axis=(0, 1, 2)) for _ in range(200)])
    assert means.std(axis=0).min() > 5  # every channel varies
    assert np.abs(np.corrcoef(means.T)[0, 1]) < 0.95  # and not all alike: a gain per channel
    assert draw("standard", rng, 3).flip == 0  # never flipped: a flip reverses an action's motion


def test_eval_windows_are_never_augmented_and_seeds_fix_the_batches(small_shards):
    manifest = read_manifest(small_shards)

    def first_batches(split, train, augment, seed=0, epoch=0):
        dataset = WindowDataset(
            small_shards, manifest, split, 4, Part(), train=train, seed=seed, augment=augment, shuffle_size=0
        )
        dataset.set_epoch(epoch)
        iterator = iter(dataset)
        return [next(iterator)[0] for _ in range(2)]

    plain = first_batches("eval", False, "none")
    assert all(torch.equal(a, b) for a, b in zip(plain, first_batches("eval", False, "standard")))
    once, twice = first_batches("train", True, "standard"), first_batches("train", True, "standard")
    assert all(torch.equal(a, b) for a, b in zip(once, twice))  # a fixed seed: the same batches
    unaugmented = first_batches("train", True, "none")
    assert not any(torch.equal(a, b) for a, b in zip(once, unaugmented))  # it did augment them
    assert not any(torch.equal(a, b) for a, b in zip(once, first_batches("train", True, "standard", seed=1)))
    assert not any(torch.equal(a, b) for a, b in zip(once, first_batches("train", True, "standard", epoch=1)))


def test_each_replica_and_worker_draws_its_own_transforms():
    def transforms(*key):
        rng = window_draws(*key)
        return [draw("pyact", rng, 3) for _ in range(32)]

    assert transforms(0, 0, 0, 0) == transforms(0, 0, 0, 0)
    others = [transforms(0, 0, 1, 0), transforms(0, 0, 0, 1), transforms(0, 1, 0, 0), transforms(1, 0, 0, 0)]
    assert all(other != transforms(0, 0, 0, 0) for other in others)
