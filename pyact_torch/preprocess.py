"""The preprocessing run: raw dataset -> frame cache -> shards -> index files -> manifest.

Resumable at any point: decoded chunks are logged in the local frame cache, finished shards
exist under their final names (written atomically), and the manifest is written last. A
re-run with the same inputs and settings continues; with other settings it is refused unless
``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from . import storage
from .config import PreprocessConfig, output_settings
from .errors import UserError
from .frames import DecodeChunk, FrameCache, FrameSpec, decode_into_cache
from .labels import BadSequence, Sequence, class_list, scan_dataset
from .parallel import map_unordered
from .shards import (FORMAT, MANIFEST, ShardInfo, encode_sample, hash_shard, read_manifest,
                     shard_name, split_entry, write_shard)
from .windows import SPLITS, Window, class_counts, plan_split, split_sequences, window_length

STATE = ".pyact-preprocess.json"  # DEST's settings while a run is unfinished
CHUNK_FRAMES = 64
_OUTPUT = re.compile(r"^((train|eval|test)/)?(manifest\.json|\.pyact-preprocess\.json|index\.json|"
                     r"(train|eval|test)-\d{6}\.tar|\.[^/]*\.partial)$")


@dataclass
class Summary:
    """What a preprocessing run produced, for the closing table."""

    dest: str
    classes: list[str]
    seq_len: int
    class_counts: dict[str, dict[str, int]]
    eval_source: str
    frames: int = 0
    decoded: int = 0
    decode_seconds: float = 0.0
    shards_written: int = 0
    shards_reused: int = 0
    skipped: list[BadSequence] = field(default_factory=list)
    elapsed: float = 0.0
    already_complete: bool = False


def fingerprint(config: PreprocessConfig, sequences: list[Sequence], bad: list[BadSequence]) -> str:
    """Hash of everything that determines the output: settings (not paths or worker counts)
    and the dataset's sequences, frame counts and segments."""
    settings = {k: v for k, v in output_settings(config).items() if k not in ("src", "dest")}
    listing = [(s.path, s.n_frames, [(g.pos, g.len) for g in s.segments]) for s in sequences]
    payload = json.dumps([FORMAT, settings, listing, [b.path for b in bad]])
    return hashlib.sha256(payload.encode()).hexdigest()


def _prepare_dest(config: PreprocessConfig, print_fn, sequences, bad) -> tuple[str, dict | None]:
    """Check DEST and decide: fresh start, resume, already complete, or refuse."""
    storage.check_writable(config.dest)
    token = fingerprint(config, sequences, bad)
    existing = [name for name in storage.list_files(config.dest) if not name.startswith(".tmp/")]
    ours = [name for name in existing if _OUTPUT.match(name)]
    previous, manifest = None, None
    if MANIFEST in ours:
        manifest = read_manifest(config.dest)
        previous = manifest.get("fingerprint")
    elif STATE in ours:
        previous = storage.read_json(storage.join(config.dest, STATE)).get("fingerprint")
    foreign = [name for name in existing if not _OUTPUT.match(name)]
    for name in [n for n in ours if n.endswith(storage.PARTIAL_SUFFIX)]:
        storage.remove(storage.join(config.dest, name))  # left by a killed run
        ours.remove(name)
    if previous == token:
        if manifest is not None:
            return token, manifest
        print_fn(f"resuming the unfinished run in {config.dest}")
        return token, None
    if ours or foreign:
        if not config.overwrite:
            what = "a dataset made from other settings or inputs" if previous else "other files"
            raise UserError(f"{config.dest}: already holds {what}; use --overwrite to replace "
                            f"it, or choose another DEST")
        for name in ours:
            storage.remove(storage.join(config.dest, name))
        print_fn(f"--overwrite: removed {len(ours)} files of a previous run from {config.dest}")
    storage.write_json(storage.join(config.dest, STATE),
                       {"fingerprint": token, "settings": output_settings(config)})
    return token, None


def _cache_dir(config: PreprocessConfig) -> str:
    if config.cache_dir:
        return config.cache_dir
    if storage.is_gcs(config.dest):
        tag = hashlib.sha256(config.dest.encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), f"pyact-torch-cache-{tag}")
    return os.path.join(config.dest, ".tmp")


