"""What the master replica shows and records of a run: the progress bar and log lines on screen,
``metrics.jsonl``, ``loss.png`` and TensorBoard's event file in the run directory, and the
closing lines. Epochs are counted from 1 everywhere a person reads them."""

from __future__ import annotations

import json
import sys
import time

import torch
from tqdm import tqdm

from ..io import storage
from .events import event_file, event_file_name
from ..draw.plots import figure_png, pyplot
from ..io.resources import duration


class RunLog:
    """The master's record of a run (every method does nothing on other replicas).

    ``rows`` is the run's metrics list (restored with a checkpoint); ``steps`` the batches of
    every epoch. On a terminal each epoch has a progress bar (windows, windows/s, the epoch's
    ETA); elsewhere only lines are printed. A loss line is printed every ``log_every`` steps
    and at the last step of every epoch."""

    def __init__(
        self, run_dir: str, rows: list[dict], steps: list[int], global_batch: int, master: bool, bar: bool | None = None
    ):
        self.run_dir, self.rows, self.steps, self.global_batch, self.master = run_dir, rows, steps, global_batch, master
        self.show_bar = sys.stderr.isatty() if bar is None else bar
        self.bar: tqdm | None = None
        self.started = time.time()
        self.last_time = time.perf_counter()
        self.last_step: int | None = None
        self.step_seconds = 0.0  # per step, over the latest log interval

    @property
    def epochs(self) -> int:
        return len(self.steps)

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def note(self, line: str) -> None:
        """A line from the training loop (under the bar on a terminal)."""
        if self.master:
            self._print(line)

    def warn(self, line: str) -> None:
        """A warning from any replica, on stderr (under the bar on a terminal)."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def epoch_start(self, epoch: int, done: int, step: int) -> None:
        """Epoch ``epoch`` (0-based) begins, ``done`` of its batches already trained (a resume)."""
        if not self.master:
            return
        self.last_time, self.last_step = time.perf_counter(), step  # a rate without the validation
        if self.show_bar:
            self.bar = tqdm(
                total=self.steps[epoch] * self.global_batch,
                initial=done * self.global_batch,
                unit="window",
                desc=f"epoch {epoch + 1}/{self.epochs}",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def advance(self) -> None:
        """One step dispatched (on XLA it may still be running: the bar counts what is queued)."""
        if self.bar is not None:
            self.bar.update(self.global_batch)

    def step(self, loss: torch.Tensor, step: int, epoch: int, lr: float) -> None:
        """A loss line; called as an XLA step closure, when the loss has been computed."""
        if not self.master:
            return
        now = time.perf_counter()
        if self.last_step is not None and step > self.last_step:
            self.step_seconds = (now - self.last_time) / (step - self.last_step)
        rate = self.global_batch / max(self.step_seconds, 1e-9)
        self.last_time, self.last_step = now, step
        row = {
            "kind": "train",
            "step": step,
            "epoch": epoch + 1,
            "loss": round(float(loss.cpu()), 6),
            "lr": lr,
            "windows_per_s": round(rate, 1),
            "time": round(time.time(), 3),
        }
        self.rows.append(row)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        self._print(
            f"step {step:>7}  epoch {epoch + 1}/{self.epochs}  loss {row['loss']:.4f}  lr {lr:.3g}  "
            f"{rate:8.1f} windows/s"
        )

    def epoch_end(self, epoch: int, step: int, result: dict | None) -> None:
        """Epoch ``epoch`` (0-based) is trained and validated: its line, with the run's ETA."""
        if not self.master:
            return
        self.stop()
        line = f"epoch {epoch + 1}/{self.epochs} done at step {step}"
        if result is not None:
            row = {
                "kind": "eval",
                "step": step,
                "epoch": epoch + 1,
                "loss": round(result["loss"], 6),
                "accuracy": round(result["accuracy"], 6),
                "windows": result["windows"],
                "time": round(time.time(), 3),
            }
            self.rows.append(row)
            line += f": eval loss {row['loss']:.4f}  accuracy {row['accuracy']:.4f} ({row['windows']} windows)"
        left = sum(self.steps[epoch + 1 :])
        if left and self.step_seconds:
            # the latest steps' pace (after XLA's compilation) and this epoch's validation, per epoch left
            validation = time.perf_counter() - self.last_time
            line += f"; about {duration(self.step_seconds * left + validation * (self.epochs - epoch - 1))} left"
        self._print(line)
        self.flush()

    def stop(self) -> None:
        """Take the bar down (training stopped inside an epoch)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def flush(self) -> None:
        """Publish metrics.jsonl, loss.png and the TensorBoard event file, each whole."""
        if not self.master:
            return
        lines = "".join(json.dumps(row) + "\n" for row in self.rows)
        storage.write_bytes(storage.join(self.run_dir, "metrics.jsonl"), lines.encode())
        storage.write_bytes(storage.join(self.run_dir, "loss.png"), loss_plot(self.rows))
        storage.write_bytes(
            storage.join(self.run_dir, event_file_name(self.started)), event_file(self.rows, self.started)
        )

    def closing(self, step: int, epochs: int, final: str, best: dict | None, extra: str = "") -> None:
        """The last lines: the final and best weights, the plot and how to open TensorBoard.
        ``epochs``: those the run has trained (more than --epochs when a finished run is rerun lower)."""
        if not self.master:
            return
        self.stop()
        print(
            f"training finished at step {step} after {epochs} epoch{'s' if epochs != 1 else ''}; "
            f"final weights: {final}{extra}"
        )
        if best is not None:
            accuracy = [r["accuracy"] for r in self.rows if r["kind"] == "eval" and r["step"] == best["step"]]
            print(
                f"best checkpoint (lowest eval loss): {storage.join(self.run_dir, best['name'])}, epoch "
                f"{best['epoch']}"
                + (f", eval accuracy {accuracy[-1]:.4f}" if accuracy else "")
                + f" (named by {storage.join(self.run_dir, 'best.json')})"
            )
        print(
            f"loss and accuracy plot: {storage.join(self.run_dir, 'loss.png')}; "
            f"TensorBoard: tensorboard --logdir {self.run_dir}",
            flush=True,
        )


def loss_plot(rows: list[dict]) -> bytes:
    """pyACT's loss history plot (training loss per logged step, eval loss per epoch) with the
    eval accuracy on a second axis and each epoch's end marked, as PNG."""
    figure, axis = pyplot().subplots(figsize=(8, 4.5), dpi=100)
    train = [(m["step"], m["loss"]) for m in rows if m["kind"] == "train"]
    evals = [m for m in rows if m["kind"] == "eval"]
    handles = []
    if train:
        handles += axis.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        handles += axis.plot([m["step"] for m in evals], [m["loss"] for m in evals], "o-", label="eval loss")
        accuracy = axis.twinx()
        handles += accuracy.plot(
            [m["step"] for m in evals], [m["accuracy"] for m in evals], "s--", color="tab:green", label="eval accuracy"
        )
        accuracy.set_ylim(0, 1.02)
        accuracy.set_ylabel("eval accuracy")
        every = max(1, len(evals) // 12)  # a label on at most about a dozen of them
        for i, m in enumerate(evals):
            axis.axvline(m["step"], color="0.8", linewidth=0.8, zorder=0)
            if (i + 1) % every == 0 or i == 0:
                axis.annotate(
                    f"epoch {m['epoch']}",
                    (m["step"], 1),
                    xycoords=("data", "axes fraction"),
                    fontsize=7,
                    rotation=90,
                    ha="right",
                    va="top",
                    color="0.45",
                )
    axis.set_xlabel("step (grey lines: epoch ends)")
    axis.set_ylabel("cross-entropy")
    axis.set_title("loss and accuracy history")
    if handles:
        axis.legend(handles, [h.get_label() for h in handles], loc="center right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure_png(figure)
