#!/usr/bin/env python3
"""Training benchmark (figures go to docs/benchmarks.md).

Measures on this machine, every figure against a baseline from the same run:
- training windows/s of ``tiny`` (32x32) and ``c3d`` (pyACT's ConvNet3D, 64x64) on XLA:CPU
  (through ``devices.launch`` = xmp.spawn, one replica) and eager CPU, through the real loader,
  device loader and ``train_step``; XLA as a ratio of eager;
- after warm-up: new XLA compilations and ``aten::`` CPU fallbacks per step (both must be 0);
- the loader alone (same WindowDataset + DataLoader as training), from local shards and from
  the fake-gcs-server emulator, as a multiple of the fastest training consumption measured,
  over epochs of the real Train split's size (49,920 windows) and of the small synthetic one;
- the two stages the loader replaced, against what it used before: reading from the emulator
  (``storage.open_read`` vs ``blob.open``) and tar -> samples (``shards.read_tar`` vs
  webdataset's ``tarfile``-based stage);
- checkpoint stall for ``c3d`` with its Adam state (~2.5 GB): the time the training loop is
  blocked per checkpoint (host copy + hand-off to the background writer) as a fraction of a
  synchronous ``torch.save`` upload of the same state to the emulator.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import add_child_arguments, best_seconds, run_child  # noqa: E402  (bench/common.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "pyact-bench"


# --- data ------------------------------------------------------------------------------------


def make_shards(out: str) -> dict[int, str]:
    """One synthetic dataset (8 Train, 1 Eval, 1 Test subjects), preprocessed at 32 and 64."""
    from pyact_torch.config import PreprocessConfig, SynthConfig
    from pyact_torch.data.preprocess import preprocess
    from pyact_torch.data.synthetic import make_dataset

    raw = os.path.join(out, "raw")
    if not os.path.exists(os.path.join(raw, "Train")):
        make_dataset(SynthConfig(raw, subjects=(8, 1, 1), frames=(50, 70), size=(160, 120), seed=5), progress=False)
    shards = {}
    for size in (32, 64):
        dest = os.path.join(out, f"shards-{size}-512")
        if not os.path.exists(os.path.join(dest, "manifest.json")):
            preprocess(PreprocessConfig(raw, dest, image_size=size), progress=False, print_fn=lambda *a: None)
        shards[size] = dest
    return shards


# --- training throughput (child process) -----------------------------------------------------


def _throughput_replica(
    index: int, data: str, preset: str, device: str, batch: int, warmup: int, steps: int, result_path: str
) -> None:
    from pyact_torch.training.devices import make_backend
    from pyact_torch.data.loader import Part, WindowDataset, make_loader
    from pyact_torch.model import model_input
    from pyact_torch.model import build_model
    from pyact_torch.data.shards import read_manifest
    from pyact_torch.training.train import train_step

    backend = make_backend(device)
    manifest = read_manifest(data)
    torch.manual_seed(0)
    model = build_model(
        preset, len(manifest.channels), manifest.seq_len, manifest.image_size, len(manifest.classes)
    ).to(backend.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dataset = WindowDataset(data, manifest, "train", batch, Part(), train=True, workers=1)
    needed = warmup + steps
    if len(dataset) < needed:
        raise SystemExit(f"need {needed} batches, the train split has {len(dataset)}")
    batches = iter(backend.device_loader(make_loader(dataset, 1)))
    model.train()
    for _ in range(warmup):
        clips, labels, _ = next(batches)
        loss = train_step(model, optimizer, model_input(clips), labels, backend)
    backend.sync()  # the same graph cut as the device loader's at every step
    loss.cpu()
    before = backend.compile_counts()
    started = time.perf_counter()
    for _ in range(steps):
        clips, labels, _ = next(batches)
        loss = train_step(model, optimizer, model_input(clips), labels, backend)
    backend.sync()
    loss.cpu()  # waits for the last step
    elapsed = time.perf_counter() - started
    after = backend.compile_counts()
    row = {
        "preset": preset,
        "device": device,
        "batch": batch,
        "steps": steps,
        "seconds": elapsed,
        "windows_per_s": steps * batch / elapsed,
    }
    if after:
        row.update(
            new_compiles=after["compiles"] - before["compiles"],
            new_fallbacks=after["cpu_fallbacks"] - before["cpu_fallbacks"],
            fallback_ops=after["fallback_ops"],
            warmup_compiles=before["compiles"],
        )
    with open(result_path, "w") as handle:
        json.dump(row, handle)


def child_throughput(args: argparse.Namespace) -> None:
    from pyact_torch.training.devices import launch

    launch(
        _throughput_replica,
        (args.data, args.preset, args.device, args.batch, args.warmup, args.steps, args.result),
        args.device,
    )


def throughput(data: str, preset: str, device: str, batch: int, warmup: int, steps: int) -> dict:
    return run_child(__file__, data=data, preset=preset, device=device, batch=batch, warmup=warmup, steps=steps)


# --- loader alone ----------------------------------------------------------------------------

REAL_TRAIN_WINDOWS = 49_920  # pyACT's published Train count (README, The dataset): one real epoch


def real_size_copy(data: str, out: str) -> str:
    """``data`` with a train split as large as the real dataset's, made of its own train shards
    listed again under new names (hard links; the loader never looks inside a clip): a real
    epoch is ~100 shards, so per-epoch worker start-up and the uneven last shards weigh in as
    they would in training, not 20 times more as in the 5-shard synthetic split."""
    from pyact_torch.data.shards import MANIFEST, read_manifest

    manifest = read_manifest(data).document
    train = manifest["splits"]["train"]
    copies = -(-REAL_TRAIN_WINDOWS // train["count"])
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "train"))
    shards = []
    for copy in range(copies):
        for number, shard in enumerate(train["shards"]):
            renamed = f"train/train-{copy:08x}-{number:06d}.tar"  # a tagged shard name, as a re-conversion writes
            os.link(os.path.join(data, shard["name"]), os.path.join(out, renamed))
            shards.append(dict(shard, name=renamed))
    counts = {k: v * copies for k, v in train["class_counts"].items()}
    manifest["splits"] = {"train": {"count": train["count"] * copies, "class_counts": counts, "shards": shards}}
    with open(os.path.join(out, MANIFEST), "w") as handle:
        json.dump(manifest, handle, indent=1)
    return out


def loader_rate(data: str, workers: int, batch: int = 32, epochs: int = 2, augment: str = "none") -> dict:
    """Windows/s of the training loader over ``epochs`` passes of the train split, no model
    (per-epoch worker start-up included), with the ``augment`` preset."""
    from pyact_torch.data.loader import HostBatches, Part, WindowDataset
    from pyact_torch.data.shards import read_manifest

    manifest = read_manifest(data)
    dataset = WindowDataset(data, manifest, "train", batch, Part(), train=True, workers=workers, augment=augment)
    started = time.perf_counter()
    windows = 0
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        host = HostBatches(dataset, workers, len(dataset))  # what training iterates
        windows += sum(clips.shape[0] for clips, _, _ in host)
        host.check()
    return {
        "windows": windows,
        "epochs": epochs,
        "seconds": time.perf_counter() - started,
        "windows_per_s": windows / (time.perf_counter() - started),
    }


def read_cost(data: str, shards: int = 20, repeats: int = 3) -> dict:
    """Seconds (best of ``repeats``) to read ``shards`` train shards of ``data`` (gs://) in the
    tar reader's 10 KiB pieces: through ``storage.open_read`` and through google-cloud-storage's
    own reader (``blob.open("rb")``, what ``open_read`` used before)."""
    from pyact_torch.io import storage
    from pyact_torch.data.shards import read_manifest, split_shards

    chosen = split_shards(data, read_manifest(data), "train")[:shards]

    def library(url: str):
        return storage._blob(url).open("rb", chunk_size=storage.GCS_CHUNK, retry=storage._retry())

    def read_all(opener) -> None:
        for shard in chosen:
            with opener(shard.url) as handle:
                while handle.read(10240):
                    pass

    result = {"shards": len(chosen), "windows": sum(s.count for s in chosen)}
    for name, opener in (("open_read", storage.open_read), ("blob_open", library)):
        result[f"{name}_s"] = best_seconds(lambda opener=opener: read_all(opener), repeats)
    return result


def tar_cost(data: str, shards: int = 20, repeats: int = 3) -> dict:
    """Seconds (best of ``repeats``) to turn ``shards`` local train shards into samples: the
    loader's tar stage (``shards.read_tar``) against webdataset's ``tarfile``-based one (what
    the loader used before)."""
    import webdataset as wds

    from pyact_torch.data.loader import tar_samples
    from pyact_torch.data.shards import read_manifest, split_shards

    urls = [s.url for s in split_shards(data, read_manifest(data), "train")[:shards]]
    result = {"shards": len(urls), "windows": sum(1 for _ in tar_samples(urls))}
    stages = (
        ("read_tar", lambda: tar_samples(urls)),
        ("tarfile", lambda: wds.tarfile_samples({"url": url} for url in urls)),
    )
    for name, samples in stages:

        def count(name: str = name, samples=samples) -> None:
            if sum(1 for _ in samples()) != result["windows"]:
                raise RuntimeError(f"{name}: a different number of samples")

        result[f"{name}_s"] = best_seconds(count, repeats)
    return result


def upload_tree(local: str, url: str) -> None:
    from pyact_torch.io import storage

    for folder, _, files in os.walk(local):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                storage.write_bytes(storage.join(url, os.path.relpath(path, local)), handle.read())


# --- checkpoint stall ------------------------------------------------------------------------


def checkpoint_stall(run_dir: str, repeats: int, image_size: int = 64) -> dict:
    """c3d + Adam state: blocked time per checkpoint vs a synchronous save of the same state to
    the same run dir (at 64x64 the state is ~2.5 GB; ``image_size`` 32 gives ~0.7 GB)."""
    from pyact_torch.io import storage
    from pyact_torch.training.checkpoint import CheckpointWriter
    from pyact_torch.model import build_model
    from pyact_torch.training.devices import make_backend

    backend = make_backend("cpu")
    model = build_model("c3d", 3, 6, image_size, 17)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates Adam's moment buffers: the state is weights + 2 moments

    def host_state() -> dict:
        return {"model": backend.to_host(model.state_dict()), "optimizer": backend.to_host(optimizer.state_dict())}

    sync, stall, background = [], [], []
    size = 0
    writer = CheckpointWriter(run_dir, keep=1, log=lambda m: None)
    for i in range(repeats):
        started = time.perf_counter()
        state = host_state()
        with storage.open_write(storage.join(run_dir, f"sync-{i}.pt")) as sink:
            hashing = storage.HashingWriter(sink)
            torch.save(state, hashing)
        sync.append(time.perf_counter() - started)
        size = hashing.size
        del state
        storage.remove(storage.join(run_dir, f"sync-{i}.pt"))

        started = time.perf_counter()
        writer.save(host_state(), step=i + 1, epoch=0)  # what the training loop waits for
        stall.append(time.perf_counter() - started)
        writer.wait()
        background.append(time.perf_counter() - started)
    writer.close()
    latest = storage.read_json(storage.join(run_dir, "latest.json"))
    assert latest["size"] == size and storage.exists(storage.join(run_dir, latest["name"]))
    return {
        "run_dir": run_dir,
        "image_size": image_size,
        "bytes": size,
        "sync_s": sync,
        "stall_s": stall,
        "background_s": background,
    }


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench-output", "train"), help="scratch folder")
    parser.add_argument("--skip-c3d", action="store_true", help="tiny only (a few minutes less)")
    parser.add_argument("--checkpoints", type=int, default=2, help="checkpoint repeats")
    add_child_arguments(parser)
    args = parser.parse_args()
    if args.child:
        child_throughput(args)
        return

    from pyact_torch.io.emulator import GCSEmulator

    os.makedirs(args.out, exist_ok=True)
    shards = make_shards(args.out)
    report: dict = {"throughput": []}
    plans = [("tiny", 32, 32, 5, 40)] + ([] if args.skip_c3d else [("c3d", 64, 8, 2, 3)])
    for preset, size, batch, warmup, steps in plans:
        for device in ("cpu", "xla"):
            row = throughput(shards[size], preset, device, batch, warmup, steps)
            report["throughput"].append(row)
            print(json.dumps(row), flush=True)

    shutil.rmtree(os.path.join(args.out, "gcs"), ignore_errors=True)
    emulator = GCSEmulator(os.path.join(args.out, "gcs"), log=os.path.join(args.out, "gcs.log"))
    emulator.start()
    try:
        emulator.create_bucket(BUCKET)
        real = real_size_copy(shards[32], os.path.join(args.out, "shards-32-real-size"))
        for name, local in (("", real), ("_small", shards[32])):
            remote = f"gs://{BUCKET}/{os.path.basename(local)}"
            upload_tree(local, remote)
            report[f"loader{name}_local"] = loader_rate(local, workers=2)
            report[f"loader{name}_gcs"] = loader_rate(remote, workers=2)
            print(json.dumps({k: report[k] for k in (f"loader{name}_local", f"loader{name}_gcs")}), flush=True)
        report["gcs_read"] = read_cost(f"gs://{BUCKET}/{os.path.basename(real)}")
        print(json.dumps(report["gcs_read"]), flush=True)
        # fake-gcs-server holds a resumable upload in memory several times over (a 2.5 GB
        # upload grew it past 12 GB here): the emulator gets c3d at 32x32 (~0.7 GB with Adam)
        report["checkpoint_gcs"] = checkpoint_stall(f"gs://{BUCKET}/run", args.checkpoints, image_size=32)
        print(json.dumps(report["checkpoint_gcs"]), flush=True)
    finally:
        emulator.stop()
    report["tar_stage"] = tar_cost(real)
    print(json.dumps(report["tar_stage"]), flush=True)
    local_run = os.path.join(args.out, "run")
    shutil.rmtree(local_run, ignore_errors=True)
    report["checkpoint_local"] = checkpoint_stall(local_run, args.checkpoints, image_size=64)
    print(json.dumps(report["checkpoint_local"]), flush=True)

    print()
    rates = {(r["preset"], r["device"]): r for r in report["throughput"]}
    for preset in dict.fromkeys(r["preset"] for r in report["throughput"]):
        eager, xla = rates[(preset, "cpu")], rates[(preset, "xla")]
        print(
            f"{preset:5} eager CPU {eager['windows_per_s']:8.1f} windows/s   XLA:CPU {xla['windows_per_s']:8.1f} "
            f"windows/s   XLA/eager {xla['windows_per_s'] / eager['windows_per_s']:.2f}   after warm-up: "
            f"{xla['new_compiles'] / xla['steps']:.2f} compilations/step, "
            f"{xla['new_fallbacks'] / xla['steps']:.2f} aten fallbacks/step "
            f"({xla['warmup_compiles']} compilations during warm-up)"
        )
    fastest = max(r["windows_per_s"] for r in report["throughput"] if r["preset"] == "tiny")
    for name, what in (("", "real-size epochs"), ("_small", "5-shard synthetic epochs")):
        for where in ("local", "gcs"):
            row = report[f"loader{name}_{where}"]
            print(
                f"loader alone ({where}, {what} of {row['windows'] // row['epochs']} windows, 32x32, 2 workers): "
                f"{row['windows_per_s']:8.1f} windows/s = {row['windows_per_s'] / fastest:.1f}x the fastest "
                f"training consumption ({fastest:.1f} windows/s, tiny)"
            )
    read = report["gcs_read"]
    per_window = {k: read[f"{k}_s"] * 1e6 / read["windows"] for k in ("open_read", "blob_open")}
    print(
        f"reading {read['shards']} shards from the emulator: "
        f"storage.open_read {per_window['open_read']:.1f} us/window, "
        f"google-cloud-storage's blob.open('rb') {per_window['blob_open']:.1f} us/window "
        f"({per_window['blob_open'] / per_window['open_read']:.1f}x)"
    )
    tar = report["tar_stage"]
    per_window = {k: tar[f"{k}_s"] * 1e6 / tar["windows"] for k in ("read_tar", "tarfile")}
    print(
        f"tar stage, {tar['shards']} local shards -> samples: shards.read_tar {per_window['read_tar']:.1f} us/window, "
        f"webdataset's tarfile_samples {per_window['tarfile']:.1f} us/window "
        f"({per_window['tarfile'] / per_window['read_tar']:.1f}x)"
    )
    for where in ("gcs", "local"):
        ck = report[f"checkpoint_{where}"]
        sync, stall = min(ck["sync_s"]), max(ck["stall_s"])
        print(
            f"checkpoint of c3d@{ck['image_size']} + Adam ({ck['bytes'] / 1e9:.2f} GB) to {where}: loop blocked "
            f"{stall:.2f} s (worst of {len(ck['stall_s'])}) vs synchronous save {sync:.2f} s (best) = "
            f"{stall / sync:.3f}; the background save took {max(ck['background_s']):.1f} s"
        )
    with open(os.path.join(args.out, "report.json"), "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
