"""Robustness (issue 17, R2 / R4 / S6), measured: device failures, Byzantine devices against
the robust aggregators, and the contribution estimate against exact leave-one-out.

Every run is the real strategy (`strategies.lora.server.federate`) driving the real ClientApp
in this process (`tests/inprocess_grid.InProcessGrid`); the devices misbehave themselves
(`strategies.robust.inject`: faults.* and attack.*), the server only sees their replies.

- `--study failures`: the clean run against the same run with faults.crash / error / timeout
  (default 0.1 each: 30% of the devices fail per round); final accuracy of both.
- `--study attacks`: rows attack.kind (none, sign-flip, scale, gaussian, backdoor, collude,
  and the attacks built against the defences: alie, min-max, min-sum) at attack.fraction
  of the devices, columns robust.aggregator (none = the strategy's own
  aggregation, mean, median, trimmed-mean, krum, multi-krum, norm-clip, fltrust); cells the
  final accuracy, and for backdoor the attack success rate: the share of triggered test texts
  (true label != target) the final adapter classifies as the target.
- `--study contribution`: robust.contribution=report with robust.exact-loo: per round the
  Spearman of the estimate against exact LOO, and the estimate's seconds against the round's.

    python benchmarks/robustness.py --study failures --rounds 8
    python benchmarks/robustness.py --study attacks --rounds 3 --aggregators none,median
    python benchmarks/robustness.py --render --out benchmarks/results/robustness
"""

from __future__ import annotations

import argparse
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

ATTACKS = ("none", "sign-flip", "scale", "gaussian", "backdoor", "collude", "alie", "min-max",
           "min-sum")  # table order
AGGREGATORS = ("none", "mean", "median", "trimmed-mean", "krum", "multi-krum", "norm-clip",
               "fltrust")
STUDIES = ("failures", "attacks", "contribution")  # each in <out>/<study>.json


def base_config(args, results: Path) -> dict:
    return {"model": args.model, "data.path": args.data, "strategy": args.strategy,
            "num-server-rounds": args.rounds, "train.local-steps": args.local_steps,
            "train.batch-size": args.batch, "train.max-length": args.max_length,
            "eval.max-examples": args.eval_max, "seed": args.seed,
            "results-dir": str(results), "min-devices": 1,
            "data.partitioner": args.partitioner,
            **set_overrides(args.set)}


def summary(rows: list[dict]) -> dict:
    """Per round: accuracy, wall seconds, devices aggregated, refused / missing nodes."""
    out = []
    for r in rows:
        rob = r.get("robust", {})
        out.append({"round": r["round"], "accuracy": r["accuracy"], "wall_s": r["wall_s"],
                    "clients": len(r.get("clients", [])),
                    "rejections": r.get("rejections", []), "missing": r.get("missing", []),
                    "robust_refused": [x["node_id"] for x in rob.get("refusals", [])
                                       if x.get("refused")],
                    "robust_weights": rob.get("weights", {})})
    return {"curve": out, "final_accuracy": rows[-1]["accuracy"]}


def study_failures(args, work: Path) -> dict:
    runs = {}
    faults = {"faults.crash": args.crash, "faults.error": args.error,
              "faults.timeout": args.timeout}
    for i, (name, extra) in enumerate((("clean", {}), ("faults", faults))):
        t0 = time.perf_counter()
        rows, _ = run_inprocess(base_config(args, work / name) | extra, args.devices,
                                 run_id=100 + i)
        runs[name] = {**summary(rows), "wall_s": time.perf_counter() - t0, "config": extra}
        print(f"failures/{name}: final accuracy {rows[-1]['accuracy']:.4f}", flush=True)
    return runs


