"""FedKD (S3) on a mixed federation: AG News devices (Dirichlet split) + SST-2 devices.

Compares, on the same devices, data, shared module (LoRA at fedkd.shared-rank + per-task head)
and local steps:
- fedkd      mutual distillation with each device's private local module (LoRA at
             fedkd.local-rank + head), shared module exchanged whole;
- fedkd-svd  the same with S3 SVD compression of the shared-module updates both ways;
- fedavg     FedAvg of the shared module alone (task loss only; heads averaged per task);
- fedavg-large  FedAvg of a module as large as the local one (LoRA at fedkd.local-rank): the
             FedKD paper's baseline, what plain FedAvg sends to train a model of that size;
- local      each device trains its private local module alone (no communication).
Each device's accuracy is measured on its own task's test split: the global shared module +
its task's head (server side), and the device's own local module where it has one.

The federation runs in-process with the functions the Flower apps call
(strategies.fedkd.device.device_round / train_modules, strategies.fedkd.math encode/decode/aggregate,
strategies.fedkd.evaluation.FedKDServer), so it needs no Flower. Bytes are raw array bytes.

    python benchmarks/fedkd.py --model .device/minilm-fp16 --data-root .device
    python benchmarks/fedkd.py --model /tmp/tiny-bert --rounds 1 --steps 2 --eval-max 32 \
        --device-eval-max 32 --out /tmp/fedkd-smoke  # CPU smoke test
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (machine_line, parse_value, provenance, read_json,  # noqa: E402
                               write_json)
from edge_lam.training.device import DeviceInfo  # noqa: E402
from strategies.fedkd.device import DeviceStore, device_round, device_task, train_modules  # noqa: E402
from strategies.fedkd.evaluation import FedKDServer  # noqa: E402
from strategies.fedkd.math import (aggregate_fedkd, decode_update, device_view,  # noqa: E402
                              encode_update, energy_threshold, payload_nbytes)
from edge_lam.config.run_config import RunConfig  # noqa: E402

SETUPS = {  # name -> (device mode, run-config overrides)
    "fedkd": ("fedkd", {"fedkd.compress": False}),
    "fedkd-svd": ("fedkd", {"fedkd.compress": True}),
    "fedavg": ("fedavg", {"fedkd.compress": False}),
    "fedavg-large": ("fedavg", {"fedkd.compress": False, "fedkd.shared-rank": "local-rank"}),
    "local": ("local", {}),
}
REFERENCES = ("fedavg", "fedavg-large")  # bytes to reach their final accuracy


def run_setup(cfg: RunConfig, mode: str, num_devices: int, state_root: Path, log) -> list[dict]:
    """One federation, rounds 0..R; each row: per-task shared accuracy and per-device info."""
    server = FedKDServer.prepare(cfg)
    state = server.initial_state()
    devices = [DeviceInfo(partition_id=k, num_partitions=num_devices) for k in range(num_devices)]
    tasks = [device_task(cfg, d)[0] for d in devices]
    stores = [DeviceStore(state_root / f"device-{k}") for k in range(num_devices)]
    held: dict[int, tuple[dict, int]] = {}  # what the server knows each device holds
    shared = server.evaluate(state) if mode != "local" else {}
    rows = [{"round": 0, "tasks": shared, "devices": [
        {"task": t, "shared_accuracy": shared.get(t, {}).get("accuracy")} for t in tasks]}]
    for rnd in range(1, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        energy = (energy_threshold(rnd, cfg.num_rounds, cfg.fedkd.energy_start,
                                   cfg.fedkd.energy_end) if cfg.fedkd.compress else None)
        replies, counts, rows_dev = [], [], []
        for k, (info, task, store) in enumerate(zip(devices, tasks, stores)):
            labels = server.label_names[task]
            if mode == "local":
                _, n, m = train_modules(cfg, info, store, task, labels, None, rnd, mode="local")
                rows_dev.append({"task": task, "num_examples": n, "bytes_up": 0,
                                 "bytes_down": 0, "train_loss": m["train_loss"],
                                 "local_accuracy": m.get("local_accuracy")})
                continue
            reference, base_round = held.get(k, (None, 0))
            down = encode_update(device_view(state, task), reference, energy)  # server side
            start = decode_update(down, reference)
            held[k] = (start, rnd)
            up, n, m = device_round(cfg, info, store, task, labels, down,
                                    base_round if reference is not None else 0, rnd, energy,
                                    mode=mode)
            replies.append(decode_update(up, start))  # server side
            counts.append(n)
            rows_dev.append({"task": task, "num_examples": n, "bytes_up": payload_nbytes(up),
                             "bytes_down": payload_nbytes(down), "train_loss": m["train_loss"],
                             "local_accuracy": m.get("local_accuracy")})
        if replies:
            state = aggregate_fedkd(replies, counts, tasks, state)
            shared = server.evaluate(state)
        for d in rows_dev:
            d["shared_accuracy"] = shared[d["task"]]["accuracy"] if shared else None
        rows.append({"round": rnd, "tasks": shared, "devices": rows_dev,
                     "wall_s": time.perf_counter() - t0})
        log(f"  round {rnd}: " + summary_line(rows[-1]) + f" ({rows[-1]['wall_s']:.1f}s)")
    return rows


def device_mean(row: dict, key: str, task: str | None = None) -> float | None:
    vals = [d[key] for d in row["devices"] if d.get(key) is not None
            and (task is None or d["task"] == task)]
    return float(np.mean(vals)) if vals else None


def summary_line(row: dict) -> str:
    parts = []
    for key, name in (("shared_accuracy", "shared"), ("local_accuracy", "local")):
        value = device_mean(row, key)
        if value is not None:
            parts.append(f"{name} {value:.4f}")
    return ", ".join(parts)


def bytes_to_reach(rows: list[dict], key: str, target: float) -> tuple[int | None, int | None]:
    """(first round whose device-mean `key` accuracy >= target, cumulative bytes up+down)."""
    total = 0
    for row in rows[1:]:
        total += sum(d["bytes_up"] + d["bytes_down"] for d in row["devices"])
        value = device_mean(row, key)
        if value is not None and value >= target - 1e-12:
            return row["round"], total
    return None, None


def summarise(curves: dict[str, list[dict]], task_names: tuple[str, ...]) -> list[dict]:
    """Per setup and module: final / best device-mean accuracy, per task, total bytes, and for
    each FedAvg reference the round and bytes to reach its final accuracy (and the saving)."""
    out = []
    for name, rows in curves.items():
        for key, module in (("shared_accuracy", "shared"), ("local_accuracy", "local")):
            final = device_mean(rows[-1], key)
            if final is None:
                continue
            entry = {"setup": name, "module": module, "final_avg": final,
                     "best_avg": max(v for v in (device_mean(r, key) for r in rows)
                                     if v is not None),
                     "per_task": {t: device_mean(rows[-1], key, t) for t in task_names},
                     "total_bytes": sum(d["bytes_up"] + d["bytes_down"]
                                        for r in rows[1:] for d in r["devices"]),
                     "to_reach": {}}
            for ref in REFERENCES:
                if ref in curves and entry["total_bytes"] > 0:  # local-only sends nothing
                    target = device_mean(curves[ref][-1], "shared_accuracy")
                    rnd, nbytes = bytes_to_reach(rows, key, target)
                    entry["to_reach"][ref] = {"target": target, "round": rnd, "bytes": nbytes}
            out.append(entry)
    for entry in out:
        for ref, reach in entry["to_reach"].items():
            own = curves[ref]
            _, ref_bytes = bytes_to_reach(own, "shared_accuracy", reach["target"])
            if reach["bytes"] is not None and ref_bytes:
                reach["saving"] = 1.0 - reach["bytes"] / ref_bytes
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--data-root", default="../shared/data",
                    help="folder holding agnews/ and sst2/")
    ap.add_argument("--devices-per-task", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10, help="local steps per round")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-max", type=int, default=1000,
                    help="cap on each task's test examples for the shared module (0 = all)")
    ap.add_argument("--device-eval-max", type=int, default=500,
                    help="cap on the test examples each device evaluates its local module on "
                         "every round (a subset of the same split)")
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other run-config override, e.g. --set fedkd.temperature=3")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--render", action="store_true",
                    help="only write fedkd.md and fedkd.png from --out/fedkd.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render:
        return write_report(out)
    started = time.perf_counter()
    root = Path(args.data_root)
    base = {"strategy": "fedkd", "model": args.model, "num-server-rounds": args.rounds,
            "train.local-steps": args.steps, "train.batch-size": args.batch_size,
            "train.lr": args.lr, "eval.max-examples": args.eval_max,
            "fedkd.device-eval-examples": args.device_eval_max,
            "fedkd.task-mix": "agnews,sst2",
            "fedkd.task.agnews.path": str(root / "agnews"),
            "fedkd.task.sst2.path": str(root / "sst2"),
            "data.partitioner": "dirichlet", "data.dirichlet-alpha": 0.5}
    for item in args.set:
        key, _, value = item.partition("=")
        base[key] = parse_value(value)
    num_devices = 2 * args.devices_per_task
    curves, walls = {}, {}
    for name in args.setups.split(","):
        mode, overrides = SETUPS[name]
        local_rank = RunConfig.from_run_config(base).fedkd.local_rank
        overrides = {k: local_rank if v == "local-rank" else v for k, v in overrides.items()}
        cfg = RunConfig.from_run_config({**base, **overrides})
        print(f"{name}: {num_devices} devices, mode {mode}", flush=True)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"fedkd-{name}-") as tmp:
            curves[name] = run_setup(cfg, mode, num_devices, Path(tmp),
                                     lambda s: print(s, flush=True))
        walls[name] = time.perf_counter() - t0
        summary = summarise(curves, RunConfig.from_run_config(base).fedkd.task_names)
        write_json(out / "fedkd.json", {**provenance(started), "args": vars(args),
                                        "run_config": base, "wall_s": walls,
                                        "summary": summary, "curves": curves})
    write_report(out)


def write_report(out: Path) -> None:
    """fedkd.md and fedkd.png, from fedkd.json alone."""
    run = read_json(out / "fedkd.json")
    summary, curves, walls = run["summary"], run["curves"], run["wall_s"]
    args, cfg = argparse.Namespace(**run["args"]), RunConfig.from_run_config(run["run_config"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mb = lambda b: "-" if b is None else f"{b / 1e6:.2f} MB"  # noqa: E731
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    tasks = cfg.fedkd.task_names
    lines = [
        f"{args.devices_per_task} AG News devices (Dirichlet alpha=0.5) + "
        f"{args.devices_per_task} SST-2 devices, {args.rounds} rounds x {args.steps} local "
        f"steps (batch {args.batch_size}, lr {args.lr}, seed {cfg.seed}), model {args.model}. "
        f"Shared module: LoRA r={cfg.fedkd.shared_rank} + per-task head; local module: LoRA "
        f"r={cfg.fedkd.local_rank} + head; T={cfg.fedkd.temperature}, "
        f"lambda={cfg.fedkd.lambda_}, adaptive={cfg.fedkd.adaptive}, "
        f"hidden-mse={cfg.fedkd.hidden_mse}; test sets capped at {args.eval_max or 'all'} "
        f"(shared module) and {args.device_eval_max or 'all'} (local modules, on device). "
        "Accuracy = mean over devices of the accuracy on the device's own task's test split; "
        "bytes = payload bytes (raw arrays, as compressed) up + down, all devices.",
        "", f"Machine: {machine_line(run['machine'])}.", "",
        f"Command: `{run.get('command', '?')}`; {run.get('total_s', sum(walls.values())):.0f} s "
        "in all.", "",
        "| setup | module evaluated | final avg acc | best avg acc | "
        + " | ".join(f"{t} acc" for t in tasks) + " | total bytes |",
        "|---|---|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for e in summary:
        per_task = " | ".join("-" if e["per_task"][t] is None else f"{e['per_task'][t]:.4f}"
                              for t in tasks)
        lines.append(f"| {e['setup']} | {e['module']} | {e['final_avg']:.4f} | "
                     f"{e['best_avg']:.4f} | {per_task} | {mb(e['total_bytes'])} |")
    refs = [r for r in REFERENCES if r in curves]
    if refs:
        targets = {r: device_mean(curves[r][-1], "shared_accuracy") for r in refs}
        lines += ["", "Bytes to reach each FedAvg baseline's final average accuracy (first "
                  "round at or above it; saving = 1 - bytes / the baseline's own bytes to "
                  "get there):", "",
                  "| setup | module | " + " | ".join(
                      f"{r} final {targets[r]:.4f}: round, bytes, saving" for r in refs) + " |",
                  "|---|---|" + "---|" * len(refs)]
        for e in summary:
            if not e["to_reach"]:
                continue
            cells = []
            for r in refs:
                reach = e["to_reach"].get(r)
                cells.append("-" if reach is None else "not reached" if reach["round"] is None
                             else f"{reach['round']}, {mb(reach['bytes'])}, "
                                  f"{pct(reach.get('saving'))}")
            lines.append(f"| {e['setup']} | {e['module']} | " + " | ".join(cells) + " |")
    lines += ["", "Wall time per setup: " + ", ".join(f"{k} {v:.0f}s" for k, v in walls.items())]
    (out / "fedkd.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, (acc_ax, byte_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in curves.items():
        for key, style in (("shared_accuracy", "-"), ("local_accuracy", "--")):
            pts = [(r["round"], device_mean(r, key)) for r in rows]
            pts = [p for p in pts if p[1] is not None]
            if pts:
                acc_ax.plot(*zip(*pts), style, label=f"{name} ({key.split('_')[0]})")
        cumulative = np.cumsum([sum(d["bytes_up"] + d["bytes_down"] for d in r["devices"])
                                for r in rows[1:]]) / 1e6
        if cumulative.size and cumulative[-1] > 0:
            byte_ax.plot(range(1, len(rows)), cumulative, label=name)
    acc_ax.set(xlabel="round", ylabel="mean device accuracy (own task)",
               title="Mixed AG News + SST-2 federation")
    byte_ax.set(xlabel="round", ylabel="cumulative MB (up + down, all devices)",
                title="Communication")
    for ax in (acc_ax, byte_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fedkd.png", dpi=120)


if __name__ == "__main__":
    main()