def _decode(config: PreprocessConfig, sequences: list[Sequence], spec: FrameSpec, token: str,
            summary: Summary, progress: bool) -> tuple[str, dict[str, int], list[Sequence]]:
    """Decode every frame once into the cache; returns the cache path, each sequence's first
    cache slot, and the sequences that decoded cleanly."""
    cache = _cache_dir(config)
    os.makedirs(cache, exist_ok=True)
    info_path, frames_path, log_path = (os.path.join(cache, n) for n in ("cache.json", "frames.u8", "decoded.log"))
    if _cache_fingerprint(info_path) != token:
        for path in (frames_path, log_path):
            if os.path.exists(path):
                os.remove(path)
        with open(info_path, "w") as handle:
            json.dump({"fingerprint": token}, handle)
    slots, chunks, owner = {}, [], {}
    total = 0
    for seq in sequences:
        slots[seq.path] = total
        for first in range(0, seq.n_frames, CHUNK_FRAMES):
            count = min(CHUNK_FRAMES, seq.n_frames - first)
            owner[len(chunks)] = seq
            chunks.append(DecodeChunk(len(chunks), os.path.join(config.src, seq.path), first, count, total + first))
        total += seq.n_frames
    summary.frames = total
    with open(frames_path, "ab") as handle:
        handle.truncate(total * spec.frame_bytes)
    done, failed = _read_log(log_path)
    bad_paths = {owner[c].path: message for c, message in failed.items()}
    pending = [c for c in chunks if c.chunk_id not in done and owner[c.chunk_id].path not in bad_paths]
    reused = sum(c.count for c in chunks if c.chunk_id in done)
    started = time.perf_counter()
    with open(log_path, "a") as log, tqdm(total=total, initial=reused, unit="frame", desc="decode",
                                          disable=None if progress else True, smoothing=0.05) as bar:
        for result in decode_into_cache(pending, frames_path, spec, config.processes):
            summary.decoded += result.decoded
            chunk = chunks[result.chunk_id]
            if result.error is not None:
                if not config.skip_bad_sequences:
                    raise UserError(str(result.error))
                bad_paths[owner[chunk.chunk_id].path] = str(result.error)
                log.write(f"{chunk.chunk_id}\tbad\t{result.error}\n")
            else:
                log.write(f"{chunk.chunk_id}\tok\n")
            log.flush()
            bar.update(chunk.count)
    summary.decode_seconds = time.perf_counter() - started
    for path, message in sorted(bad_paths.items()):
        file, _, reason = message.partition(": ")
        summary.skipped.append(BadSequence(path, file, reason))
    return frames_path, slots, [s for s in sequences if s.path not in bad_paths]


def _cache_fingerprint(info_path: str) -> str | None:
    if not os.path.exists(info_path):
        return None
    with open(info_path) as handle:
        return json.load(handle).get("fingerprint")


def _read_log(path: str) -> tuple[set[int], dict[int, str]]:
    done, failed = set(), {}
    if os.path.exists(path):
        with open(path) as log:
            for line in log:
                parts = line.rstrip("\n").split("\t")
                if not line.endswith("\n") or len(parts) < 2:
                    continue  # a line cut short by a kill: that chunk is decoded again
                if parts[1] == "ok":
                    done.add(int(parts[0]))
                elif parts[1] == "bad" and len(parts) == 3:
                    failed[int(parts[0])] = parts[2]
    return done, failed


@dataclass(frozen=True)
class _ShardJob:
    dest: str
    name: str
    cache_path: str
    spec: FrameSpec
    seq_len: int
    items: tuple  # (key, first cache slot, class index, json meta) per window


_shard_worker: dict = {}


def _write_shard_job(job: _ShardJob) -> ShardInfo:
    cache = _shard_worker.get(job.cache_path)
    if cache is None:
        cache = _shard_worker[job.cache_path] = FrameCache(job.cache_path, job.spec)
    samples = (encode_sample(key, cache.read(slot, job.seq_len), cls, meta)
               for key, slot, cls, meta in job.items)
    return write_shard(job.dest, job.name, samples)


def _window_meta(window: Window) -> dict:
    seq = window.seq
    return {"path": seq.path, "start": window.start, "stop": window.stop, "label": window.label,
            "subject": seq.subject, "action": seq.action}


