"""Label files, the class list, and finding the labelled sequences of a raw dataset.

A sequence is ``<Split>/<subject>/<action>/`` (frames ``color_<i>.png``, ``depth_<i>.png``,
``confi_<i>.png``) next to its label file ``<Split>/<subject>/<action>.xml``, an OpenCV
FileStorage document. Every element named ``_`` with children ``pos`` and ``len`` is one
action segment; a child ``label``, ``name``, ``class``, ``action`` or ``gesture`` names the
segment's own action (without one, the sequence folder's action). Everything else in the file
is ignored.

``TestDetection/`` holds long sequences of several actions, named for their recording
(``TestDetection/connie/``, with ``TestDetection/connie.xml``), directly or one level down
(``TestDetection/<subject>/<recording>/``): whichever holds the frames. Their segments must
name their actions.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

from ..config import CLASS_NAME
from ..errors import UserError

NO_ACTION = "no-action"

#: The 16 actions of the real dataset (for reference and for the synthetic dataset; the class
#: list of a preprocessed dataset comes from the folders actually found).
ACTIONS = (
    "asl-bathroom",
    "asl-blue",
    "asl-green",
    "asl-j",
    "asl-milk",
    "asl-scissors",
    "asl-where",
    "asl-yellow",
    "asl-you",
    "asl-z",
    "ui-circle",
    "ui-click",
    "ui-doubleclick",
    "ui-keyTap",
    "ui-screenTap",
    "ui-swipe",
)

#: The only class order pyACT ever wrote down (its score.py); converters of pyACT files use it by
#: default (a pyACT model's real order is whatever its own preprocessing listed, hence --classes).
PYACT_CLASSES = (
    "ui-screenTap",
    "asl-you",
    "asl-blue",
    "ui-doubleclick",
    "asl-j",
    "asl-green",
    "asl-z",
    "ui-keyTap",
    "asl-scissors",
    "asl-bathroom",
    "ui-swipe",
    "asl-where",
    "asl-yellow",
    "ui-click",
    "asl-milk",
    "ui-circle",
    NO_ACTION,
)

SPLIT_DIRS = ("Train", "Eval", "Test")
DETECTION_DIR = "TestDetection"
ACTION_TAGS = ("label", "name", "class", "action", "gesture")  # a segment's own action, first found wins
_FRAME = re.compile(r"^(color|depth|confi)_(\d+)\.png$")


@dataclass(frozen=True)
class Segment:
    """Frames ``pos .. pos+len-1`` show the action: its own (``action``, from the label
    file), or else its sequence folder's."""

    pos: int
    len: int
    action: str | None = None

    def __contains__(self, frame: int) -> bool:
        return self.pos <= frame < self.pos + self.len


@dataclass(frozen=True)
class Sequence:
    """One labelled recording: ``<split_dir>/<subject>/<action>`` under the dataset root."""

    split_dir: str
    subject: str
    action: str
    n_frames: int
    segments: tuple[Segment, ...]

    @property
    def path(self) -> str:
        """The folder relative to the dataset root, as on disk (``Train/LN/asl-z``)."""
        return f"{self.split_dir}/{self.subject}/{self.action}"

    def action_of(self, segment: Segment) -> str:
        """A segment's action: its own, else this sequence's."""
        return segment.action or self.action


@dataclass(frozen=True)
class Recording:
    """One long sequence of ``TestDetection/`` whose segments name their actions."""

    path: str  # relative to the dataset root: TestDetection/<name> or TestDetection/<subject>/<name>
    n_frames: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class BadSequence:
    """A sequence that cannot be used, with the file at fault and why."""

    path: str
    file: str
    reason: str

    def message(self) -> str:
        return f"{self.file}: {self.reason}"


class LabelFileError(ValueError):
    """A label file that does not parse or has a malformed segment."""


def class_list(actions: set[str] | list[str] | tuple[str, ...]) -> list[str]:
    """The fixed class order: actions sorted by name, then ``no-action`` last."""
    return sorted(set(actions)) + [NO_ACTION]


LABEL_FILE_LIMIT = 1 << 20  # bytes: a real label file is well under 1 KB


