"""The heterogeneous-rank gap over seeds: how much of fedavg@2 -> fedavg@16 each aggregation
closes (issue 12), from runs of `quality.py` made one setup and one seed per process.

Each run is a folder `<setup>-s<seed>` with its quality.json (finished) or a log
`<setup>-s<seed>.log` beside it (a run cut short: the rounds it printed). Per setup, over the
seeds:
- final accuracy (mean, sd, min-max) and the fraction of the gap it closes,
  (acc - fedavg-r2) / (fedavg-r16 - fedavg-r2), from the means;
- area under the accuracy curve over rounds 1..R (the mean accuracy of those rounds: rounds
  are equally spaced), and the fraction of the gap in area;
- stability: the largest fall from one round to the next in any seed (goal: at most 3
  points) and how many such falls exceed 3 points;
- payload bytes per device per round, up and down.

    python benchmarks/rank_gap.py RUNS_DIR --out benchmarks/results/rank-gap
    python benchmarks/rank_gap.py --render --out benchmarks/results/rank-gap
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_line, read_json, write_json  # noqa: E402

LOW, HIGH = "fedavg-r2", "fedavg-r16"
RUN_NAME = re.compile(r"^(?P<setup>.+)-s(?P<seed>\d+)$")
ROUND_LINE = re.compile(r"^  round (\d+): acc ([\d.]+)")
FALL = 0.03  # the stability bound: no round more than 3 points below the last


def read_runs(root: Path) -> tuple[dict[str, dict[int, dict]], dict | None]:
    """{setup: {seed: {"acc": [round 0..], "bytes_up": .., "bytes_down": .., "done": bool}}}
    and one finished run's quality.json header (machine, args)."""
    runs: dict[str, dict[int, dict]] = {}
    header = None
    names = {p.stem if p.suffix == ".log" else p.name for p in root.iterdir()
             if p.suffix == ".log" or (p / "quality.json").is_file()}
    for name in sorted(names):
        hit = RUN_NAME.match(name)
        if not hit:
            continue
        setup, seed = hit["setup"], int(hit["seed"])
        result = root / name / "quality.json"
        if result.is_file():
            run = read_json(result)
            header = header or dict(run)
            header["total_s"] = max(header["total_s"], run["total_s"])
            curve = run["curves"][setup]
            summary = run["summary"][0]
            n_dev = run["args"]["devices"]
            entry = {"acc": [r["accuracy"] for r in curve], "done": True,
                     "bytes_up": summary["bytes_up_per_round"] / n_dev,
                     "bytes_down": summary["bytes_down_per_round"] / n_dev}
        else:
            acc = [float(m[2]) for m in map(ROUND_LINE.match,
                                             (root / f"{name}.log").read_text().splitlines())
                   if m]
            if not acc:
                continue
            entry = {"acc": [None] + acc, "done": False, "bytes_up": None, "bytes_down": None}
        runs.setdefault(setup, {})[seed] = entry
    # a cut-short run's round 0 is its seed's base model, as in any finished run of that seed
    for seeds in runs.values():
        for seed, entry in seeds.items():
            if entry["acc"][0] is None:
                zero = next((s[seed]["acc"][0] for s in runs.values()
                             if seed in s and s[seed]["acc"][0] is not None), None)
                entry["acc"][0] = zero
    return runs, header


def model_name(path: str) -> str:
    name = Path(path).name
    return "SmolLM2-135M-Instruct (Q4_1 GGUF)" if "smol" in name.lower() else name


def area(acc: list[float]) -> float:
    """Mean accuracy over rounds 1..R (area under the curve / R)."""
    return sum(acc[1:]) / (len(acc) - 1)


def largest_fall(acc: list[float]) -> float:
    """The largest drop from one round to the next (0 if it never falls)."""
    return max([0.0] + [a - b for a, b in zip(acc, acc[1:])])


def summarise(runs: dict[str, dict[int, dict]], rounds: int) -> list[dict]:
    """One row per setup over the seeds that finished all `rounds` rounds."""
    rows = []
    for setup, seeds in runs.items():
        full = {s: e for s, e in seeds.items() if len(e["acc"]) == rounds + 1
                and e["acc"][0] is not None}
        if not full:
            continue
        finals = [e["acc"][-1] for e in full.values()]
        areas = [area(e["acc"]) for e in full.values()]
        falls = [largest_fall(e["acc"][1:]) for e in full.values()]  # from round 1 on
        big = sum(a - b > FALL for e in full.values() for a, b in zip(e["acc"][1:],
                                                                       e["acc"][2:]))
        ups = [e["bytes_up"] for e in full.values() if e["bytes_up"] is not None]
        downs = [e["bytes_down"] for e in full.values() if e["bytes_down"] is not None]
        rows.append({
            "setup": setup, "seeds": sorted(full),
            "final_mean": statistics.fmean(finals),
            "final_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "final_min": min(finals), "final_max": max(finals),
            "area_mean": statistics.fmean(areas),
            "largest_fall": max(falls), "falls_over_3pt": big,
            "bytes_up": statistics.fmean(ups) if ups else None,
            "bytes_down": statistics.fmean(downs) if downs else None,
            "curves": {s: e["acc"] for s, e in full.items()}})
    by = {r["setup"]: r for r in rows}
    # a gap within the baselines' standard error is no gap: no fraction of it means anything
    spread = max([b["final_sd"] / len(b["seeds"]) ** 0.5 for b in (by.get(LOW), by.get(HIGH))
                  if b] or [0.0])
    for r in rows:  # fractions of the fedavg@2 -> fedavg@16 gap, and points vs fedavg@16
        for key in ("final", "area"):
            lo, hi = (by.get(LOW, {}).get(f"{key}_mean"), by.get(HIGH, {}).get(f"{key}_mean"))
            r[f"{key}_vs_high"] = None if hi is None else r[f"{key}_mean"] - hi
            gap = None if lo is None or hi is None or abs(hi - lo) <= spread else \
                (r[f"{key}_mean"] - lo) / (hi - lo)
            r[f"{key}_gap"] = gap
        hi = by.get(HIGH)
        r["meets_goal"] = None if hi is None else bool(
            r["final_mean"] >= hi["final_mean"] and r["area_mean"] >= hi["area_mean"]
            and r["largest_fall"] <= FALL)
    # the two baselines first, then best final accuracy first
    return sorted(rows, key=lambda r: (r["setup"] != HIGH, r["setup"] != LOW, -r["final_mean"]))


