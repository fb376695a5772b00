"""``pyact convert-keras``: pyACT's Keras HDF5 weights (``save_weights`` or ``ModelCheckpoint``
files) -> a pyact-torch checkpoint, without TensorFlow (h5py). Kernels are transposed to torch
layouts and DENSE_1's rows permuted from Keras' channels-last flatten; every array is checked
against what the network expects before anything is built.

Two networks are told apart by their layer names: pyACT 0.0.7's ConvNet3D (``CONV3D_1`` ..
``CONV3D_4``, ``BATCH_NORM_1`` .. ``4``: presets ``c3d`` and ``tiny``) and pyACT 1.x's
(``INITIAL_CONV3D``, ``CONV3D_1_C1``, ``CONV3D_1_c2`` .. ``CONV3D_4_c2``, and five BatchNorm
layers Keras named itself, ``batch_normalization``, ``batch_normalization_1``, ..., taken in the
file's layer order: preset ``c3d-v1``)."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable, cast

import numpy as np
import torch

from ..io import storage
from ..training.checkpoint import CHECKPOINT_FORMAT, ZIP_MAGIC, load_object, make_checkpoint, nonfinite_weights
from ..config import KerasConfig
from ..errors import UserError
from ..io.lifecycle import uninterrupted
from ..data.labels import PYACT_CLASSES
from ..model import PRESETS, build_model
from ..data.shards import MODALITY_OF

CONV_LAYERS = ("CONV3D_1", "CONV3D_2", "CONV3D_3", "CONV3D_4")
NORM_LAYERS = ("BATCH_NORM_1", "BATCH_NORM_2", "BATCH_NORM_3", "BATCH_NORM_4")
DENSE_LAYERS = ("DENSE_1", "DENSE_2", "DENSE_CLASS")
V1_CONV_LAYERS = ("INITIAL_CONV3D",) + tuple(f"CONV3D_{n}_{c}" for n in range(1, 5) for c in ("C1", "c2"))
V1_NORM_LAYERS = tuple(f"batch_normalization#{k}" for k in range(5))  # Keras' own names, in file order
KERAS_NORM_NAME = re.compile(r"batch_normalization(_v\d+)?(_\d+)?")
NETWORKS = {"0.0.7": (CONV_LAYERS, NORM_LAYERS), "1.x": (V1_CONV_LAYERS, V1_NORM_LAYERS)}
KERAS_TO_TORCH = {
    "kernel": "weight",
    "bias": "bias",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}


MAX_WEIGHT_BYTES = 4 << 30  # one weight array as float32: c3d's DENSE_1 at 64x64 frames is 0.8 GB
MAX_TOTAL_BYTES = 8 << 30  # all of them: c3d at 64x64 frames holds 0.83 GB


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _names(node: Any, attribute: str) -> list[str]:
    """A Keras name-list attribute (``layer_names``, ``weight_names``) as strings."""
    return [_text(name) for name in np.atleast_1d(node.attrs.get(attribute, []))]


def read_keras_weights(path: str) -> tuple[dict[str, dict[str, np.ndarray]], dict | None]:
    """``{layer: {kernel|bias|gamma|...: array}}`` of a legacy Keras HDF5 file, following its
    own ``layer_names`` / ``weight_names`` attributes; a whole-model file (weights under
    ``model_weights``) also gives its ``model_config``. Every name must lead to what it should
    (a group, a floating-point dataset) before anything is read."""
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{path}: not an HDF5 file ({str(exc).splitlines()[0]})") from None
    with handle:
        config = None
        if "model_config" in handle.attrs:
            try:
                config = json.loads(_text(handle.attrs["model_config"]))
            except (ValueError, RecursionError):
                raise UserError(f"{path}: its model_config is not valid JSON") from None
            if not isinstance(config, dict):
                raise UserError(f"{path}: its model_config is not a JSON object")
        group = handle.get("model_weights", handle)
        if not isinstance(group, h5py.Group):
            raise UserError(f"{path}: model_weights is not a group")
        if "layer_names" not in group.attrs:
            raise UserError(f"{path}: not a Keras weights file (no layer_names attribute)")
        layers: dict[str, dict[str, np.ndarray]] = {}
        total, norms = 0, 0
        for layer in _names(group, "layer_names"):
            node = group.get(layer) if layer else None
            if not isinstance(node, h5py.Group) or isinstance(group.get(layer, getlink=True), h5py.ExternalLink):
                raise UserError(f"{path}: layer {layer[:80]!r} of layer_names has no group in this file")
            key = layer
            if KERAS_NORM_NAME.fullmatch(layer) and _names(node, "weight_names"):
                if norms == len(V1_NORM_LAYERS):
                    raise UserError(
                        f"{path}: more than {norms} BatchNormalization layers with weights; not a pyACT network"
                    )
                key, norms = V1_NORM_LAYERS[norms], norms + 1
            if key not in CONV_LAYERS + NORM_LAYERS + DENSE_LAYERS + V1_CONV_LAYERS + V1_NORM_LAYERS:
                continue  # only the networks' arrays are read: at most 62, whatever the file lists
            weights = {}
            for name in _names(node, "weight_names"):
                data = node.get(name) if name else None
                where = f"{path}: weight {layer[:80]}/{name[:80]}"
                if not isinstance(data, h5py.Dataset) or isinstance(node.get(name, getlink=True), h5py.ExternalLink):
                    raise UserError(f"{where} of weight_names is missing (or in another file)")
                if data.shape is None or data.dtype.kind != "f":
                    raise UserError(f"{where} is {data.dtype} {data.shape}, not floating-point numbers")
                total += data.size * 4
                if data.size * 4 > MAX_WEIGHT_BYTES or total > MAX_TOTAL_BYTES:
                    raise UserError(f"{where} has {data.size} values, more than ConvNet3D's weights can have")
                kind = re.sub(r"(_\d+)?:\d+$", "", name.rsplit("/", 1)[-1])  # "CONV3D_1/kernel:0" -> kernel
                try:
                    weights[kind] = np.asarray(data, dtype=np.float32)
                except OSError as exc:  # damaged chunks
                    raise UserError(f"{where}: cannot be read ({str(exc).splitlines()[0]})") from None
            if weights:
                layers[key] = weights
    return layers, config


def _configured_input(config: dict, path: str) -> tuple[int, int, int, int] | None:
    """(T, H, W, C) of the first 5-D ``batch_input_shape`` in a Keras model config, if any."""
    body = config.get("config", {})
    entries = body.get("layers", []) if isinstance(body, dict) else body  # Keras < 2.2 Sequential: a bare list
    for entry in entries if isinstance(entries, list) else []:
        settings = entry.get("config") if isinstance(entry, dict) else None
        shape = settings.get("batch_input_shape") if isinstance(settings, dict) else None
        if isinstance(shape, list) and len(shape) == 5:
            if not all(type(d) is int and d > 0 for d in shape[1:]):
                raise UserError(
                    f"{path}: its model_config gives the input shape {shape[1:]}, which is not a positive size"
                )
            return tuple(shape[1:])
    return None


def network_of(layers: dict, path: str) -> str:
    """Which pyACT network a file's layers are: ``0.0.7`` or ``1.x`` (by their names)."""
    if "INITIAL_CONV3D" in layers:
        return "1.x"
    if "CONV3D_1" in layers:
        return "0.0.7"
    raise UserError(
        f"{path}: not a pyACT ConvNet3D weights file (neither CONV3D_1 of pyACT 0.0.7 nor "
        f"INITIAL_CONV3D of pyACT 1.x; it has {', '.join(sorted(layers))[:200] or 'no weights'})"
    )


