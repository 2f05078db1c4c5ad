"""Issue 27's study of LoRA rank on generative work: where rank binds (fedavg and centralised
training at ranks 2-32), which mixed-rank federation does not hurt, and the devices-that-pay
protocols (`benchmarks/hetero_pays.py`), run as one batch of processes side by side.

- `jobs`: the batch, in the order it runs (every setup's seed 0 first, then seed 1, ...,
  so a batch cut short still has whole tables at fewer seeds).
- `pool RUNS`: run the batch, `--workers` processes at a time, each writing
  `RUNS/<job>/quality.json` (or `pays.json`) and `RUNS/<job>.log`; a job already done is
  skipped; no job starts after `--stop-after` seconds, and those still running at
  `--deadline` seconds are stopped (their logs keep the rounds they finished).
- `report RUNS`: the rank-binding and mixed-rank tables (`benchmarks/results/rank-binding`)
  from the finished jobs; the protocol table is `hetero_pays.py report RUNS`.
- `render`: the tables again from rank_binding.json.

Quality is the answer NLL per response token on a fixed set of test answers (`eval.seed`),
lower is better; a setup "binds" when rank 16's worst seed is better than rank 2's best.

    python benchmarks/rank_study.py pool runs --model smol.gguf --data-root data --workers 12
    python benchmarks/rank_study.py report runs
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_line, read_json, write_json  # noqa: E402

DATASETS = ("gsm8k", "codealpaca")
RANKS = (2, 4, 8, 16, 32)
RANK_SETUPS = tuple(f"fedavg-r{r}" for r in RANKS) + ("central-r2", "central-r16")
MIXED_DATA = "gsm8k"  # step 2's setting (chosen from the issue's probe: rank bound there)
MIXED_SETUPS = ("hetlora", "hetlora-rlr", "hetlora-rslora", "rankwise-rlr", "fedex-rlr",
                "fedex-rlr-k16", "hetlora-fedadam", "hetlora-fedavgm", "hetlora-warmup2")
PAYS_SETUPS = ("weakest", "rmax-drop", "hetero", "hetero-r2")
SEEDS = (0, 1, 2)
LOW, HIGH = "fedavg-r2", "fedavg-r16"
RISE = 0.03  # stability: no round's NLL more than 3% above the round before
# every run of the rank and mixed studies: SmolLM2 answering, q and v projections
COMMON = ["task=causal-lm", "train.max-length=0", "train.batch-size=8", "train.lr=5e-4",
          "eval.batch-size=16",
          "train.dtype=bfloat16", "lora.target-modules=q_proj,v_proj", "eval.metric=nll"]
RUN_NAME = re.compile(r"^(?P<study>rank|mixed)-(?P<data>[a-z0-9_]+)-(?P<setup>.+)-s(?P<seed>\d+)$")
ALL_PROJ = "gsm8k_all"  # GSM8K with LoRA on all 7 projections (fedavg r2 and r16 only)
ROUND_LINE = re.compile(r"^  round (\d+): nll ([\d.]+)")


def jobs(args) -> list[tuple[str, list[str]]]:
    """(name, command) of every run, seed-major."""
    py = sys.executable
    out = []
    for seed in SEEDS[:args.seeds]:
        for data in DATASETS:
            for setup in RANK_SETUPS:
                out.append((f"rank-{data}-{setup}-s{seed}", _quality(py, args, data, setup,
                                                                     seed)))
        for setup in MIXED_SETUPS:
            out.append((f"mixed-{MIXED_DATA}-{setup}-s{seed}",
                        _quality(py, args, MIXED_DATA, setup, seed)))
        for setup in (LOW, HIGH):
            out.append((f"rank-{ALL_PROJ}-{setup}-s{seed}",
                        _quality(py, args, ALL_PROJ, setup, seed)))
        for setup in PAYS_SETUPS:
            out.append((f"pays-{setup}-s{seed}", [
                py, str(ROOT / "benchmarks" / "hetero_pays.py"), "run", "--setup", setup,
                "--seed", str(seed), "--model", args.model, "--shared", args.data_root,
                "--rounds", str(args.rounds), "--steps", str(args.local_steps),
                "--out", str(Path(args.runs) / f"pays-{setup}-s{seed}")]))
    return out


def _quality(py: str, args, data: str, setup: str, seed: int) -> list[str]:
    name = f"{'rank' if setup in RANK_SETUPS else 'mixed'}-{data}-{setup}-s{seed}"
    folder = data.removesuffix("_all")
    cmd = [py, str(ROOT / "benchmarks" / "quality.py"), "--model", args.model,
           "--data", str(Path(args.data_root) / folder), "--rounds", str(args.rounds),
           "--devices", str(args.devices), "--local-steps", str(args.local_steps),
           "--eval-max", str(args.eval_max), "--seed", str(seed), "--setups", setup,
           "--out", str(Path(args.runs) / name)]
    for item in COMMON:
        if data == ALL_PROJ and item.startswith("lora.target-modules="):
            item = "lora.target-modules=auto"
        cmd += ["--set", item]
    return cmd


def done(runs: Path, name: str) -> bool:
    return (runs / name / "quality.json").is_file() or (runs / name / "pays.json").is_file()


def pool(args) -> None:
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    todo = [(n, c) for n, c in jobs(args) if not done(runs, n)
            and re.search(args.only, n) and not (args.skip and re.search(args.skip, n))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    start, running = time.monotonic(), {}
    print(f"{len(todo)} jobs, {args.workers} at a time", flush=True)
    while todo or running:
        now = time.monotonic() - start
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                print(f"{now:7.0f} s  {name}: exit {proc.returncode}", flush=True)
                del running[name]
        if now > args.deadline:
            for name, proc in running.items():
                os.killpg(proc.pid, signal.SIGTERM)
                print(f"{now:7.0f} s  {name}: stopped at the deadline", flush=True)
            break
        while todo and len(running) < args.workers and now < args.stop_after:
            name, cmd = todo.pop(0)
            log = open(runs / f"{name}.log", "w")
            log.write(shlex.join(cmd) + "\n")
            log.flush()
            running[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             env=env, cwd=ROOT, start_new_session=True)
            print(f"{now:7.0f} s  {name}: started", flush=True)
        if not running and (not todo or now >= args.stop_after):
            break
        time.sleep(2)
    print(f"not started: {[n for n, _ in todo]}", flush=True)


# ------------------------------------------------------------------------------ report
def read_runs(runs: Path) -> tuple[dict, dict | None]:
    """{(study, data, setup): {seed: {"nll": [round 0..], "done", "bytes_up", ...}}}."""
    out: dict = {}
    header = None
    names = {p.stem if p.suffix == ".log" else p.name for p in runs.iterdir()}
    for name in sorted(names):
        hit = RUN_NAME.match(name)
        if not hit:
            continue
        key, seed = (hit["study"], hit["data"], hit["setup"]), int(hit["seed"])
        result = runs / name / "quality.json"
        if result.is_file():
            run = read_json(result)
            header = header or run
            curve = run["curves"][hit["setup"]]
            s = run["summary"][0]
            n = run["args"]["devices"]
            entry = {"nll": [r["loss"] for r in curve], "done": True,
                     "token_acc": curve[-1]["accuracy"], "wall_s": run["total_s"],
                     "bytes_up": s["bytes_up_per_round"] / n if s["bytes_up_per_round"]
                     else None,
                     "bytes_down": s["bytes_down_per_round"] / n if s["bytes_down_per_round"]
                     else None}
        elif (runs / f"{name}.log").is_file():
            nll = [float(m[2]) for m in map(ROUND_LINE.match,
                                             (runs / f"{name}.log").read_text().splitlines())
                   if m]
            entry = {"nll": [None] + nll, "done": False}
        else:
            continue
        out.setdefault(key, {})[seed] = entry
    return out, header


def area(nll: list[float]) -> float:
    """Mean NLL over rounds 1..R (the area under the curve / R)."""
    return statistics.fmean(nll[1:])


def largest_rise(nll: list[float]) -> float:
    """The largest relative increase of the NLL from one round to the next (from round 1)."""
    return max([0.0] + [(b - a) / a for a, b in zip(nll[1:], nll[2:])])


def summarise(seeds: dict[int, dict], rounds: int) -> dict | None:
    full = {s: e for s, e in seeds.items() if e["done"] and len(e["nll"]) == rounds + 1}
    if not full:
        return None
    finals = [e["nll"][-1] for e in full.values()]
    areas = [area(e["nll"]) for e in full.values()]
    up = [e["bytes_up"] for e in full.values() if e.get("bytes_up")]
    down = [e["bytes_down"] for e in full.values() if e.get("bytes_down")]
    return {"seeds": sorted(full), "final_mean": statistics.fmean(finals),
            "final_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "final_min": min(finals), "final_max": max(finals),
            "area_mean": statistics.fmean(areas),
            "largest_rise": max(largest_rise(e["nll"]) for e in full.values()),
            "token_acc": statistics.fmean(e["token_acc"] for e in full.values()),
            "bytes_up": statistics.fmean(up) if up else None,
            "bytes_down": statistics.fmean(down) if down else None,
            "wall_s": max(e["wall_s"] for e in full.values()),
            "curves": {str(s): e["nll"] for s, e in full.items()}}


def binds(low: dict | None, high: dict | None) -> bool | None:
    """Rank binds when every seed of the high rank ends below every seed of the low one."""
    if not low or not high or len(low["seeds"]) < 2 or len(high["seeds"]) < 2:
        return None
    return high["final_max"] < low["final_min"]


def report(args) -> None:
    runs, header = read_runs(Path(args.runs))
    if header is None:
        sys.exit(f"no finished run (<study>-<data>-<setup>-s<seed>/quality.json) in {args.runs}")
    rounds = header["args"]["rounds"]
    table: dict = {}
    for (study, data, setup), seeds in runs.items():
        row = summarise(seeds, rounds)
        cut = sorted(s for s, e in seeds.items() if not e["done"])
        table.setdefault(study, {}).setdefault(data, {})[setup] = {
            "summary": row, "cut_short": {str(s): len(seeds[s]["nll"]) - 1 for s in cut}}
    verdicts = {}
    for data, setups in table.get("rank", {}).items():
        low, high = setups.get(LOW, {}).get("summary"), setups.get(HIGH, {}).get("summary")
        c2 = setups.get("central-r2", {}).get("summary")
        c16 = setups.get("central-r16", {}).get("summary")
        verdicts[data] = {"fedavg": binds(low, high), "central": binds(c2, c16),
                          "fedavg_gap": None if not (low and high) else
                          low["final_mean"] - high["final_mean"],
                          "central_gap": None if not (c2 and c16) else
                          c2["final_mean"] - c16["final_mean"]}
    a = header["args"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "rank_binding.json", {
        "machine": header["machine"], "total_s": header["total_s"],
        "command": re.sub(r"--seed \d+", "--seed SEED", re.sub(
            r"--setups \S+", "--setups SETUP", re.sub(r"--data \S+", "--data DATA", re.sub(
                r"--out \S+", "--out DIR", header["command"])))),
        "pool_command": args.pool_command, "note": args.note, "args": a,
        "common": a.get("set", []),  # what the runs were given (not today's COMMON)
        "finished": sum(e["done"] for seeds in runs.values() for e in seeds.values())
        + len(list(Path(args.runs).glob("pays-*/pays.json"))),
        "planned": len(jobs(argparse.Namespace(**{**a, "runs": args.runs, "seeds": len(SEEDS),
                                                  "model": a["model"],
                                                  "data_root": str(Path(a["data"]).parent)}))),
        "rounds": rounds, "table": table, "verdicts": verdicts})
    render(out)


def render(out: Path) -> None:
    run = read_json(out / "rank_binding.json")
    a = run["args"]
    f4 = lambda x: "-" if x is None else f"{x:.4f}"
    mb = lambda x: "-" if x is None else f"{x / 1e6:.2f} MB"
    lines = [
        "# Where rank binds, and mixed ranks that do not hurt", "",
        f"SmolLM2-135M-Instruct, {a['devices']} devices, Dirichlet alpha 0.5 over 8 topical "
        f"clusters of the prompts (data.clusters), {run['rounds']} rounds x "
        f"{a['local_steps']} local steps, answer NLL per response token on {a['eval_max']} "
        "fixed test answers (eval.seed 0; lower is better). Centralised: one model, the "
        "federation's steps per round on all the data.", "",
        f"Overrides of every run: `{' '.join(run['common'])}`.", "",
        f"Machine: {machine_line(run['machine'])}.", "",
        f"Command per run: `{run['command']}`; the batch: `{run['pool_command']}`.", "",
        f"Runs finished: {run.get('finished', '?')} of the {run.get('planned', '?')} planned "
        "(rank, mixed and devices-that-pay runs together); a row counts the seeds that "
        "finished, and rows of one seed may be of different seeds.", ""] + ([run["note"], ""] if run.get("note") else [])
    for data, setups in run["table"].get("rank", {}).items():
        v = run["verdicts"].get(data, {})
        lines += [f"## Rank binding: {data}", "",
                  "| setup | seeds | final NLL (mean +- sd, min-max) | vs fedavg-r2 | area "
                  "(mean NLL, rounds 1-R) | token accuracy | uplink / device / round |",
                  "|---|---|---|---|---|---|---|"]
        low = setups.get(LOW, {}).get("summary")
        for setup in RANK_SETUPS:
            lines.append(_row(setup, setups.get(setup), low, f4, mb))
        say = {True: "yes", False: "no", None: "not enough seeds"}
        lines += ["", f"Rank 16 beats rank 2 beyond the seeds' spread (every r16 seed below "
                  f"every r2 seed): fedavg {say[v.get('fedavg')]} (gap "
                  f"{f4(v.get('fedavg_gap'))}), centralised {say[v.get('central')]} (gap "
                  f"{f4(v.get('central_gap'))}).", ""]
    for data, setups in run["table"].get("mixed", {}).items():
        base = run["table"].get("rank", {}).get(data, {})
        low = base.get(LOW, {}).get("summary")
        high = base.get(HIGH, {}).get("summary")
        lines += [f"## Mixed ranks (2/4/8/16 by device profile, r_max 16): {data}", "",
                  "Goal: final and area at most fedavg-r2's (the rank every device affords), "
                  f"no round's NLL more than {RISE:.0%} above the round before; aim: "
                  "fedavg-r16's.", "",
                  "| setup | seeds | final NLL (mean +- sd, min-max) | vs fedavg-r2 | area | "
                  "vs fedavg-r16 (final) | largest rise | uplink / device / round | downlink "
                  "/ device / round | meets the goal |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, ref in ((LOW, low), (HIGH, high)):
            if ref:
                lines.append(_mixed_row(name, {"summary": ref}, low, high, f4, mb, True))
        for setup in MIXED_SETUPS:
            lines.append(_mixed_row(setup, setups.get(setup), low, high, f4, mb, False))
        lines.append("")
    (out / "rank_binding.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(run, out)


def _row(setup, entry, low, f4, mb) -> str:
    s = (entry or {}).get("summary")
    if not s:
        cut = (entry or {}).get("cut_short") or {}
        return f"| {setup} | 0 | not finished{_cut(cut)} | - | - | - | - |"
    vs = "-" if not low or setup == LOW else f"{s['final_mean'] - low['final_mean']:+.4f}"
    return (f"| {setup} | {len(s['seeds'])} | {s['final_mean']:.4f} +- {s['final_sd']:.4f} "
            f"({s['final_min']:.4f}-{s['final_max']:.4f}) | {vs} | {s['area_mean']:.4f} | "
            f"{s['token_acc']:.4f} | {mb(s['bytes_up'])} |")


def _cut(cut: dict) -> str:
    return "" if not cut else " (cut short: " + ", ".join(
        f"seed {k} at round {v}" for k, v in sorted(cut.items())) + ")"


def _mixed_row(setup, entry, low, high, f4, mb, baseline: bool) -> str:
    s = (entry or {}).get("summary")
    if not s:
        cut = (entry or {}).get("cut_short") or {}
        return f"| {setup} | 0 | not finished{_cut(cut)} | - | - | - | - | - | - | - |"
    vs_low = "-" if not low else f"{s['final_mean'] - low['final_mean']:+.4f}"
    vs_high = "-" if not high else f"{s['final_mean'] - high['final_mean']:+.4f}"
    goal = "-" if baseline or not low else ("yes" if (
        s["final_mean"] <= low["final_mean"] and s["area_mean"] <= low["area_mean"]
        and s["largest_rise"] <= RISE) else "no")
    return (f"| {setup} | {len(s['seeds'])} | {s['final_mean']:.4f} +- {s['final_sd']:.4f} "
            f"({s['final_min']:.4f}-{s['final_max']:.4f}) | {vs_low} | {s['area_mean']:.4f} | "
            f"{vs_high} | {100 * s['largest_rise']:.1f}% | {mb(s['bytes_up'])} | "
            f"{mb(s['bytes_down'])} | {goal} |")


def _plot(run: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rank = run["table"].get("rank", {})
    fig, axes = plt.subplots(1, max(1, len(rank)), figsize=(5 * max(1, len(rank)), 4))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, (data, setups) in zip(axes, rank.items()):
        for prefix, style in (("fedavg", "-o"), ("central", "--s")):
            xs, ys, lo, hi = [], [], [], []
            for r in RANKS:
                s = (setups.get(f"{prefix}-r{r}") or {}).get("summary")
                if s:
                    xs.append(r)
                    ys.append(s["final_mean"])
                    lo.append(s["final_min"])
                    hi.append(s["final_max"])
            if xs:
                ax.plot(xs, ys, style, label=prefix)
                ax.fill_between(xs, lo, hi, alpha=0.15)
        ax.set(xscale="log", xlabel="LoRA rank", ylabel="final answer NLL (test)", title=data)
        ax.set_xticks(list(RANKS), [str(r) for r in RANKS])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rank_binding.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("jobs", "pool"):
        p = sub.add_parser(name)
        p.add_argument("runs")
        p.add_argument("--model", default="smollm2-135m-instruct")
        p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
        p.add_argument("--rounds", type=int, default=6)
        p.add_argument("--devices", type=int, default=10)
        p.add_argument("--local-steps", type=int, default=10)
        p.add_argument("--eval-max", type=int, default=200)
        p.add_argument("--seeds", type=int, default=3)
        p.add_argument("--workers", type=int, default=12)
        p.add_argument("--stop-after", type=float, default=float("inf"))
        p.add_argument("--deadline", type=float, default=float("inf"))
        p.add_argument("--only", default="", help="run only the jobs whose name matches "
                       "this regular expression")
        p.add_argument("--skip", default="", help="leave out the jobs whose name matches")
    rep = sub.add_parser("report")
    rep.add_argument("runs")
    rep.add_argument("--out", default=str(ROOT / "benchmarks/results/rank-binding"))
    rep.add_argument("--pool-command", default="", help="the pool command, for the record")
    rep.add_argument("--note", default="", help="what the table cannot say by itself (runs "
                     "that failed and why), printed under its header")
    ren = sub.add_parser("render")
    ren.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/rank-binding")
    args = ap.parse_args()
    if args.cmd == "jobs":
        for name, cmd in jobs(args):
            print(name, shlex.join(cmd))
    elif args.cmd == "pool":
        pool(args)
    elif args.cmd == "report":
        report(args)
    else:
        render(args.out)


if __name__ == "__main__":
    main()