def attack_success(raw: dict, run_dir: Path) -> dict:
    """Backdoor: the share of triggered test texts (true label != target) that the run's
    final adapter classifies as the target, and the clean accuracy of the same adapter."""
    from strategies.robust.inject import backdoor_test, target_label
    from edge_lam.training.evaluation import ServerModel

    cfg = RunConfig.from_run_config(raw)
    task = ServerModel.prepare(cfg)
    state = task.load_state(run_dir / "adapter", "the run's adapter")
    target = target_label(cfg, task.label_names)
    test = backdoor_test(task.test, cfg.attack.trigger, target)
    test.labels = [target] * len(test)  # accuracy against the target = success rate
    sub = ServerModel(task.cfg, task.label_names, test, task.data_source)
    return {"attack_success": sub.evaluate(state)["accuracy"], "triggered_examples": len(test),
            "target": task.label_names[target]}


def study_attacks(args, work: Path) -> dict:
    from strategies.robust.inject import attackers

    prior = read_json(args.resume) if args.resume else None
    cells: dict[str, dict] = prior["attacks"]["cells"] if prior else {}
    # every invocation that made cells of this grid: (command, seconds)
    runs = (prior["attacks"].get("runs") or [{"command": prior["command"],
                                              "total_s": prior["total_s"]}]) if prior else []
    run_id, started = 200, time.perf_counter()
    bad = attackers(RunConfig.from_run_config({"attack.fraction": args.fraction,
                                               "seed": args.seed}), args.devices)
    for kind in args.attacks.split(","):
        for agg in args.aggregators.split(","):
            run_id += 1
            key = f"{kind}|{agg}"
            if key in cells:
                continue
            raw = base_config(args, work / kind / agg) | {
                "robust.aggregator": agg, "robust.f": args.krum_f,
                "robust.root-examples": args.root_examples}
            if kind != "none":
                raw |= {"attack.kind": kind, "attack.fraction": args.fraction}
                if kind == "gaussian":
                    raw["attack.sigma"] = args.sigma
            t0 = time.perf_counter()
            rows, run_dir = run_inprocess(raw, args.devices, run_id)
            cell = {**summary(rows), "wall_s": time.perf_counter() - t0}
            if kind == "backdoor":
                cell |= attack_success(raw, run_dir)
            cells[key] = cell
            print(f"attacks/{kind}/{agg}: final accuracy {cell['final_accuracy']:.4f}"
                  + (f", attack success {cell['attack_success']:.4f}" if "attack_success"
                     in cell else "") + f" ({cell['wall_s']:.0f} s)", flush=True)
            if args.partial:  # a long grid: every finished cell is kept, renderable
                now = provenance(started)
                write_json(args.partial, {**now, "args": _args(args), "attacks": {
                    "cells": cells, "attackers": bad, "runs": runs + [
                        {"command": now["command"], "total_s": now["total_s"]}]}})
    now = provenance(started)
    return {"cells": cells, "attackers": bad,
            "runs": runs + [{"command": now["command"], "total_s": now["total_s"]}]}


def study_contribution(args, work: Path) -> dict:
    raw = base_config(args, work / "contribution") | {
        "robust.contribution": "report", "robust.exact-loo": True,
        "robust.contribution-examples": args.contribution_examples}
    rows, _ = run_inprocess(raw, args.devices, run_id=300)
    rounds = []
    for r in rows[1:]:
        c = r.get("contribution", {})
        train_s = max((x["train_s"] for x in r.get("clients", [])), default=float("nan"))
        rounds.append({"round": r["round"], "spearman": c.get("spearman"),
                       "estimate_s": c.get("estimate_s"), "exact_s": c.get("exact_s"),
                       "device_train_s_max": train_s, "round_wall_s": r["wall_s"],
                       "estimate": c.get("estimate", {}), "exact": c.get("exact", {}),
                       "fisher": c.get("fisher"),
                       "by_estimate": c.get("spearman_by_estimate", {}),
                       "skipped": c.get("skipped")})
        print(f"contribution round {r['round']}: spearman {c.get('spearman')}, estimate "
              f"{c.get('estimate_s')} s, exact {c.get('exact_s')} s", flush=True)
    return {"rounds": rounds, "final_accuracy": rows[-1]["accuracy"]}