def parse_label_file(path: str) -> tuple[Segment, ...]:
    """The action segments of one label file, in file order."""
    try:
        if os.path.getsize(path) > LABEL_FILE_LIMIT:
            raise LabelFileError(f"larger than {LABEL_FILE_LIMIT} bytes: not a label file")
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        raise LabelFileError(f"not a valid XML label file ({exc})") from None
    except OSError as exc:
        raise LabelFileError(f"cannot read ({exc.strerror})") from None
    segments = []
    for element in root.iter("_"):
        pos, length = element.find("pos"), element.find("len")
        if pos is None and length is None:
            continue  # some other list item, not a segment
        values = []
        for name, child in (("pos", pos), ("len", length)):
            text = None if child is None else (child.text or "").strip()
            if text is None:
                raise LabelFileError(f"segment without <{name}>")
            try:
                values.append(int(text))
            except ValueError:
                raise LabelFileError(f"segment <{name}> is not an integer: {text!r}") from None
        if values[0] < 0 or values[1] < 1:
            raise LabelFileError(f"segment pos={values[0]} len={values[1]} is not a valid range")
        segments.append(Segment(values[0], values[1], action=_segment_action(element, values)))
    return tuple(segments)


def _segment_action(element: ElementTree.Element, where: list[int]) -> str | None:
    """The action a segment names in a child ``label``/``name``/``class``/``action``/
    ``gesture`` (OpenCV writes strings in double quotes), checked to be a class name."""
    for tag in ACTION_TAGS:
        child = element.find(tag)
        if child is None:
            continue
        text = (child.text or "").strip().strip('"').strip()
        if not CLASS_NAME.fullmatch(text) or text == NO_ACTION:
            raise LabelFileError(
                f"segment pos={where[0]} len={where[1]}: <{tag}> {text[:60]!r} is not an action "
                f"name (letters, digits and '_.+-', not {NO_ACTION!r})"
            )
        return text
    return None


def frame_indices(folder: str) -> dict[str, set[int]]:
    """``{"color": {0, 1, ...}, "depth": ..., "confi": ...}`` for one sequence folder."""
    found: dict[str, set[int]] = {"color": set(), "depth": set(), "confi": set()}
    with os.scandir(folder) as entries:
        for entry in entries:
            match = _FRAME.match(entry.name)
            if match and entry.is_file():  # a FIFO or folder named like a frame is no frame
                found[match.group(1)].add(int(match.group(2)))
    return found


def needed_kinds(modality: str) -> tuple[str, ...]:
    """Frame files a modality reads."""
    return {"color": ("color",), "depth": ("depth",), "rgbd": ("color", "depth")}[modality]


def _frames_of(rel: str, folder: str, modality: str) -> tuple[int, BadSequence | None]:
    """A sequence folder's frame count, and what is wrong with its frames: none at all, or a
    frame the modality reads missing."""
    indices = frame_indices(folder)
    n_frames = len(indices["color"])
    if n_frames == 0:
        return 0, BadSequence(rel, folder, "no color_<i>.png frames")
    for kind in ("color",) + needed_kinds(modality):
        missing = sorted(set(range(n_frames)) - indices[kind])
        if missing:
            name = os.path.join(folder, f"{kind}_{missing[0]}.png")
            return n_frames, BadSequence(rel, name, f"frame missing (the sequence has {n_frames} color frames)")
    return n_frames, None


def _check_sequence(src: str, split_dir: str, subject: str, action: str, modality: str) -> Sequence | BadSequence:
    rel = f"{split_dir}/{subject}/{action}"
    folder = os.path.join(src, rel)
    label_file = folder + ".xml"
    if action == NO_ACTION or not CLASS_NAME.fullmatch(action):  # a class name: printed, drawn, a key
        why = (
            f"'{NO_ACTION}' is the class of frames outside every segment, not an action"
            if action == NO_ACTION
            else "not a class name (letters, digits and '_.+-', starting with a letter or digit)"
        )
        return BadSequence(
            rel, folder, f"the action folder's name {action[:60]!r} is {why}; rename the folder and its label file"
        )
    if not os.path.isfile(label_file):
        return BadSequence(rel, label_file, "label file missing for this sequence folder")
    if not os.path.isdir(folder):
        return BadSequence(rel, label_file, f"label file without its sequence folder {folder}")
    try:
        segments = parse_label_file(label_file)
    except LabelFileError as exc:
        return BadSequence(rel, label_file, str(exc))
    n_frames, broken = _frames_of(rel, folder, modality)
    if broken is not None:
        return broken
    for segment in segments:
        if segment.pos + segment.len > n_frames:
            return BadSequence(
                rel,
                label_file,
                f"segment pos={segment.pos} len={segment.len} ends beyond the last frame ({n_frames - 1})",
            )
    return Sequence(split_dir, subject, action, n_frames, segments)