def _input_shape(
    layers: dict, network: str, preset: str, config: dict | None, seq_len: int, path: str
) -> tuple[int, int, int]:
    """(T, S, C): from the model config when the file has one, else from DENSE_1's row count
    (T x S/P x S/P x filters, P the network's pooling) with T = ``seq_len``; either way checked
    against the weights, so that nothing is built or reshaped for an input the weights cannot take."""
    convs = NETWORKS[network][0]
    channels = layers[convs[0]]["kernel"].shape[3]
    filters = layers[convs[-1]]["kernel"].shape[4]
    rows = layers["DENSE_1"]["kernel"].shape[0]
    pooling = PRESETS[preset].pooling
    shape = _configured_input(config, path) if config is not None else None
    if shape is not None:
        seq_len, size, width, given = shape
        if size != width:
            raise UserError(f"{path}: the model takes {size}x{width} frames; ConvNet3D takes square ones")
        if given != channels:
            raise UserError(f"{path}: the model config gives {given} channels, {convs[0]} takes {channels}")
    else:
        cells, remainder = divmod(rows, filters * seq_len)
        side = math.isqrt(cells)
        if remainder or not side or side * side != cells:
            raise UserError(
                f"{path}: DENSE_1 has {rows} inputs, which is no {seq_len}-frame square input; give --seq-len"
            )
        size = side * pooling
    if size % pooling:
        raise UserError(f"{path}: the model takes {size}x{size} frames; this network needs a multiple of {pooling}")
    if rows != seq_len * (size // pooling) ** 2 * filters:
        raise UserError(
            f"{path}: DENSE_1 has {rows} inputs, not the {seq_len * (size // pooling) ** 2 * filters} "
            f"of a {seq_len}x{size}x{size} input"
        )
    return seq_len, size, channels


def keras_to_state_dict(
    layers: dict, network: str, model: torch.nn.Module, seq_len: int, image_size: int
) -> dict[str, torch.Tensor]:
    """The torch ``state_dict`` of ``model`` for the Keras weights of ``network``: the file's
    convs and BatchNorms in order onto the model's, kernels transposed to torch layouts,
    DENSE_1's rows permuted from Keras' channels-last flatten (T, H, W, C) to torch's (C, T, H, W)."""
    conv_names, norm_names = NETWORKS[network]
    features = cast(torch.nn.Sequential, model.features)
    convs = [i for i, m in enumerate(features) if isinstance(m, torch.nn.Conv3d)]
    norms = [i for i, m in enumerate(features) if isinstance(m, torch.nn.BatchNorm3d)]
    state: dict[str, torch.Tensor] = {}
    for index, name in zip(convs, conv_names, strict=True):
        kernel = layers[name]["kernel"]  # (kT, kH, kW, in, out)
        state[f"features.{index}.weight"] = torch.from_numpy(kernel.transpose(4, 3, 0, 1, 2).copy())
        state[f"features.{index}.bias"] = torch.from_numpy(layers[name]["bias"])
    for index, name in zip(norms, norm_names, strict=True):
        for kind in ("gamma", "beta", "moving_mean", "moving_variance"):
            state[f"features.{index}.{KERAS_TO_TORCH[kind]}"] = torch.from_numpy(layers[name][kind])
        state[f"features.{index}.num_batches_tracked"] = torch.tensor(0)
    side = image_size // (2 ** len(norms))
    first = layers["DENSE_1"]["kernel"]  # (T*H*W*C, out)
    filters = layers[conv_names[-1]]["kernel"].shape[4]
    first = first.reshape(seq_len, side, side, filters, -1).transpose(4, 3, 0, 1, 2).reshape(first.shape[1], -1)
    state["classifier.1.weight"] = torch.from_numpy(np.ascontiguousarray(first))
    state["classifier.1.bias"] = torch.from_numpy(layers["DENSE_1"]["bias"])
    for index, layer in ((3, "DENSE_2"), (5, "DENSE_CLASS")):
        state[f"classifier.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(layers[layer]["kernel"].T))
        state[f"classifier.{index}.bias"] = torch.from_numpy(layers[layer]["bias"])
    return state


def _preset_of(layers: dict, network: str, path: str) -> str:
    """The preset whose layers the file's arrays are, each checked for its rank first."""
    conv_names, norm_names = NETWORKS[network]
    needed = {
        **{n: ("kernel", "bias") for n in conv_names + DENSE_LAYERS},
        **{n: ("gamma", "beta", "moving_mean", "moving_variance") for n in norm_names},
    }
    missing = [
        f"{layer.split('#')[0]}/{kind}"
        for layer, kinds in needed.items()
        for kind in kinds
        if kind not in layers.get(layer, {})
    ]
    if missing:
        raise UserError(
            f"{path}: not a whole pyACT {network} ConvNet3D weights file (missing "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})"
        )
    for layer, kinds in needed.items():
        for kind in kinds:
            rank = 1 if kind != "kernel" else 5 if layer in conv_names else 2
            if layers[layer][kind].ndim != rank:
                raise UserError(
                    f"{path}: {layer}/{kind} has shape {layers[layer][kind].shape}; "
                    f"a ConvNet3D {kind} has {rank} dimension{'s' if rank > 1 else ''}"
                )
    widths = tuple(layers[n]["kernel"].shape[4] for n in conv_names)
    dense = tuple(layers[n]["kernel"].shape[1] for n in DENSE_LAYERS[:2])
    for name, preset in PRESETS.items():
        convs = tuple(width for width, count in preset.blocks for _ in range(count))
        if convs == widths and preset.dense == dense and (network == "1.x") == preset.conv_relu:
            return name
    raise UserError(
        f"{path}: a pyACT {network} ConvNet3D with filters {widths} and dense {dense} matches no --model preset"
    )


