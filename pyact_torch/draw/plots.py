"""Matplotlib without a display, and the detection timeline (truth vs prediction bands)."""

from __future__ import annotations

import io
import math
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display on TPU VMs or in containers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure: Any) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot().close(figure)
    return buffer.getvalue()


# One colour per class, chosen greedily to be as far apart as possible in CIELAB from each other,
# from the blank band (0.93 grey) and from black and white text (every pair > 37 delta E); after
# 20 classes they repeat.
CLASS_COLOURS = (
    "#5d00ff",
    "#00e800",
    "#ff0000",
    "#d1008b",
    "#e8b900",
    "#008bff",
    "#00742e",
    "#8b4617",
    "#00e8d1",
    "#a274a2",
    "#ff17ff",
    "#742eb9",
    "#2eb9e8",
    "#b9d174",
    "#ff5d74",
    "#ffb98b",
    "#e87400",
    "#ff8bff",
    "#00e88b",
    "#a2d100",
)
BLANK = "0.93"  # the band where nothing (or the background class) is


def class_colours(classes: list[str], background: str) -> dict[str, str]:
    """The colour of each class but the background (which is left blank)."""
    return {name: CLASS_COLOURS[i % len(CLASS_COLOURS)] for i, name in enumerate(c for c in classes if c != background)}


def timeline_png(
    rows: list[tuple[str, int, list[tuple[str, int, int]] | None, list[tuple[str, int, int]]]],
    classes: list[str],
    background: str,
) -> bytes:
    """``timeline_figure`` as PNG."""
    return figure_png(timeline_figure(rows, classes, background))


def timeline_figure(
    rows: list[tuple[str, int, list[tuple[str, int, int]] | None, list[tuple[str, int, int]]]],
    classes: list[str],
    background: str,
) -> Any:
    """One row per sequence ``(name, frames, truth spans or None, predicted spans)``: the truth
    band above the prediction band, one colour per class and its name on every span wide enough
    to hold it, background left blank; stacked for a split (readable at 50 rows: each row keeps
    its height and the figure grows)."""
    plt = pyplot()
    colour = class_colours(classes, background)
    longest = max((frames for _, frames, _, _ in rows), default=1)
    width = 12.0
    figure, axis = plt.subplots(figsize=(width, 1.4 + 0.42 * len(rows)), dpi=100)
    used: set[str] = set()
    for i, (_name, frames, truth, predicted) in enumerate(rows):
        top = len(rows) - 1 - i
        axis.add_patch(plt.Rectangle((0, top + 0.08), frames, 0.84, color=BLANK, lw=0))
        for spans, y in ((truth or [], top + 0.52), (predicted, top + 0.12)):
            by_label: dict[str, list[tuple[int, int]]] = {}
            for label, first, last in spans:
                if label != background:
                    by_label.setdefault(label, []).append((first, last - first + 1))
            for label, bars in by_label.items():  # one artist per class and band: fast for many segments
                axis.broken_barh(bars, (y, 0.36), color=colour.get(label, "0.3"))
                used.add(label)
            free_from = -math.inf  # names never overlap: at most a band's width of them, whatever the spans
            for first, length, label in sorted((f, n, label) for label, bars in by_label.items() for f, n in bars):
                wide = 0.055 * len(label) / (width * 0.8) * longest  # ~0.055 inch a character at fontsize 5
                centre = first + length / 2
                if length >= wide and centre - wide / 2 >= free_from:
                    free_from = centre + wide / 2
                    axis.text(
                        centre,
                        y + 0.18,
                        label,
                        fontsize=5,
                        ha="center",
                        va="center",
                        color="white" if _dark(colour.get(label, "0.3")) else "black",
                        clip_on=True,
                    )
        if truth is None:
            axis.text(2, top + 0.69, "no labels", fontsize=6, va="center", color="0.4")
    axis.set_xlim(0, longest)
    axis.set_ylim(0, len(rows))
    axis.set_yticks([len(rows) - 1 - i + 0.5 for i in range(len(rows))], [row[0] for row in rows], fontsize=7)
    axis.set_xlabel("frame (upper band: truth, lower band: prediction)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour.get(c, "0.3")) for c in classes if c in used]
    if handles:
        axis.legend(
            handles,
            [c for c in classes if c in used],
            ncol=min(6, len(handles)),
            fontsize=7,
            loc="lower left",
            bbox_to_anchor=(0, 1.0),
            frameon=False,
        )
    figure.tight_layout()
    return figure


def _dark(colour: str) -> bool:
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(colour)
    return 0.299 * r + 0.587 * g + 0.114 * b < 0.5