def write_report(out: Path) -> None:
    run = read_json(out / "rank_gap.json")
    rows = run["rows"]
    pct = lambda x: "no gap" if x is None else f"{100 * x:.0f}%"
    pts = lambda x: "n/a" if x is None else f"{100 * x:+.1f} pt"
    mb = lambda x: "n/a" if x is None else f"{x / 1e6:.2f} MB"
    lines = [run["title"], "", f"Machine: {machine_line(run['machine'])}.", "",
             f"Command (one process per setup and seed, side by side): `{run['command']}`; "
             f"{run['total_s']:.0f} s for the longest.", "",
             "| setup | seeds | final acc (mean +- sd, min-max) | vs fedavg-r16 | gap closed "
             "(final) | area (mean acc, rounds 1-R) | vs fedavg-r16 | gap closed (area) | "
             "largest fall between rounds | falls > 3 pt | bytes up / device / round | "
             "bytes down / device / round | meets the goal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        goal = "-" if r["setup"] in (LOW, HIGH) or r["meets_goal"] is None else \
            ("yes" if r["meets_goal"] else "no")
        lines.append(
            f"| {r['setup']} | {len(r['seeds'])} | {r['final_mean']:.4f} +- {r['final_sd']:.4f}"
            f" ({r['final_min']:.3f}-{r['final_max']:.3f}) | {pts(r['final_vs_high'])} | "
            f"{pct(r['final_gap'])} | {r['area_mean']:.4f} | {pts(r['area_vs_high'])} | "
            f"{pct(r['area_gap'])} | {100 * r['largest_fall']:.1f} pt"
            f" | {r['falls_over_3pt']} | {mb(r['bytes_up'])} | {mb(r['bytes_down'])} | "
            f"{goal} |")
    lows = [r for r in rows if r["setup"] == LOW]
    if lows and lows[0]["final_gap"] is None:
        lines += ["", "No gap: fedavg-r16 and fedavg-r2 end within the seeds' spread of each "
                  "other (standard error of the mean), so no fraction of a gap is reported; "
                  "the `vs fedavg-r16` columns compare directly."]
    if run.get("cut_short"):
        lines += ["", "Runs cut short (not in the table): " + ", ".join(run["cut_short"]) + "."]
    (out / "rank_gap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for r in rows:
        curves = list(r["curves"].values())
        xs = range(len(curves[0]))
        mean = [statistics.fmean(c[i] for c in curves) for i in xs]
        style = "--" if r["setup"] in (LOW, HIGH) else "-"
        ax.plot(xs, mean, style, label=f"{r['setup']} ({len(curves)} seeds)")
        ax.fill_between(xs, [min(c[i] for c in curves) for i in xs],
                        [max(c[i] for c in curves) for i in xs], alpha=0.12)
    ax.set(xlabel="round", ylabel="test accuracy (mean; band: min-max over seeds)",
           title=run["plot_title"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rank_gap.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="?", type=Path, help="folder of <setup>-s<seed> runs")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rank-gap")
    ap.add_argument("--render", action="store_true", help="only redraw from rank_gap.json")
    args = ap.parse_args()
    if args.render:
        return write_report(args.out)
    runs, header = read_runs(args.runs)
    if header is None:
        sys.exit(f"no finished run (<setup>-s<seed>/quality.json) in {args.runs}")
    a = header["args"]
    rows = summarise(runs, a["rounds"])
    cut = sorted(f"{setup}-s{seed} ({len(e['acc']) - 1} of {a['rounds']} rounds)"
                 for setup, seeds in runs.items() for seed, e in seeds.items()
                 if len(e["acc"]) != a["rounds"] + 1)
    overrides = " ".join(x.replace("\n", "\\n") for x in a.get("set", []))
    title = (f"AG News as an instruction, {a['devices']} devices (Dirichlet alpha 0.5, ranks "
             f"2/4/8/16 over the device mix), {a['rounds']} rounds x {a['local_steps']} local "
             f"steps, {a['eval_max']} test texts, model {model_name(a['model'])}; overrides "
             f"`{overrides}`.")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "rank_gap.json", {
        "machine": header["machine"], "title": title, "total_s": header["total_s"],
        "plot_title": f"{model_name(a['model'])}, AG News: heterogeneous ranks over seeds",
        "command": header["command"].replace(f"--seed {a['seed']}", "--seed SEED").replace(
            f"--setups {a['setups']}", "--setups SETUP"),
        "rows": rows, "cut_short": cut})
    write_report(args.out)


if __name__ == "__main__":
    main()