def convert_keras(config: KerasConfig, print_fn: Callable[[str], None] = print) -> dict:
    """``pyact convert-keras``: a pyACT Keras HDF5 file -> a pyact-torch checkpoint."""

    storage.check_output_file(config.out, "checkpoint")  # before any work
    if not os.path.isfile(config.h5):
        raise UserError(f"{config.h5}: no such file")
    check_replaceable(config.out, config.overwrite, source=config.h5)
    layers, model_config = read_keras_weights(config.h5)
    network = network_of(layers, config.h5)
    preset = _preset_of(layers, network, config.h5)
    if config.model != "auto" and config.model != preset:
        raise UserError(
            f"{config.h5}: holds pyACT {network}'s network ({preset}), not --model {config.model}; "
            f"leave out --model (it is read from the file's layer names) or give --model {preset}"
        )
    seq_len, image_size, channels = _input_shape(layers, network, preset, model_config, config.seq_len, config.h5)
    if channels not in MODALITY_OF:
        raise UserError(
            f"{config.h5}: {NETWORKS[network][0][0]} takes {channels} channels; pyact-torch data has 1, 3 or 4"
        )
    classes = list(config.classes or PYACT_CLASSES)
    outputs = layers["DENSE_CLASS"]["kernel"].shape[1]
    if outputs != len(classes):
        raise UserError(f"{config.h5}: DENSE_CLASS has {outputs} outputs but {len(classes)} classes were given")
    model = build_model(preset, channels, seq_len, image_size, len(classes))
    state_dict = keras_to_state_dict(layers, network, model, seq_len, image_size)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise UserError(
            f"{config.h5}: weights do not fit ConvNet3D at {seq_len}x{image_size}x{image_size}x{channels} "
            f"({str(exc).splitlines()[-1].strip()})"
        ) from None
    bad = nonfinite_weights(model.state_dict())
    if bad:
        raise UserError(f"{config.h5}: its weights hold NaN or infinite values ({bad[0]} of the converted model)")
    data_shape = {"channels": channels, "seq_len": seq_len, "image_size": image_size, "modality": MODALITY_OF[channels]}
    checkpoint = make_checkpoint(
        model.state_dict(), {"model": preset}, classes, data_shape, converted_from=os.path.basename(config.h5)
    )
    with storage.open_write(config.out) as sink, uninterrupted("the checkpoint is written"):
        torch.save(checkpoint, sink)
    print_fn(
        f"wrote {config.out}: pyACT {network}'s network as --model {preset} "
        f"at {seq_len}x{image_size}x{image_size}x{channels}, "
        f"{len(classes)} classes in {'the given' if config.classes else 'pyACT'} order"
    )
    return checkpoint


