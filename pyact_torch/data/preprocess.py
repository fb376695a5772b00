"""The preprocessing run: raw dataset -> frame cache -> shards -> index files -> manifest.

Resumable at any point: decoded chunks are logged in the local frame cache with a CRC of what
was written and a signature of their source frames, finished shards exist under their final
names (written atomically) and are logged with their sha256, and the manifest is written last.
A re-run with the same inputs and settings continues, re-verifying everything it keeps; with
other settings or changed frames it is refused unless ``--overwrite``.

The frame cache is a folder of its own (``DEST/.pyact-cache``, or ``pyact-cache-<tag>`` inside
``--cache-dir`` or the temp dir), marked by a file we write; only our files in it are deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from tqdm import tqdm

from ..io import storage
from ..config import PreprocessConfig, output_settings
from ..errors import UserError
from ..io.locks import LOCK_NAME, Lock
from .frames import DecodeChunk, FrameCache, FrameSpec, decode_into_cache
from .labels import DETECTION_DIR, BadSequence, Sequence, class_list, scan_dataset
from ..io.processes import map_unordered
from ..io.resources import device_of, free_space, human, size_of
from .labels import needed_kinds
from .shards import (
    FORMAT,
    MANIFEST,
    ShardInfo,
    TarFormatError,
    encode_sample,
    hash_shard,
    index_row,
    new_manifest,
    read_manifest,
    sample_meta,
    shard_name,
    split_entry,
    write_shard,
)
from .windows import SPLITS, Window, class_counts, plan_split, split_sequences, window_length

STATE = ".pyact-preprocess.json"  # DEST's settings while a run is unfinished
CHUNK_FRAMES = 64
CACHE_DIR = ".pyact-cache"  # the frame cache inside a local DEST
CACHE_MARK = ".pyact-cache"  # the file that marks a cache folder as ours
CACHE_FILES = ("cache.json", "frames.u8", "decoded.log", "shards.log", CACHE_MARK)
# What preprocessing writes into DEST (and may delete with --overwrite); partial files are
# ".<one of these>.<pid>.partial" beside it.
_OUTPUT = re.compile(r"manifest\.json|\.pyact-preprocess\.json|(?P<s>train|eval|test)/(index\.json|(?P=s)-\d{6}\.tar)")
_PARTIAL = re.compile(r"(?P<dir>(?:train|eval|test)/)?\.(?P<name>[^/]+)\.\d+\.partial")


def _is_output(name: str) -> bool:
    partial = _PARTIAL.fullmatch(name)
    if partial:
        name = (partial["dir"] or "") + partial["name"]
    return _OUTPUT.fullmatch(name) is not None


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


def frame_stats(src: str, sequences: list[Sequence], modality: str) -> dict[str, dict[str, tuple[int, int]]]:
    """``{sequence path: {frame file: (size, mtime_ns)}}`` of the frame files a modality reads:
    what tells a fixed or replaced frame from the one decoded before."""
    kinds = tuple(f"{kind}_" for kind in needed_kinds(modality))
    stats = {}
    for seq in sequences:
        with os.scandir(os.path.join(src, seq.path)) as entries:
            stats[seq.path] = {
                e.name: (st.st_size, st.st_mtime_ns) for e in entries if e.name.startswith(kinds) and (st := e.stat())
            }
    return stats


def fingerprint(config: PreprocessConfig, sequences: list[Sequence], bad: list[BadSequence]) -> str:
    """Hash of everything that determines the output: settings (not paths or worker counts)
    and the dataset's sequences, frame counts and segments."""
    settings = {k: v for k, v in output_settings(config).items() if k not in ("src", "dest")}
    # a segment's own action only where a label file names one: fingerprints of datasets without stay as they were
    listing = [
        (s.path, s.n_frames, [(g.pos, g.len) if g.action is None else (g.pos, g.len, g.action) for g in s.segments])
        for s in sequences
    ]
    payload = json.dumps([FORMAT, settings, listing, [b.path for b in bad]])
    return hashlib.sha256(payload.encode()).hexdigest()


def frames_fingerprint(stats: dict[str, dict[str, tuple[int, int]]]) -> str:
    """Hash of the frame files' sizes and modification times: a frame fixed or replaced since
    changes it (recorded beside ``fingerprint``; outputs of earlier versions lack it)."""
    payload = json.dumps(sorted((path, sorted(files.items())) for path, files in stats.items()))
    return hashlib.sha256(payload.encode()).hexdigest()


