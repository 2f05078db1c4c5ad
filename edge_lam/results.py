"""results/<run-id>/: config.json, metrics.jsonl (one line per round), plots/, and, where
the `tensorboard` package is installed, TensorBoard event files of the same curves
(`tensorboard --logdir results` follows runs while they train).

Every file is written whole to a temporary name and renamed into place, so a run stopped at
any moment leaves complete files (the rows of the rounds finished so far)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from edge_lam.config.run_config import RunConfig
from edge_lam.logs import get_logger

log = get_logger()

# metrics a round row carries besides accuracy and loss, when the evaluation gives them
EXTRA_METRICS = ("perplexity", "exact_match")


def atomic_write_text(path: Path, text: str) -> None:
    """`path` holds the old content or the new, never a part of it, also after a power
    cut: the new content is on disk (fsync) before the rename, and the rename is made
    durable (fsync of the folder)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Flush a file's content to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of a folder (a rename into it) durable; a no-op where folders
    cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _event_writer(run_dir: Path):
    """A TensorBoard SummaryWriter on run_dir, or None without the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: no event files (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir=str(run_dir), flush_secs=5)


def _clean(value):
    """JSON-safe: NaN/Inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class RunRecorder:
    """Collects each round's training info and evaluation into metrics.jsonl."""

    def __init__(self, run_dir: Path, cfg: RunConfig, extra: dict | None = None,
                 rows: list[dict] | None = None):
        """`rows`: the rows a resumed run keeps (metrics.jsonl goes on after them)."""
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json",
                          json.dumps({**cfg.to_dict(), **(extra or {})}, indent=2,
                                     sort_keys=True))
        self.metrics_path = run_dir / "metrics.jsonl"
        self.rows: list[dict] = list(rows or [])
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.events = _event_writer(run_dir)
        self._train: dict[int, dict] = {}
        self._t_last = time.perf_counter()

    def record_train(self, server_round: int, info: dict) -> None:
        self._train[server_round] = info

    def record_eval(self, server_round: int, metrics: dict, phase: str = "train",
                    extra: dict | None = None) -> dict:
        """Append the round's row; `phase` is train/unlearn/recover (S4); `extra` adds
        strategy-specific fields (FedKD: `tasks`)."""
        now = time.perf_counter()
        train = self._train.pop(server_round, {})
        row = {
            "round": server_round,
            "phase": phase if server_round > 0 else "initial",
            "accuracy": metrics.get("accuracy"),
            "loss": metrics.get("loss"),
            "wall_s": now - self._t_last,
            "eval_s": metrics.get("eval_s"),
            "aggregation_error": train.get("aggregation_error"),
            "rejected": train.get("rejected", 0),
            "missing": train.get("missing", []),
            "clients": train.get("clients", []),
        }
        for key in ("rejections", "budget_exhausted", "forget_nodes", "unlearning", "fleet",
                    "robust", "contribution", "secure", "central_dp"):
            if train.get(key):
                row[key] = train[key]
        row.update({k: metrics[k] for k in EXTRA_METRICS if k in metrics})
        row.update(extra or {})
        self._t_last = now
        row = _clean(row)
        self.rows.append(row)
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._write_events(row)
        return row

    def _write_events(self, row: dict) -> None:
        if self.events is None:
            return
        step = row["round"]
        scalars = {f"eval/{k}": row.get(k) for k in ("accuracy", "loss", *EXTRA_METRICS)}
        scalars |= {"time/round_s": row["wall_s"], "time/eval_s": row.get("eval_s"),
                    "train/aggregation_error": row.get("aggregation_error"),
                    "train/devices": len(row["clients"]) if row["clients"] else None,
                    "train/rejected": row.get("rejected")}
        if row["clients"]:
            scalars["train/loss"] = sum(c.get("train_loss") or 0.0 for c in row["clients"]) \
                / len(row["clients"])
            scalars["comm/bytes_up"] = sum(c.get("bytes_up", 0) for c in row["clients"])
            scalars["comm/bytes_down"] = sum(c.get("bytes_down", 0) for c in row["clients"])
        for task, values in (row.get("tasks") or {}).items():  # FedKD: one curve per task
            scalars[f"tasks/{task}/accuracy"] = values.get("accuracy")
        for tag, value in scalars.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.events.add_scalar(tag, value, step)
        self.events.flush()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


def write_plots(rows: list[dict], plot_dir: Path) -> list[Path]:
    """accuracy.png (accuracy per round) and communication.png (bytes per device, by rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in (("accuracy.png", accuracy_figure), ("communication.png",
                                                             communication_figure)):
        fig = draw(rows)
        _save(fig, plot_dir / name)
        plt.close(fig)
        paths.append(plot_dir / name)
    return paths


def accuracy_figure(rows: list[dict]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    pts = [(r["round"], r["accuracy"]) for r in rows if r.get("accuracy") is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
            label="mean over tasks" if rows and "tasks" in rows[-1] else None)
    for task in (rows[-1].get("tasks", {}) if rows else {}):  # FedKD: one line per task
        ax.plot([r["round"] for r in rows], [r["tasks"][task]["accuracy"] for r in rows],
                marker=".", alpha=0.7, label=task)
    ax.set(xlabel="round", ylabel="accuracy (server test split)", title="Global model accuracy")
    _integer_rounds(ax)
    if rows and "tasks" in rows[-1]:
        _legend_outside(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def communication_figure(rows: list[dict]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    by_rank: dict[int, list[tuple[int, int, int]]] = {}
    for r in rows:
        for c in r.get("clients", []):
            by_rank.setdefault(c["rank"], []).append((r["round"], c["bytes_up"], c["bytes_down"]))
    for i, rank in enumerate(sorted(by_rank)):
        pts, color = by_rank[rank], f"C{i % 10}"
        # uplink left of the round, downlink right of it, filled vs hollow: a device whose
        # up and down bytes are equal still shows both markers
        ax.scatter([p[0] - COMM_OFFSET for p in pts], [p[1] / 1e6 for p in pts], marker="^",
                   color=color, label=f"rank {rank} up")
        ax.scatter([p[0] + COMM_OFFSET for p in pts], [p[2] / 1e6 for p in pts], marker="v",
                   facecolors="none", edgecolors=color, label=f"rank {rank} down")
    ax.set(xlabel="round", ylabel="MB per device", title="Communication per device per round")
    _integer_rounds(ax)
    ax.margins(x=0.1, y=0.1)
    ax.grid(alpha=0.3)
    if by_rank:
        _legend_outside(ax)
    fig.tight_layout()
    return fig


# rounds apart on the x axis of communication.png: uplink at round - offset, downlink at +
COMM_OFFSET = 0.12


def _integer_rounds(ax) -> None:
    """Round ticks at whole numbers only."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_outside(ax) -> None:
    """The legend right of the axes, where it hides no point."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)