def _check_checkpoint(url: str) -> None:
    """A UserError unless ``url`` is a pyact-torch checkpoint. A local file is mapped, not read
    (a multi-GB file that is not ours must not fill the memory to be refused)."""
    if storage.is_gcs(url):
        load_object(url)
        return
    with open(url, "rb") as handle:
        if handle.read(4) != ZIP_MAGIC:
            raise UserError(f"{url}: not a zip archive")
    try:
        state = torch.load(url, mmap=True, weights_only=True, map_location="cpu")
    except Exception:  # torch raises many types for files that are not its own
        raise UserError(f"{url}: not a checkpoint") from None
    if not (isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT):
        raise UserError(f"{url}: not a {CHECKPOINT_FORMAT} checkpoint")


def check_replaceable(out: str, overwrite: bool, source: str = "") -> None:
    """Before any work: ``out`` may be written. Never the input itself; an existing file only
    with ``--overwrite``, and only when it is a pyact-torch checkpoint (a file of ours)."""
    if source and not storage.is_gcs(out) and os.path.exists(out) and os.path.samefile(out, source):
        raise UserError(f"{out}: is the input file itself; give another output name")
    if not storage.exists(out):
        return
    if not overwrite:
        raise UserError(f"{out}: exists; add --overwrite to replace it (only a pyact-torch checkpoint is replaced)")
    try:
        _check_checkpoint(out)
    except UserError:
        raise UserError(
            f"{out}: exists and is not a pyact-torch checkpoint; refusing to replace it even with "
            f"--overwrite (move it, or give another name)"
        ) from None
