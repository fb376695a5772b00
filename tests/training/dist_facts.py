"""Run under ``torchrun --nproc_per_node N`` (tests/training/test_distributed.py does): the same initial
weights and global batches for a few Adam steps through pyact-torch's torch.distributed backend
(DDP over gloo, ``train_step``, ``evaluate``) and, on rank 0, in one process computing the same
N-replica step (each replica's share through the model on its own, so BatchNorm is per replica;
the losses averaged). float64, so that what differs is rounding at ~1e-16. Rank 0 prints the
facts as JSON. Two negative controls show the comparison can fail: the same DDP run with every
replica fed replica 0's share, and a reference with BatchNorm over the whole batch."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
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
            (x.detach().double() - y.detach().double()).abs().max().item()
            for x, y in zip(a.values(), b.values())
            if x.dtype.is_floating_point
        ),
        default=0.0,
    )


def adam_state(optimizer: torch.optim.Optimizer) -> dict:
    return {f"{i}.{k}": v for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}


def weights(model: torch.nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}


def main() -> None:
    backend = make_backend("cpu", distributed=True, timeout=60)
    rank, world = backend.rank, backend.world
    torch.manual_seed(0)
    base = build_model("tiny", 3, 6, SIZE, 17).double()
    generator = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.rand(BATCH * world, 3, 6, SIZE, SIZE, generator=generator, dtype=torch.float64),
            torch.randint(0, 17, (BATCH * world,), generator=generator),
        )
        for _ in range(STEPS)
    ]
    models = {}
    for name in ("distributed", "same share everywhere", "per-replica reference", "whole-batch reference"):
        models[name] = build_model("tiny", 3, 6, SIZE, 17).double()
        models[name].load_state_dict(base.state_dict())
    nets = {name: backend.wrap(models[name]) for name in ("distributed", "same share everywhere")}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    for clips, labels in batches:
        shares = list(zip(clips.chunk(world), labels.chunk(world)))
        train_step(nets["distributed"], optimizers["distributed"], *shares[rank], backend)
        train_step(nets["same share everywhere"], optimizers["same share everywhere"], *shares[0], backend)
        if rank == 0:  # the references, in this one process
            for name, parts in (("per-replica reference", shares), ("whole-batch reference", [(clips, labels)])):
                optimizers[name].zero_grad()
                # the loss in float32, as train_step computes it (logits.float())
                loss = sum(F.cross_entropy(models[name](c).float(), y) for c, y in parts) / len(parts)
                loss.backward()
                optimizers[name].step()
    # every rank holds the same weights: rank 0's, broadcast, against this rank's
    mine = weights(models["distributed"])
    spread = 0.0
    for tensor in mine.values():
        theirs = tensor.clone()
        dist.broadcast(theirs, 0)
        spread = max(spread, (theirs - tensor).abs().max().item())
    spreads = [None] * world
    dist.all_gather_object(spreads, spread)
    facts = {
        "world": world,
        "rank_spread": max(spreads),
        "agreement": {"same value": backend.same_everywhere(7), "rank as value": backend.same_everywhere(rank)},
    }
    if len(sys.argv) > 1:
        facts.update(data_facts(sys.argv[1], backend))
    if rank == 0:
        reference = models["per-replica reference"]
        facts.update(
            {
                "weights_vs_reference": max_diff(mine, weights(reference)),
                "adam_state_vs_reference": max_diff(
                    adam_state(optimizers["distributed"]), adam_state(optimizers["per-replica reference"])
                ),
                "same_share_vs_reference": max_diff(weights(models["same share everywhere"]), weights(reference)),
                "whole_batch_bn_vs_distributed": max_diff(mine, weights(models["whole-batch reference"])),
            }
        )
        print(json.dumps(facts), flush=True)
    backend.close()


def data_facts(data: str, backend) -> dict:
    """Each replica's training windows (one epoch) and step count, and an evaluation of the
    test split whose size is no multiple of the global batch."""
    manifest = read_manifest(data)
    part = Part(backend.rank, backend.world)
    train = WindowDataset(data, manifest, "train", 4, part, train=True, seed=0, workers=0)
    keys: list[dict] = []
    train.meta_sink = keys
    steps = sum(1 for _ in HostBatches(train, 0, len(train)))
    gathered = [None] * backend.world
    dist.all_gather_object(gathered, {"steps": steps, "keys": [m["key"] for m in keys]})
    model = build_model("tiny", 3, manifest.seq_len, manifest.image_size, len(manifest.classes))
    test = WindowDataset(data, manifest, "test", 5, part, train=False)
    result = evaluate(
        backend.wrap(model), on_device(HostBatches(test, 0, len(test)), backend), backend, len(manifest.classes)
    )
    return {
        "train_steps": [g["steps"] for g in gathered],
        "train_keys": [g["keys"] for g in gathered],
        "train_count": manifest.splits["train"].count,
        "eval_windows": result["windows"],
        "eval_confusion_sum": sum(map(sum, result["confusion"])),
        "test_count": manifest.splits["test"].count,
    }


if __name__ == "__main__":
    main()