def scan_dataset(src: str, modality: str = "color") -> tuple[list[Sequence], list[BadSequence]]:
    """All sequences under ``src`` (sorted by path) and the broken ones, checked for the
    layout, label files and frame files (but not frame contents)."""
    if not os.path.isdir(src):
        raise UserError(f"{src}: dataset folder not found")
    for required in ("Train", "Test"):
        if not os.path.isdir(os.path.join(src, required)):
            raise UserError(f"{os.path.join(src, required)}: missing; a dataset needs Train/ and Test/")
    good: list[Sequence] = []
    bad: list[BadSequence] = []
    for split_dir in SPLIT_DIRS:
        split_root = os.path.join(src, split_dir)
        if not os.path.isdir(split_root):
            continue
        for subject in sorted(os.listdir(split_root)):
            subject_dir = os.path.join(split_root, subject)
            if not os.path.isdir(subject_dir) or subject.startswith("."):
                continue
            names = set()
            for entry in os.listdir(subject_dir):
                if entry.startswith("."):
                    continue
                if entry.endswith(".xml"):
                    names.add(entry[:-4])
                elif os.path.isdir(os.path.join(subject_dir, entry)):
                    names.add(entry)
            for action in sorted(names):
                result = _check_sequence(src, split_dir, subject, action, modality)
                if isinstance(result, Sequence):
                    good.append(result)
                else:
                    bad.append(result)
    return good, bad


def _frame_folder(folder: str) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(_FRAME.match(entry.name) for entry in entries)
    except OSError:
        return False


def scan_detection(
    src: str, modality: str = "color", labelled: bool = True
) -> tuple[list[Recording], list[BadSequence]]:
    """The long sequences of ``src/TestDetection`` (sorted by path) and the broken ones. A
    folder holding frames is a recording; one holding none is a subject whose subfolders are
    (one level down, no deeper). Every segment must name its action; without ``labelled`` the
    label files are not read (a segment list replaces them)."""
    root = os.path.join(src, DETECTION_DIR)
    if not os.path.isdir(root):
        raise UserError(f"{root}: missing; the dataset has no {DETECTION_DIR}/ split")
    folders: list[str] = []
    good: list[Recording] = []
    bad: list[BadSequence] = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        if _frame_folder(folder):
            folders.append(f"{DETECTION_DIR}/{name}")
            continue
        try:
            inners = sorted(os.listdir(folder))
        except OSError as exc:
            bad.append(BadSequence(f"{DETECTION_DIR}/{name}", folder, f"cannot be listed ({exc.strerror})"))
            continue
        folders += [
            f"{DETECTION_DIR}/{name}/{inner}"
            for inner in inners
            if not inner.startswith(".") and os.path.isdir(os.path.join(folder, inner))
        ]
    for rel in folders:
        folder = os.path.join(src, rel)
        label_file = folder + ".xml"
        n_frames, broken = _frames_of(rel, folder, modality)
        if broken is not None:
            bad.append(broken)
            continue
        if not labelled:
            good.append(Recording(rel, n_frames, ()))
            continue
        if not os.path.isfile(label_file):
            bad.append(BadSequence(rel, label_file, "label file missing for this sequence folder"))
            continue
        try:
            segments = parse_label_file(label_file)
        except LabelFileError as exc:
            bad.append(BadSequence(rel, label_file, str(exc)))
            continue
        problem = next(
            (
                f"segment pos={g.pos} len={g.len} names no action (give each <_> a child "
                f"{', '.join('<' + t + '>' for t in ACTION_TAGS)})"
                for g in segments
                if g.action is None
            ),
            None,
        )
        problem = problem or next(
            (
                f"segment pos={g.pos} len={g.len} ends beyond the last frame ({n_frames - 1})"
                for g in segments
                if g.pos + g.len > n_frames
            ),
            None,
        )
        if problem:
            bad.append(BadSequence(rel, label_file, problem))
        else:
            good.append(Recording(rel, n_frames, segments))
    return good, bad