def _cache_token(spec: FrameSpec, sequences: list[Sequence]) -> str:
    """What the frame cache's layout and contents depend on (not segments or split settings)."""
    payload = json.dumps(
        [FORMAT, spec.modality, spec.image_size, list(spec.depth_range), [(s.path, s.n_frames) for s in sequences]]
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def check_plan(config: PreprocessConfig, sequences: list[Sequence]) -> int:
    """Everything about the inputs that can be checked before decoding: the window length,
    splits with windows in them, unique sample keys. Returns the window length."""
    seq_len = config.seq_len or window_length(sequences)
    if seq_len < 2:
        raise UserError(
            "the shortest action segment in the label files is 1 frame long; 1-frame windows "
            "cannot be labelled by the half-window rule (L // 2 = 0): give --seq-len 2 or more"
        )
    splits, _ = split_sequences(sequences, config.eval_subjects, config.seed)
    for name in ("train", "test"):
        if not any(seq.n_frames >= seq_len for seq in splits[name]):
            raise UserError(
                f"the {name} split has no sequence of {seq_len} frames or more "
                f"(window length {seq_len}{'' if config.seq_len else ', from the label files'})"
            )
    for name, members in splits.items():
        seen: dict[str, str] = {}
        for seq in members:
            key = Window(seq, 0, 0, "").key.rsplit("/", 1)[0]
            if key in seen:
                raise UserError(
                    f"{os.path.join(config.src, seq.path)} and {os.path.join(config.src, seen[key])} "
                    f"give the same sample keys ({key}/...) in the {name} split; rename one folder"
                )
            seen[key] = seq.path
    return seq_len


def check_space(config: PreprocessConfig, sequences: list[Sequence], seq_len: int) -> None:
    """Refuse before any work when the frame cache and (for a local DEST) the shards would not
    fit on their disks: ``--image-size`` grows both with its square (4096 wrote 46 GB of cache
    in two minutes from 17 MB of frames). What an earlier run left is reused, so it counts as
    space already had. The estimate is an upper bound: one window per frame."""
    if not config.overwrite and storage.exists(storage.join(config.dest, MANIFEST)):
        return  # complete already (nothing to write), or refused by DEST's own check
    height, width, channels = FrameSpec(config.modality, config.image_size, tuple(config.depth_range)).shape
    frame = height * width * channels
    frames = sum(seq.n_frames for seq in sequences)
    windows = sum(max(0, seq.n_frames - seq_len + 1) for seq in sequences)
    cache = _cache_dir(config)
    needs = [
        (cache, frames * frame - size_of(cache), f"the frame cache ({frames} frames of {height}x{width}x{channels})")
    ]
    if not storage.is_gcs(config.dest):
        inside = os.path.abspath(cache).startswith(os.path.abspath(config.dest) + os.sep)
        kept = size_of(config.dest) - (size_of(cache) if inside else 0)
        # a window's frames, its other members and their tar headers and padding
        needs.append((config.dest, windows * (seq_len * frame + 4096) - kept, f"the shards (up to {windows} windows)"))
    by_disk: dict[int, list] = {}
    for path, need, what in needs:
        by_disk.setdefault(device_of(path), []).append((path, max(need, 0), what))
    for entries in by_disk.values():
        need, free = sum(e[1] for e in entries), free_space(entries[0][0])
        if need > free:
            parts = " and ".join(f"{human(e[1])} for {e[2]}" for e in entries)
            raise UserError(
                f"--image-size {config.image_size}: preprocessing needs about {parts}, but the disk of "
                f"{entries[0][0]} has {human(free)} free; lower --image-size or free space"
                f"{'' if config.cache_dir else ' (--cache-dir puts the cache on another disk)'}"
            )


def _prepare_dest(
    config: PreprocessConfig, print_fn: Callable[[str], None], run: dict[str, str], cache: str
) -> dict | None:
    """Check DEST and decide: fresh start, resume, already complete (returns the manifest),
    or refuse. ``run`` is this run's ``fingerprint`` and ``frames_fingerprint``."""
    storage.check_writable(config.dest)
    existing = [name for name in storage.list_files(config.dest) if name != LOCK_NAME]
    if f"{CACHE_DIR}/{CACHE_MARK}" in existing:  # our own cache inside DEST
        existing = [name for name in existing if not name.startswith(CACHE_DIR + "/")]
    ours = [name for name in existing if _is_output(name)]
    foreign = [name for name in existing if not _is_output(name)]
    for name in [n for n in ours if n.endswith(storage.PARTIAL_SUFFIX)]:
        storage.remove(storage.join(config.dest, name))  # left by a killed run
        ours.remove(name)
    previous: dict = {}
    manifest = None
    if MANIFEST in ours:
        manifest = previous = read_manifest(config.dest).document
    elif STATE in ours:
        try:
            previous = storage.read_json(storage.join(config.dest, STATE), 1 << 20)
        except UserError:
            pass
        if not isinstance(previous, dict) or "fingerprint" not in previous:
            previous = _read_info(cache).get("dest") or {}  # damaged: the cache knows which run it served
    state = {**run, "settings": output_settings(config)}
    if (
        previous.get("fingerprint") == run["fingerprint"]
        and previous.get("frames_fingerprint", run["frames_fingerprint"]) == run["frames_fingerprint"]
    ):
        if manifest is not None:
            return manifest
        print_fn(f"resuming the unfinished run in {config.dest}")
        storage.write_json(storage.join(config.dest, STATE), state)
        return None
    if ours or foreign:
        if not config.overwrite:
            what = _difference(previous, output_settings(config)) if previous else "other files"
            raise UserError(
                f"{config.dest}: already holds {what}; use --overwrite to replace it, or choose another DEST"
            )
        for name in ours:
            storage.remove(storage.join(config.dest, name))
        print_fn(f"--overwrite: removed {len(ours)} files of a previous run from {config.dest}")
    storage.write_json(storage.join(config.dest, STATE), state)
    return None


def _difference(previous: dict, settings: dict) -> str:
    """What differs between an earlier run in DEST and this one, in flags."""
    earlier = previous.get("settings")
    if not isinstance(earlier, dict):
        earlier = {}
    flags = [
        f"--{key.replace('_', '-')} {_flag_value(earlier[key])} (this run: {_flag_value(value)})"
        for key, value in settings.items()
        if key not in ("src", "dest") and key in earlier and earlier[key] != value
    ]
    if flags:
        return f"a dataset made with {', '.join(flags)}"
    return "a dataset made from other inputs (other sequences, or frames changed since)"


def _flag_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return (
            ":".join(map(str, value))
            if len(value) == 2 and all(isinstance(v, int) for v in value)
            else ",".join(map(str, value)) or "none"
        )
    return str(value)


def _cache_dir(config: PreprocessConfig) -> str:
    """The frame cache's own folder: never a folder the user named (it is created inside it)."""
    tag = hashlib.sha256(config.dest.encode()).hexdigest()[:16]
    if config.cache_dir:
        return os.path.join(config.cache_dir, f"pyact-cache-{tag}")
    if storage.is_gcs(config.dest):
        return os.path.join(tempfile.gettempdir(), f"pyact-cache-{tag}")
    return os.path.join(config.dest, CACHE_DIR)


def _read_info(cache: str) -> dict:
    """The cache's ``cache.json`` (empty when missing or damaged: the cache is then rebuilt)."""
    try:
        info = storage.read_json(os.path.join(cache, "cache.json"), 1 << 20)
    except (OSError, UserError):
        return {}
    if not isinstance(info, dict):
        return {}
    kinds = {"cache": str, "dest": dict}  # what _open_cache writes; anything else is damage
    return {key: info[key] for key, kind in kinds.items() if isinstance(info.get(key), kind)}


def _open_cache(cache: str, cache_token: str, run: dict[str, str]) -> None:
    """Create or adopt the cache folder; drop what no longer matches the run."""
    marker = os.path.join(cache, CACHE_MARK)
    try:
        if os.path.isdir(cache) and os.listdir(cache) and not os.path.isfile(marker):
            raise UserError(f"{cache}: exists and is not a pyact-torch frame cache; choose another --cache-dir")
        os.makedirs(cache, exist_ok=True)
        info = _read_info(cache)
        stale = []
        if info.get("cache") != cache_token:
            stale += ["frames.u8", "decoded.log"]
        if info.get("dest") != run:
            stale.append("shards.log")
        for name in stale:
            if os.path.exists(os.path.join(cache, name)):
                os.remove(os.path.join(cache, name))
        storage.write_bytes(marker, b"pyact-torch frame cache: deleted when preprocessing finishes\n")
        storage.write_json(os.path.join(cache, "cache.json"), {"cache": cache_token, "dest": run})
    except OSError as exc:
        raise UserError(
            f"{cache}: cannot use as the frame cache ({exc.strerror}); choose another --cache-dir"
        ) from None


def _remove_cache(cache: str) -> None:
    """Delete the cache's files (only ours) and its folder when that leaves it empty."""
    if not os.path.isfile(os.path.join(cache, CACHE_MARK)):
        return
    for name in CACHE_FILES:
        if os.path.exists(os.path.join(cache, name)):
            os.remove(os.path.join(cache, name))
    try:
        os.rmdir(cache)
    except OSError:
        pass  # something else is in it: not ours to delete


def _cache_errors(cache: str) -> contextlib.AbstractContextManager[None]:
    """A full or read-only disk while using the frame cache: one line saying what to do."""
    return storage.write_errors(cache, "free space or choose another --cache-dir, then run again to continue")


def _signature(stats: dict[str, tuple[int, int]], first: int, count: int, spec: FrameSpec) -> str:
    """A short hash of the stats of the frame files a chunk decodes."""
    files = [f"{kind}_{i}.png" for i in range(first, first + count) for kind in needed_kinds(spec.modality)]
    return hashlib.sha256(json.dumps([(f, stats.get(f)) for f in files]).encode()).hexdigest()[:16]


def _decode(
    config: PreprocessConfig,
    sequences: list[Sequence],
    spec: FrameSpec,
    cache: str,
    stats: dict,
    summary: Summary,
    progress: bool,
) -> tuple[str, dict[str, int], list[Sequence]]:
    """Decode every frame once into the cache; returns the cache path, each sequence's first
    cache slot, and the sequences that decoded cleanly. Chunks logged by an earlier run are
    kept only when their source frames are unchanged and the cache still holds what was
    written (CRC)."""
    frames_path, log_path = os.path.join(cache, "frames.u8"), os.path.join(cache, "decoded.log")
    slots, owner, signatures = {}, {}, {}
    chunks: list[DecodeChunk] = []
    total = 0
    for seq in sequences:
        slots[seq.path] = total
        for first in range(0, seq.n_frames, CHUNK_FRAMES):
            count = min(CHUNK_FRAMES, seq.n_frames - first)
            owner[len(chunks)] = seq
            signatures[len(chunks)] = _signature(stats[seq.path], first, count, spec)
            chunks.append(DecodeChunk(len(chunks), os.path.join(config.src, seq.path), first, count, total + first))
        total += seq.n_frames
    summary.frames = total
    with _cache_errors(cache):
        with open(frames_path, "ab") as handle:
            handle.truncate(total * spec.frame_bytes)
        logged, failed = _read_log(log_path)
        current = {c: crc for c, (crc, sig) in logged.items() if sig == signatures[c]}
        done = _verified(current, chunks, frames_path, spec)
    bad_paths = {owner[c].path: message for c, (sig, message) in failed.items() if sig == signatures[c]}
    pending = [c for c in chunks if c.chunk_id not in done and owner[c.chunk_id].path not in bad_paths]
    reused = sum(c.count for c in chunks if c.chunk_id in done)
    started = time.perf_counter()
    with (
        _cache_errors(cache),
        open(log_path, "a") as log,
        tqdm(
            total=total, initial=reused, unit="frame", desc="decode", disable=None if progress else True, smoothing=0.05
        ) as bar,
    ):
        for result in decode_into_cache(pending, frames_path, spec, config.processes):
            summary.decoded += result.decoded
            chunk = chunks[result.chunk_id]
            sig = signatures[chunk.chunk_id]
            if result.error is not None:
                if not config.skip_bad_sequences:
                    raise UserError(str(result.error))
                bad_paths[owner[chunk.chunk_id].path] = str(result.error)
                log.write(f"{chunk.chunk_id}\tbad\t{sig}\t{result.error}\n".replace("\r", " "))
            else:
                log.write(f"{chunk.chunk_id}\tok\t{result.crc}\t{sig}\n")
            log.flush()
            bar.update(chunk.count)
    summary.decode_seconds = time.perf_counter() - started
    for path, message in sorted(bad_paths.items()):
        file, _, reason = message.partition(": ")
        summary.skipped.append(BadSequence(path, file, reason))
    return frames_path, slots, [s for s in sequences if s.path not in bad_paths]


def _verified(done: dict[int, int], chunks: list[DecodeChunk], frames_path: str, spec: FrameSpec) -> set[int]:
    """The logged chunks whose bytes in the cache still have the CRC logged for them."""
    kept = set()
    cache = FrameCache(frames_path, spec)
    try:
        for chunk_id, crc in done.items():
            chunk = chunks[chunk_id]
            try:
                data = cache.read_bytes(chunk.slot, chunk.count)
            except OSError:
                continue
            if zlib.crc32(data) == crc:
                kept.add(chunk_id)
    finally:
        cache.close()
    return kept


def _read_log(path: str) -> tuple[dict[int, tuple[int, str]], dict[int, tuple[str, str]]]:
    """``{chunk: (crc, signature)}`` decoded and ``{chunk: (signature, message)}`` failed."""
    done, failed = {}, {}
    if os.path.exists(path):
        with open(path, errors="replace") as log:
            for line in log:
                parts = line.rstrip("\n").split("\t")
                if not line.endswith("\n") or len(parts) < 4 or not parts[0].isdigit():
                    continue  # a line cut short by a kill: that chunk is decoded again
                chunk = int(parts[0])
                if parts[1] == "ok" and parts[2].isdigit():
                    done[chunk] = (int(parts[2]), parts[3])
                elif parts[1] == "bad":
                    failed[chunk] = (parts[2], parts[3])
    return done, failed


def _read_shard_log(path: str) -> dict[str, ShardInfo]:
    """Shards an earlier run of this output wrote, with what they held then."""
    records = {}
    if os.path.exists(path):
        with open(path, errors="replace") as log:
            for line in log:
                parts = line.rstrip("\n").split("\t")
                if line.endswith("\n") and len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
                    records[parts[0]] = ShardInfo(parts[0], int(parts[1]), int(parts[2]), parts[3])
    return records


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
    samples = (encode_sample(key, cache.read(slot, job.seq_len), cls, meta) for key, slot, cls, meta in job.items)
    return write_shard(job.dest, job.name, samples)


def _window_meta(window: Window) -> dict:
    seq = window.seq
    return sample_meta(seq.path, window.start, window.stop, window.label, seq.subject, seq.action)


def _write_shards(
    config: PreprocessConfig,
    plans: dict[str, list[Window]],
    classes: list[str],
    cache: str,
    slots: dict[str, int],
    spec: FrameSpec,
    seq_len: int,
    summary: Summary,
    progress: bool,
    print_fn: Callable[[str], None],
) -> dict[str, list[ShardInfo]]:
    jobs: list[_ShardJob] = []
    infos: dict[str, ShardInfo] = {}
    existing = set(storage.list_files(config.dest))
    log_path = os.path.join(cache, "shards.log")
    written = _read_shard_log(log_path)
    cache_path = os.path.join(cache, "frames.u8")
    index_of = {name: i for i, name in enumerate(classes)}
    for split, windows in plans.items():
        for number, first in enumerate(range(0, len(windows), config.shard_size)):
            name = shard_name(split, number)
            part = windows[first : first + config.shard_size]
            if name in existing and name in written:
                try:
                    found = hash_shard(config.dest, name)
                except TarFormatError:
                    found = None
                if found == written[name] and found.count == len(part):
                    infos[name] = found
                    summary.shards_reused += 1
                    continue
                print_fn(f"{name} changed since it was written; writing it again")
            items = tuple((w.key, slots[w.seq.path] + w.start, index_of[w.label], _window_meta(w)) for w in part)
            jobs.append(_ShardJob(config.dest, name, cache_path, spec, seq_len, items))
    total = sum(len(w) for w in plans.values())
    done = sum(info.count for info in infos.values())
    with (
        _cache_errors(cache),
        open(log_path, "a") as log,
        tqdm(total=total, initial=done, unit="window", desc="shards", disable=None if progress else True) as bar,
    ):
        for info in map_unordered(_write_shard_job, jobs, config.processes):
            infos[info.name] = info
            log.write(f"{info.name}\t{info.count}\t{info.bytes}\t{info.sha256}\n")
            log.flush()
            bar.update(info.count)
    summary.shards_written = len(jobs)
    for frame_cache in _shard_worker.values():
        frame_cache.close()
    _shard_worker.clear()
    return {
        split: [infos[shard_name(split, n)] for n in range((len(w) + config.shard_size - 1) // config.shard_size)]
        for split, w in plans.items()
    }


def preprocess(config: PreprocessConfig, progress: bool = True, print_fn: Callable[[str], None] = print) -> Summary:
    """Run (or resume) preprocessing; returns the summary."""
    started = time.perf_counter()
    sequences, bad = scan_dataset(config.src, config.modality)
    if bad and not config.skip_bad_sequences:
        more = f" (and {len(bad) - 1} more broken sequences)" if len(bad) > 1 else ""
        raise UserError(bad[0].message() + more)
    if not sequences:
        raise UserError(f"{config.src}: no usable sequences")
    if os.path.isdir(os.path.join(config.src, DETECTION_DIR)):
        print_fn(
            f"note: {DETECTION_DIR}/ is not preprocessed (pyACT did not use it either): score its long "
            f"sequences with pyact detect --src {config.src} --split testdetection"
        )
    seq_len = check_plan(config, sequences)  # before anything is written or decoded
    check_space(config, sequences, seq_len)
    with Lock(config.dest, "preprocess"):  # one run per DEST: a second is refused naming this one
        return _preprocess_locked(config, sequences, bad, seq_len, started, progress, print_fn)


def _preprocess_locked(
    config: PreprocessConfig,
    sequences: list,
    bad: list,
    seq_len: int,
    started: float,
    progress: bool,
    print_fn: Callable[[str], None],
) -> Summary:
    """The run itself, holding DEST's lock."""
    spec = FrameSpec(config.modality, config.image_size, config.depth_range)
    stats = frame_stats(config.src, sequences, config.modality)
    run = {"fingerprint": fingerprint(config, sequences, bad), "frames_fingerprint": frames_fingerprint(stats)}
    cache = _cache_dir(config)
    manifest = _prepare_dest(config, print_fn, run, cache)
    if manifest is not None:
        counts = {split: entry["class_counts"] for split, entry in manifest["splits"].items()}
        summary = Summary(
            config.dest,
            manifest["classes"],
            manifest["seq_len"],
            counts,
            manifest["eval_source"],
            frames=manifest["source"]["frames"],
            skipped=[BadSequence(**b) for b in manifest["skipped_sequences"]],
            already_complete=True,
        )
        summary.elapsed = time.perf_counter() - started
        return summary
    _open_cache(cache, _cache_token(spec, sequences), run)
    classes = class_list({s.action for s in sequences} | {g.action for s in sequences for g in s.segments if g.action})
    summary = Summary(config.dest, classes, seq_len, {}, "", skipped=list(bad))
    _, slots, usable = _decode(config, sequences, spec, cache, stats, summary, progress)
    splits, summary.eval_source = split_sequences(usable, config.eval_subjects, config.seed)
    print_fn(f"eval split: {summary.eval_source}")
    plans = {split: plan_split(split, splits[split], seq_len, len(classes), config.seed) for split in SPLITS}
    shards = _write_shards(config, plans, classes, cache, slots, spec, seq_len, summary, progress, print_fn)
    for split, windows in plans.items():
        summary.class_counts[split] = class_counts(windows, classes)
        index = [index_row(w.key, _window_meta(w)) for w in windows]
        storage.write_json(storage.join(config.dest, split, "index.json"), index)
    manifest = new_manifest(
        classes,
        seq_len,
        config.image_size,
        config.modality,
        eval_source=summary.eval_source,
        eval_subjects=sorted({s.subject for s in splits["eval"]}),
    )
    manifest["splits"] = {split: split_entry(shards[split], summary.class_counts[split]) for split in SPLITS}
    manifest.update(
        {
            "skipped_sequences": [asdict(b) for b in summary.skipped],
            "source": {"sequences": len(usable), "frames": summary.frames},
            "settings": {k: v for k, v in output_settings(config).items() if k not in ("src", "dest")},
            **run,
        }
    )
    storage.write_json(storage.join(config.dest, MANIFEST), manifest)
    storage.remove(storage.join(config.dest, STATE))
    _remove_cache(cache)
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
        lines.append(
            f"frames: {summary.frames} in the dataset, {summary.decoded} decoded in this run "
            f"({rate:.0f} frames/s); shards: {summary.shards_written} written, "
            f"{summary.shards_reused} kept from an earlier run"
        )
        lines.append(f"elapsed {summary.elapsed:.1f} s; output: {summary.dest}")
    if summary.skipped:
        lines.append(f"skipped {len(summary.skipped)} broken sequences:")
        lines += [f"  {b.message()}" for b in summary.skipped]
    return "\n".join(lines)