def _args(args) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def _f(x, fmt=".4f"):
    return "-" if x is None else format(x, fmt)


def header(run: dict) -> list[str]:
    a = run["args"]
    return [f"Machine: {machine_line(run['machine'])}.", "",
            f"Command: `{run['command']}`; {run['total_s']:.0f} s.", "",
            f"{a['model']} on {Path(a['data']).name} ({a['partitioner']} partitions), "
            f"{a['devices']} devices, {a['strategy']}, {a['rounds']} rounds x "
            f"{a['local_steps']} local steps of batch {a['batch']} (max length "
            f"{a['max_length']}), evaluated on {a['eval_max']} test texts, seed {a['seed']}.",
            ""]


def write_report(out: Path) -> None:
    files = [out / f"{s}.json" for s in STUDIES if (out / f"{s}.json").is_file()]
    if not files:
        read_json(out / "failures.json")  # says: run the benchmark first
    lines = []
    for path in files:
        lines += [f"### {path.stem}", ""] + report(read_json(path))
    (out / "robustness.md").write_text("\n".join(lines))
    print("\n".join(lines))


def report(run: dict) -> list[str]:
    a = run["args"]
    lines = header(run)
    if "failures" in run:
        f = run["failures"]
        clean, bad = f["clean"], f["faults"]
        failed = [len(p["rejections"]) + len(p["missing"]) for p in bad["curve"][1:]]
        lines += ["Device failures (faults.crash / error / timeout = "
                  f"{a['crash']:g} / {a['error']:g} / {a['timeout']:g} per device and round):",
                  "", "| run | final accuracy | failed devices per round (mean, min-max) | "
                  "rounds completed |", "|---|---|---|---|",
                  f"| clean | {clean['final_accuracy']:.4f} | 0 | {len(clean['curve']) - 1} |",
                  f"| faults | {bad['final_accuracy']:.4f} | {np.mean(failed):.1f} "
                  f"({min(failed)}-{max(failed)}) | {len(bad['curve']) - 1} |", "",
                  f"Difference: {100 * (bad['final_accuracy'] - clean['final_accuracy']):+.1f} "
                  "accuracy points.", ""]
    if "attacks" in run:
        cells = run["attacks"]["cells"]
        if len(run["attacks"].get("runs", [])) > 1:
            lines += ["The grid was made by these commands in turn (each with `--resume` "
                      "skipping the cells before it):", ""]
            lines += [f"- `{r['command']}`; {r['total_s']:.0f} s" for r in
                      run["attacks"]["runs"]]
            lines.append("")
        aggs = [g for g in AGGREGATORS if any(k.endswith("|" + g) for k in cells)]
        kinds = [k for k in ATTACKS if any(c.startswith(k + "|") for c in cells)]
        lines += [f"Byzantine devices: attack.fraction={a['fraction']:g} of {a['devices']} "
                  f"(partitions {run['attacks']['attackers']}), final accuracy per "
                  f"robust.aggregator (krum f={a['krum_f']}, gaussian sigma={a['sigma']:g}, "
                  f"fltrust root set {a['root_examples']} examples); backdoor: accuracy / "
                  "attack success rate (triggered non-target test texts classified as the "
                  "target).", "",
                  "| attack | " + " | ".join(aggs) + " |", "|---|" + "---|" * len(aggs)]
        for kind in kinds:
            row = []
            for g in aggs:
                c = cells.get(f"{kind}|{g}")
                row.append("-" if c is None else f"{c['final_accuracy']:.3f}" + (
                    f" / {c['attack_success']:.3f}" if "attack_success" in c else ""))
            lines.append(f"| {kind} | " + " | ".join(row) + " |")
        clean = {g: cells[f"none|{g}"]["final_accuracy"] for g in aggs if f"none|{g}" in cells}
        lines += ["", "Accuracy points against the same aggregator without attack (worst "
                  "attack per aggregator):", "", "| aggregator | worst attack | points |",
                  "|---|---|---|"]
        for g in aggs:
            drops = [(100 * (cells[f"{k}|{g}"]["final_accuracy"] - clean[g]), k)
                     for k in kinds if k != "none" and f"{k}|{g}" in cells and g in clean]
            if drops:
                d, k = min(drops)
                lines.append(f"| {g} | {k} | {d:+.1f} |")
        lines.append("")
    if "contribution" in run:
        c = run["contribution"]
        variants = ("first_order", "diagonal_fisher", "empirical_fisher")
        lines += ["Contribution (robust.contribution=report, robust.exact-loo=true): Spearman "
                  "rank correlation of each estimate of c_k = L(theta_-k) - L(theta_new) "
                  "against exact leave-one-out (the estimate the run used: "
                  f"`{c['rounds'][0].get('fisher') or 'diagonal'}` Fisher), and seconds.", "",
                  "| round | Spearman: first order | + diagonal Fisher | + empirical Fisher | "
                  "estimate s | exact LOO s | slowest device's training s | round wall s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in c["rounds"]:
            by = r.get("by_estimate") or {}
            cells = [_f(by.get(v), '.3f') for v in variants]
            if not by:  # an older run: only the estimate it used
                cells = ["-", _f(r["spearman"], '.3f'), "-"]
            lines.append(f"| {r['round']} | {' | '.join(cells)} | "
                         f"{_f(r['estimate_s'], '.2f')} | {_f(r['exact_s'], '.2f')} | "
                         f"{_f(r['device_train_s_max'], '.2f')} | "
                         f"{_f(r['round_wall_s'], '.1f')} |")
        for v in variants:
            sp = [r["by_estimate"][v] for r in c["rounds"] if v in (r.get("by_estimate") or {})]
            if sp:
                lines += ["", f"{v.replace('_', ' ')}: mean Spearman {np.mean(sp):.3f} (min "
                          f"{min(sp):.3f}) over {len(sp)} rounds."]
        sp = [r["spearman"] for r in c["rounds"] if r["spearman"] is not None]
        if sp:
            lines += ["", f"Mean Spearman {np.mean(sp):.3f} (min {min(sp):.3f}) over "
                      f"{len(sp)} rounds."]
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="failures,attacks,contribution")
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "agnews"))
    ap.add_argument("--strategy", default="hetlora")
    ap.add_argument("--partitioner", default="iid")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--eval-max", type=int, default=200)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--crash", type=float, default=0.1)
    ap.add_argument("--error", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=0.1)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--aggregators", default=",".join(AGGREGATORS))
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--sigma", type=float, default=0.01)
    ap.add_argument("--krum-f", type=int, default=2)
    ap.add_argument("--root-examples", type=int, default=32)
    ap.add_argument("--contribution-examples", type=int, default=32)
    ap.add_argument("--set", action="append", default=[],
                    help="any run-config key=value")
    ap.add_argument("--partial", type=Path, default=None,
                    help="write the attack study here after each run (a renderable "
                    "attacks.json)")
    ap.add_argument("--resume", type=Path, default=None,
                    help="a --partial file: skip the cells it holds")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "robustness")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.render:
        return write_report(args.out)
    started = time.perf_counter()
    studies = args.study.split(",")
    with tempfile.TemporaryDirectory(prefix="edge-lam-robust-") as tmp:
        for name, fn in (("failures", study_failures), ("attacks", study_attacks),
                         ("contribution", study_contribution)):
            if name in studies:
                t0 = time.perf_counter()
                result = {name: fn(args, Path(tmp) / name)}
                write_json(args.out / f"{name}.json", {**provenance(t0), "args": _args(args),
                                                       **result})
    print(f"{time.perf_counter() - started:.0f} s")
    write_report(args.out)


if __name__ == "__main__":
    main()
