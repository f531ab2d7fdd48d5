"""A run's records: the JSON-lines ``log.jsonl`` (one object per line) and the ``loss.png`` drawn from it.

Training records hold ``step``, ``epoch``, ``loss`` and its parts, ``lr``, ``images_per_s`` (and ``grad_norm``);
evaluation records hold ``step`` and ``eval`` (the metrics); a DDP run ends with a ``replicas`` record.

Example:
    >>> log = RunLog(Path("log.jsonl"), resume_step=None)
    >>> log.write({"step": 1, "loss": 2.0})
    >>> log.write({"step": 2, "loss": 1.5})
    >>> [record["loss"] for record in read_log("log.jsonl")]
    [2.0, 1.5]
    >>> _ = RunLog(Path("log.jsonl"), resume_step=1)  # resuming at step 1 drops the later records
    >>> read_log("log.jsonl")
    [{'step': 1, 'loss': 2.0}]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..checks import check_float
from ..weights.io import atomic_write

__all__ = ["LOG_FILE", "LOSS_PNG", "RunLog", "read_log", "smoothed", "loss_figure", "plot_loss_curve"]

LOG_FILE = "log.jsonl"
LOSS_PNG = "loss.png"
_COLOURS = ("tab:orange", "tab:green", "tab:red", "tab:purple")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` (none if the file does not exist; a torn last line from a crash is skipped)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class RunLog:
    """Rank 0's JSON-lines log. ``resume_step=None`` starts it empty; a step keeps the records up to that step, so
    a resumed run's file reads as one run."""

    def __init__(self, path: Path, *, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_log(path) if r.get("step", 0) <= resume_step]
            atomic_write(path, lambda temp: temp.write_text("".join(json.dumps(r) + "\n" for r in kept)))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a JSON object on one line)."""
        with self.path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")


def smoothed(values: Sequence[float], *, decay: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (Adam's correction): the average of the first ``t`` values,
    weighted ``decay ** age``, so the curve starts at the first value and a constant series stays constant.

    Example:
        >>> [round(v, 4) for v in smoothed([2.0, 1.0, 1.0])]
        [2.0, 1.4737, 1.2989]
        >>> smoothed([3.0, 3.0, 3.0])
        [3.0, 3.0, 3.0]
    """
    check_float("decay", decay, minimum=0.0, maximum=1.0)
    if decay == 1.0:  # the average would never move from its start
        raise ValueError("decay must be a finite number in [0, 1), got 1.0")
    smooth: list[float] = []
    average, weight = 0.0, 0.0
    for value in values:
        weight = decay * weight + (1 - decay)  # 1 - decay**t, the bias correction: the weight values have filled
        # Written as a step towards each value, the average of a constant series is that constant, to the bit.
        average += (1 - decay) / weight * (value - average)
        smooth.append(average)
    return smooth


def loss_figure(records: Sequence[dict[str, Any]], *, metrics: Sequence[str] = ()) -> Figure:
    """The figure :func:`plot_loss_curve` writes: training loss per step (raw and :func:`smoothed`) and, on a second
    axis, each of ``metrics`` at every evaluation that logged it; the legend sits below the axes, off the data.

    Example:
        >>> figure = loss_figure([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
        >>> [text.get_text() for text in figure.legends[0].get_texts()]
        ['loss', 'loss (smoothed)']
    """
    train = [r for r in records if "loss" in r]
    # No pyplot: the user's backend and global figure list stay untouched. Constrained layout keeps room for the
    # legend outside the axes.
    fig = Figure(figsize=(7, 4.5), dpi=110, layout="constrained")
    ax = fig.subplots()
    if train:
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
        ax.plot(steps, smoothed(losses), color="tab:blue", linewidth=2, label="loss (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    curves = [(m, [r for r in records if m in r.get("eval", {})]) for m in metrics]
    curves = [(m, evals) for m, evals in curves if evals]
    if curves:
        twin = ax.twinx()
        for (metric, evals), colour in zip(curves, _COLOURS):
            steps = [r["step"] for r in evals]
            twin.plot(steps, [r["eval"][metric] for r in evals], "o-", color=colour, label=f"val {metric}")
        twin.set_ylabel("validation metric")
        twin.set_ylim(0, 1)
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 4), frameon=False)
    return fig


def plot_loss_curve(records: list[dict[str, Any]], path: str | Path, *, metrics: Sequence[str] = ()) -> None:
    """Write :func:`loss_figure` of ``records`` as a PNG at ``path``, atomically."""
    fig = loss_figure(records, metrics=metrics)
    atomic_write(path, lambda temp: fig.savefig(temp, format="png"))
