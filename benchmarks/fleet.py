"""A realistic fleet (S2, S5), measured: time to a target accuracy in simulated time, and
FedLaAvg under intermittent, skewed availability.

Every run is the real strategy (`strategies.lora.server.federate`) driving the real ClientApp
in this process (`tests/inprocess_grid.InProcessGrid`); the simulated clock is the one the
run writes to metrics.jsonl (`fleet.sim_clock_s`: measured training seconds on this machine
scaled by each profile's speed, plus T_down and T_up over Rayleigh-faded links).

- `--study selection`: the same federation under `fleet.selection` = all, random, oort, s2
  (random and oort at `--per-round` devices); per round accuracy against simulated time,
  and the simulated seconds to reach `--target`.
- `--study intermittent`: pathological partitions (one label per device); the devices
  holding `--rare-labels` are online one round in `--offline-period` (a trace); FedAvg
  (random among the online) against FedLaAvg, final and per-class accuracy.
- `--study cost`: seconds `schedule` takes per round at 10..1,000 devices.

    python benchmarks/fleet.py --study selection --rounds 12 --devices 8
    python benchmarks/fleet.py --study selection --model smollm2-135m-instruct --set task=lm-cls \
        --set "data.template=..." --set data.label-words=Business,Sci/Tech,Sports,World
    python benchmarks/fleet.py --render --out benchmarks/results/fleet-selection
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.common import (machine_line, provenance, read_json,  # noqa: E402
                               run_inprocess, set_overrides, write_json)
from edge_lam.config.run_config import RunConfig  # noqa: E402

SELECTIONS = ("all", "random", "oort", "s2")


def base_config(args, results: Path) -> dict:
    return {"model": args.model, "data.path": args.data, "strategy": args.strategy,
            "num-server-rounds": args.rounds, "train.local-steps": args.local_steps,
            "train.batch-size": args.batch, "eval.max-examples": args.eval_max,
            "seed": args.seed, "results-dir": str(results), "min-devices": 1,
            "fleet.bandwidth-mhz": args.bandwidth_mhz,
            **set_overrides(args.set)}


def curve(rows: list[dict]) -> list[dict]:
    return [{"round": r["round"], "accuracy": r["accuracy"],
             "sim_clock_s": r.get("fleet", {}).get("sim_clock_s", 0.0),
             "selected": r.get("fleet", {}).get("selected", 0), "wall_s": r["wall_s"]}
            for r in rows]


def time_to(points: list[dict], target: float) -> float | None:
    hit = [p["sim_clock_s"] for p in points if p["accuracy"] >= target]
    return min(hit) if hit else None


def study_selection(args, work: Path) -> dict:
    runs = {}
    for i, sel in enumerate(SELECTIONS):
        raw = base_config(args, work / sel) | {"data.partitioner": "dirichlet",
                                               "fleet.selection": sel,
                                               "fleet.per-round": args.per_round}
        t0 = time.perf_counter()
        rows, _ = run_inprocess(raw, args.devices, run_id=10 + i)
        runs[sel] = {"curve": curve(rows), "wall_s": time.perf_counter() - t0}
        last = runs[sel]["curve"][-1]
        print(f"{sel}: accuracy {last['accuracy']:.4f} at {last['sim_clock_s']:.1f} "
              f"simulated s", flush=True)
    for r in runs.values():
        r["time_to_target_s"] = time_to(r["curve"], args.target)
    return runs


def study_intermittent(args, work: Path) -> dict:
    rare = {int(x) for x in args.rare_labels.split(",")}
    classes = 4  # AG News; pathological, one label each: device k holds label k % 4
    trace = {str(k): [1] * args.rounds if k % classes not in rare else
             [int((r + k) % args.offline_period == 0) for r in range(args.rounds)]
             for k in range(args.devices)}
    trace_file = work / "trace.json"
    work.mkdir(parents=True, exist_ok=True)
    trace_file.write_text(json.dumps(trace))
    runs = {}
    for i, sel in enumerate(("random", "fedlaavg")):
        raw = base_config(args, work / sel) | {
            "data.partitioner": "pathological", "data.classes-per-device": 1,
            "fleet.selection": sel, "fleet.per-round": args.per_round,
            "fleet.availability": str(trace_file)}
        rows, run_dir = run_inprocess(raw, args.devices, run_id=20 + i)
        runs[sel] = {"curve": curve(rows), "per_class": per_class(raw, run_dir)}
        print(f"{sel}: final accuracy {rows[-1]['accuracy']:.4f}, per class "
              f"{runs[sel]['per_class']}", flush=True)
    return {"runs": runs, "trace": trace, "rare_labels": sorted(rare)}


def per_class(raw: dict, run_dir: Path) -> dict[str, float]:
    from edge_lam.training.evaluation import ServerModel

    task = ServerModel.prepare(RunConfig.from_run_config(raw))
    state = task.load_state(run_dir / "adapter", "the run's adapter")
    labels = np.asarray(task.test.labels)
    out = {}
    for k, name in enumerate(task.label_names):
        idx = np.flatnonzero(labels == k)
        sub = ServerModel(task.cfg, task.label_names, task.test.subset(idx), task.data_source)
        out[name] = sub.evaluate(state)["accuracy"]
    return out


def study_cost(args) -> list[dict]:
    from strategies.fleet.select import schedule

    rng = np.random.default_rng(args.seed)
    out = []
    for k in (10, 100, 1000):
        t0 = time.perf_counter()
        for _ in range(5):
            schedule(rng.integers(50, 500, k).astype(float), np.full(k, 8 * 2e6),
                     rng.uniform(0.1, 1.0, k), rng.uniform(5, 50, k), rng.exponential(10, k),
                     20e6)
        out.append({"devices": k, "seconds_per_round": (time.perf_counter() - t0) / 5})
        print(out[-1], flush=True)
    return out


def write_report(out: Path) -> None:
    run = read_json(out / "fleet.json")
    a = run["args"]
    lines = [f"Machine: {machine_line(run['machine'])}.", "",
             f"Command: `{run['command']}`; {run['total_s']:.0f} s.", "",
             f"{a['model']} on {Path(a['data']).name}, {a['devices']} devices (profiles "
             f"rpi4 / rpi5 / jetson-orin-nano / laptop in turn), {a['rounds']} rounds x "
             f"{a['local_steps']} local steps, {a['strategy']}, seed {a['seed']}, uplink "
             f"{a['bandwidth_mhz']:g} MHz shared.", ""]
    if "selection" in run:
        lines += [f"Time to accuracy {a['target']:.2f} in simulated seconds (`-`: not "
                  "reached):", "",
                  "| selection | final accuracy | simulated s, all rounds | time to target | "
                  "devices per round |", "|---|---|---|---|---|"]
        for sel, r in run["selection"].items():
            last = r["curve"][-1]
            per = np.mean([p["selected"] for p in r["curve"][1:]])
            t = r["time_to_target_s"]
            lines.append(f"| {sel} | {last['accuracy']:.4f} | {last['sim_clock_s']:.1f} | "
                         f"{'-' if t is None else f'{t:.1f}'} | {per:.1f} |")
    if "intermittent" in run:
        inter = run["intermittent"]
        names = list(next(iter(inter["runs"].values()))["per_class"])
        lines += ["", f"Intermittent: the devices of labels {inter['rare_labels']} are online "
                  f"one round in {a['offline_period']}.", "",
                  "| selection | final accuracy | mean of the last 3 rounds | " +
                  " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        for sel, r in inter["runs"].items():
            last3 = np.mean([p["accuracy"] for p in r["curve"][-3:]])
            lines.append(f"| {sel} | {r['curve'][-1]['accuracy']:.4f} | {last3:.4f} | " +
                         " | ".join(f"{r['per_class'][n]:.4f}" for n in names) + " |")
    if "cost" in run:
        lines += ["", "| devices | s2 scheduling seconds per round |", "|---|---|"]
        lines += [f"| {c['devices']} | {c['seconds_per_round']:.4f} |" for c in run["cost"]]
    (out / "fleet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="selection,intermittent,cost")
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "agnews"))
    ap.add_argument("--strategy", default="hetlora")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--local-steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-max", type=int, default=300)
    ap.add_argument("--per-round", type=int, default=4)
    ap.add_argument("--bandwidth-mhz", type=float, default=5.0)
    ap.add_argument("--target", type=float, default=0.75)
    ap.add_argument("--rare-labels", default="2,3")
    ap.add_argument("--offline-period", type=int, default=4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--set", action="append", default=[],
                    help="any run-config key=value (e.g. task=lm-cls for an LLM)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fleet")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.render:
        return write_report(args.out)
    started = time.perf_counter()
    studies = args.study.split(",")
    result = {}
    with tempfile.TemporaryDirectory(prefix="edge-lam-fleet-") as tmp:
        if "selection" in studies:
            result["selection"] = study_selection(args, Path(tmp) / "selection")
        if "intermittent" in studies:
            result["intermittent"] = study_intermittent(args, Path(tmp) / "intermittent")
    if "cost" in studies:
        result["cost"] = study_cost(args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "fleet.json", {**provenance(started), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **result})
    write_report(args.out)


if __name__ == "__main__":
    main()
