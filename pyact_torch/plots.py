"""Matplotlib without a display, and the detection timeline (truth vs prediction bands)."""

from __future__ import annotations

import io
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


def timeline_png(rows: list[tuple[str, int, list[tuple[str, int, int]] | None, list[tuple[str, int, int]]]],
                 classes: list[str], background: str) -> bytes:
    """One row per sequence ``(name, frames, truth spans or None, predicted spans)``: the truth
    band above the prediction band, one colour per class, background left blank; stacked for a
    split (readable at 50 rows: each row keeps its height and the figure grows)."""
    plt = pyplot()
    colours = plt.get_cmap("tab20")
    colour = {name: colours(i % 20) for i, name in enumerate(c for c in classes if c != background)}
    longest = max((frames for _, frames, _, _ in rows), default=1)
    figure, axis = plt.subplots(figsize=(12, 1.4 + 0.42 * len(rows)), dpi=100)
    used: set[str] = set()
    for i, (name, frames, truth, predicted) in enumerate(rows):
        top = len(rows) - 1 - i
        axis.add_patch(plt.Rectangle((0, top + 0.08), frames, 0.84, color="0.93", lw=0))
        for spans, y in ((truth or [], top + 0.52), (predicted, top + 0.12)):
            by_label: dict[str, list[tuple[int, int]]] = {}
            for label, first, last in spans:
                if label != background:
                    by_label.setdefault(label, []).append((first, last - first + 1))
            for label, bars in by_label.items():  # one artist per class and band: fast for many segments
                axis.broken_barh(bars, (y, 0.36), color=colour.get(label, "0.3"))
                used.add(label)
        if truth is None:
            axis.text(2, top + 0.69, "no labels", fontsize=6, va="center", color="0.4")
    axis.set_xlim(0, longest)
    axis.set_ylim(0, len(rows))
    axis.set_yticks([len(rows) - 1 - i + 0.5 for i in range(len(rows))], [row[0] for row in rows], fontsize=7)
    axis.set_xlabel("frame (upper band: truth, lower band: prediction)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour.get(c, "0.3")) for c in classes if c in used]
    if handles:
        axis.legend(handles, [c for c in classes if c in used], ncol=min(6, len(handles)), fontsize=7,
                    loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    figure.tight_layout()
    return figure_png(figure)