def _write_shards(config: PreprocessConfig, plans: dict[str, list[Window]], classes: list[str],
                  cache_path: str, slots: dict[str, int], spec: FrameSpec, seq_len: int,
                  summary: Summary, progress: bool) -> dict[str, list[ShardInfo]]:
    jobs: list[_ShardJob] = []
    infos: dict[str, ShardInfo] = {}
    existing = set(storage.list_files(config.dest))
    index_of = {name: i for i, name in enumerate(classes)}
    for split, windows in plans.items():
        for number, first in enumerate(range(0, len(windows), config.shard_size)):
            name = shard_name(split, number)
            part = windows[first:first + config.shard_size]
            if name in existing:
                infos[name] = hash_shard(config.dest, name)
                summary.shards_reused += 1
                continue
            items = tuple((w.key, slots[w.seq.path] + w.start, index_of[w.label], _window_meta(w))
                          for w in part)
            jobs.append(_ShardJob(config.dest, name, cache_path, spec, seq_len, items))
    total = sum(len(w) for w in plans.values())
    done = sum(info.count for info in infos.values())
    with tqdm(total=total, initial=done, unit="window", desc="shards", disable=None if progress else True) as bar:
        for info in map_unordered(_write_shard_job, jobs, config.processes):
            infos[info.name] = info
            bar.update(info.count)
    summary.shards_written = len(jobs)
    for cache in _shard_worker.values():
        cache.close()
    _shard_worker.clear()
    return {split: [infos[shard_name(split, n)] for n in range((len(w) + config.shard_size - 1) // config.shard_size)]
            for split, w in plans.items()}


def preprocess(config: PreprocessConfig, progress: bool = True, print_fn=print) -> Summary:
    """Run (or resume) preprocessing; returns the summary."""
    started = time.perf_counter()
    sequences, bad = scan_dataset(config.src, config.modality)
    if bad and not config.skip_bad_sequences:
        more = f" (and {len(bad) - 1} more broken sequences)" if len(bad) > 1 else ""
        raise UserError(bad[0].message() + more)
    if not sequences:
        raise UserError(f"{config.src}: no usable sequences")
    token, manifest = _prepare_dest(config, print_fn, sequences, bad)
    if manifest is not None:
        counts = {split: entry["class_counts"] for split, entry in manifest["splits"].items()}
        summary = Summary(config.dest, manifest["classes"], manifest["seq_len"], counts,
                          manifest["eval_source"], frames=manifest["source"]["frames"],
                          skipped=[BadSequence(**b) for b in manifest["skipped_sequences"]],
                          already_complete=True)
        summary.elapsed = time.perf_counter() - started
        return summary
    seq_len = config.seq_len or window_length(sequences)
    classes = class_list([s.action for s in sequences])
    spec = FrameSpec(config.modality, config.image_size, config.depth_range)
    summary = Summary(config.dest, classes, seq_len, {}, "", skipped=list(bad))
    cache_path, slots, usable = _decode(config, sequences, spec, token, summary, progress)
    splits, summary.eval_source = split_sequences(usable, config.eval_subjects, config.seed)
    print_fn(f"eval split: {summary.eval_source}")
    plans = {split: plan_split(split, splits[split], seq_len, len(classes), config.seed)
             for split in SPLITS}
    shards = _write_shards(config, plans, classes, cache_path, slots, spec, seq_len, summary, progress)
    for split, windows in plans.items():
        summary.class_counts[split] = class_counts(windows, classes)
        index = [{"key": w.key, "path": w.seq.path, "start": w.start, "stop": w.stop, "class": w.label}
                 for w in windows]
        storage.write_json(storage.join(config.dest, split, "index.json"), index)
    manifest = {
        "format": FORMAT,
        "classes": classes,
        "seq_len": seq_len,
        "image_size": config.image_size,
        "modality": config.modality,
        "channels": list(spec.channels),
        "clip_layout": "uint8 (T, H, W, C)",
        "eval_source": summary.eval_source,
        "eval_subjects": sorted({s.subject for s in splits["eval"]}),
        "splits": {split: split_entry(shards[split], summary.class_counts[split]) for split in SPLITS},
        "skipped_sequences": [asdict(b) for b in summary.skipped],
        "source": {"sequences": len(usable), "frames": summary.frames},
        "settings": {k: v for k, v in output_settings(config).items() if k not in ("src", "dest")},
        "fingerprint": token,
    }
    storage.write_json(storage.join(config.dest, MANIFEST), manifest)
    storage.remove(storage.join(config.dest, STATE))
    storage.local_scratch(_cache_dir(config))
    summary.elapsed = time.perf_counter() - started
    return summary


def format_summary(summary: Summary) -> str:
    """The closing table: windows per split and class, frames/s, elapsed time."""
    splits = [s for s in SPLITS if s in summary.class_counts]
    width = max(len(c) for c in summary.classes)
    lines = [f"{'class':<{width}} " + " ".join(f"{s:>8}" for s in splits)]
    for name in summary.classes:
        lines.append(f"{name:<{width}} " + " ".join(f"{summary.class_counts[s][name]:>8}" for s in splits))
    lines.append(f"{'total':<{width}} " + " ".join(f"{sum(summary.class_counts[s].values()):>8}" for s in splits))
    if summary.already_complete:
        lines.append(f"{summary.dest} was already complete (manifest present); nothing to do")
    else:
        rate = summary.decoded / summary.decode_seconds if summary.decode_seconds else 0.0
        lines.append(f"window length {summary.seq_len}; eval split: {summary.eval_source}")
        lines.append(f"frames: {summary.frames} in the dataset, {summary.decoded} decoded in this run "
                     f"({rate:.0f} frames/s); shards: {summary.shards_written} written, "
                     f"{summary.shards_reused} kept from an earlier run")
        lines.append(f"elapsed {summary.elapsed:.1f} s; output: {summary.dest}")
    if summary.skipped:
        lines.append(f"skipped {len(summary.skipped)} broken sequences:")
        lines += [f"  {b.message()}" for b in summary.skipped]
    return "\n".join(lines)
