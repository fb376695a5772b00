"""Run under ``PJRT_DEVICE=CPU CPU_NUM_DEVICES=4`` (tests/training/test_spmd.py does): the same initial
weights and global batches for a few Adam steps through pyact-torch's SPMD backend (its device
loader, ``train_step``, ``evaluate``) and in eager PyTorch on one device; prints the facts as
JSON. float64, so that what differs between 4 partial sums and 1 is rounding at ~1e-16, which
Adam's division by sqrt(v) cannot blow up into a visible difference."""

from __future__ import annotations

import glob
import json
import os
import sys

import torch
import torch.nn.functional as F

from pyact_torch.training.devices import make_backend
from pyact_torch.training.validation import evaluate
from pyact_torch.data.loader import HostBatches, Part, WindowDataset, on_device
from pyact_torch.model import build_model
from pyact_torch.data.shards import read_manifest
from pyact_torch.training.train import train_step

STEPS, BATCH, SIZE = 4, 8, 16


def max_diff(a: dict, b: dict) -> float:
    return max(
        (
            (x.detach().cpu().double() - y.detach().cpu().double()).abs().max().item()
            for x, y in zip(a.values(), b.values())
            if x.dtype.is_floating_point
        ),
        default=0.0,
    )


def adam_state(optimizer: torch.optim.Optimizer) -> dict:
    return {f"{i}.{k}": v for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}


def main() -> None:
    backend = make_backend("spmd")
    from torch_xla.distributed.spmd.xla_sharding import wrap_as_sharded_tensor

    torch.manual_seed(0)
    base = build_model("tiny", 3, 6, SIZE, 17).double()
    models = {}
    for name in ("one device", "per-device statistics", "spmd"):
        models[name] = build_model("tiny", 3, 6, SIZE, 17).double()
        models[name].load_state_dict(base.state_dict())
    models["spmd"].to(backend.device)
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    generator = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.rand(BATCH, 3, 6, SIZE, SIZE, generator=generator, dtype=torch.float64),
            torch.randint(0, 17, (BATCH,), generator=generator),
            torch.ones(BATCH, dtype=torch.bool),
        )
        for _ in range(STEPS)
    ]
    devices = backend.devices_per_reader * backend.world
    shards = None
    for (clips, labels, _), (device_clips, device_labels, _) in zip(batches, backend.device_loader(batches)):
        for name, parts in (("one device", 1), ("per-device statistics", devices)):  # eager references
            optimizers[name].zero_grad()
            loss = sum(F.cross_entropy(models[name](c), y) for c, y in zip(clips.chunk(parts), labels.chunk(parts)))
            (loss / parts).backward()
            optimizers[name].step()
        train_step(models["spmd"], optimizers["spmd"], device_clips, device_labels, backend)
        backend.sync()
        if shards is None:
            shards = [list(s.data.shape) for s in wrap_as_sharded_tensor(device_clips).local_shards]
    weights = {name: {k: v for k, v in m.state_dict().items() if "running" not in k} for name, m in models.items()}
    running = {name: {k: v for k, v in m.state_dict().items() if "running" in k} for name, m in models.items()}
    facts = {
        "devices": devices,
        "batch_shards": shards,
        "weights_vs_one_device": max_diff(weights["spmd"], weights["one device"]),
        "adam_state_vs_one_device": max_diff(adam_state(optimizers["spmd"]), adam_state(optimizers["one device"])),
        "running_mean_vs_one_device": max_diff(
            {k: v for k, v in running["spmd"].items() if "mean" in k},
            {k: v for k, v in running["one device"].items() if "mean" in k},
        ),
        "weights_vs_per_device_statistics": max_diff(weights["spmd"], weights["per-device statistics"]),
        "compile_counts": backend.compile_counts(),
    }
    if len(sys.argv) > 1:  # a split whose size is no multiple of the global batch, counted once
        data = sys.argv[1]
        manifest = read_manifest(data)
        model = build_model("tiny", 3, manifest.seq_len, manifest.image_size, len(manifest.classes))
        model.to(backend.device)
        dataset = WindowDataset(data, manifest, "test", BATCH, Part(backend.rank, backend.world), train=False)
        result = evaluate(
            model, on_device(HostBatches(dataset, 0, len(dataset)), backend), backend, len(manifest.classes)
        )
        facts["eval"] = {
            "windows": result["windows"],
            "confusion_sum": sum(map(sum, result["confusion"])),
            "manifest_count": manifest.splits["test"].count,
            "batch": BATCH,
        }
    dump = os.environ.get("SPMD_FACTS_DUMP")
    if dump:  # the compiled, partitioned programs XLA ran: count the cross-device reductions
        counts = [open(path).read().count(" all-reduce(") for path in glob.glob(f"{dump}/*after_optimizations.txt")]
        facts["all_reduce_per_program"] = sorted(counts)
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
