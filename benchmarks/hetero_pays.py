"""Devices that pay (issue 27, step 3), measured as EdgeFlowerTune measures a federated
fine-tuning system: Quality-under-Budget (the quality reached within a simulated wall-clock
and uplink budget) and Cost-to-Target (simulated seconds, uplink bytes and device-seconds to
reach a target quality), on the fleet profiles of `edge_lam/config/hardware.py`.

The federation (10 devices, profiles rpi4 / rpi5 / jetson-orin-nano / laptop in turn) is
non-IID so that the weak devices matter: the three Raspberry Pi 4s hold Code Alpaca, which no
other device has; the other seven share GSM8K. The test set is both (`eval.max-examples`
answers drawn from the union at `eval.seed`); quality is the answer NLL per token (lower is
better). Setups:
- `weakest`: every device at the weakest device's settings: rank 2, `--steps` local steps;
- `rmax-drop`: every device at r_max = 16, dropping those whose profile cannot afford it
  (rpi4 and rpi5: their profile ranks are 2 and 4) and their data; the four left are fast,
  so they train `--cap` x `--steps` steps and get `--rmax-rounds` rounds in about the time
  the others take for `--rounds`;
- `hetero`: each device at its profile's rank (2/4/8/16; HetLoRA aggregation with the
  rank-matched learning rate) and with as many local steps as it runs in the time the
  weakest takes for `--steps` (steps x its speed / rpi4's, at most `--cap` x `--steps`);
- `hetero-r2`: `hetero`'s local steps at rank 2 everywhere (what the steps alone give).

Simulated time comes from a cost model, not from this machine's clock: a device's step takes
`seconds per token` (SmolLM2 on a 2-core x86 vCPU, the fp32 row of
benchmarks/results/llm_cost.json) x the round's tokens per step / its profile's speed; a
message takes its payload bytes over the profile's link (`up_mbps` / `down_mbps`); a round
lasts as long as its slowest device (synchronous FedAvg). Device-seconds add every device's
compute.

    python benchmarks/hetero_pays.py run --setup hetero --seed 0 --model smol.gguf \
        --out runs/pays-hetero-s0
    python benchmarks/hetero_pays.py report runs --out benchmarks/results/hetero-pays
    python benchmarks/hetero_pays.py render --out benchmarks/results/hetero-pays
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_line, provenance, read_json, write_json  # noqa: E402
from edge_lam.config.hardware import HARDWARE  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
MIX = ("rpi4", "rpi5", "jetson-orin-nano", "laptop")
SETUPS = ("weakest", "rmax-drop", "hetero", "hetero-r2")
WEAK = "rpi4"  # the profile that holds the unique data
# rmax-drop keeps the profiles whose default rank is 8 or more (r16 costs them little time)
STRONG_ENOUGH = ("jetson-orin-nano", "laptop")
TIME_SHARE, UPLINK_SHARE = 0.5, 1.0  # the budgets, as shares of `weakest`'s whole run
LLM_COST = ROOT / "benchmarks" / "results" / "llm_cost.json"


# ------------------------------------------------------------------------------ data
def build_data(shared: Path, folder: Path) -> Path:
    """train.jsonl / test.jsonl of prompt, response, domain: GSM8K and Code Alpaca together."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = []
        for line in (shared / "gsm8k" / f"{split}.jsonl").read_text().split("\n"):
            if not line.strip():
                continue
            r = json.loads(line)
            rows.append({"prompt": r["question"], "response": r["answer"], "domain": "gsm8k"})
        for line in (shared / "codealpaca" / f"{split}.jsonl").read_text().split("\n"):
            if not line.strip():
                continue
            r = json.loads(line)
            prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input", "").strip()
                                         else "")
            rows.append({"prompt": prompt, "response": r["output"], "domain": "code"})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def device_examples(cfg, num_devices: int):
    """Each device's Examples: the rpi4s split the Code Alpaca rows, the others GSM8K's
    (IID within a domain, seeded)."""
    import numpy as np

    from edge_lam.data.text import load_split_frames, resolve_columns, to_examples

    frames = load_split_frames(cfg.data.path, "", cfg.data.encoding)
    examples = to_examples(frames["train"], resolve_columns(frames["train"], cfg), ())
    profiles = [MIX[p % len(MIX)] for p in range(num_devices)]
    rng = np.random.default_rng(cfg.seed)
    out: list = [None] * num_devices
    for domain, holders in (("code", [p for p in range(num_devices) if profiles[p] == WEAK]),
                            ("gsm8k", [p for p in range(num_devices) if profiles[p] != WEAK])):
        rows = rng.permutation([i for i, g in enumerate(examples.groups) if g == domain])
        for j, pid in enumerate(holders):
            out[pid] = examples.subset(sorted(rows[j::len(holders)].tolist()))
    return profiles, out


# ------------------------------------------------------------------------------ one run
def plan(setup: str, args, profiles: list[str]) -> tuple[list[int], list[int], list[int], int]:
    """(devices taking part, their ranks, their local steps, rounds) of a setup."""
    speed = {p: HARDWARE[p].speed for p in MIX}
    cap = args.cap * args.steps
    capable = [min(cap, max(args.steps, int(args.steps * speed[p] / speed[WEAK])))
               for p in profiles]
    everyone = list(range(len(profiles)))
    if setup == "weakest":
        return everyone, [2] * len(profiles), [args.steps] * len(profiles), args.rounds
    if setup == "rmax-drop":
        keep = [p for p in everyone if profiles[p] in STRONG_ENOUGH]
        return keep, [16] * len(keep), [cap] * len(keep), args.rmax_rounds
    if setup == "hetero":
        return everyone, [HARDWARE[p].rank for p in profiles], capable, args.rounds
    if setup == "hetero-r2":
        return everyone, [2] * len(profiles), capable, args.rounds
    raise SystemExit(f"--setup {setup}: one of {', '.join(SETUPS)}")


def run(args) -> None:
    from benchmarks.quality import federated
    from edge_lam.config.run_config import RunConfig

    started = time.perf_counter()
    data = build_data(Path(args.shared), Path(args.out) / "data")
    overrides = {
        "model": args.model, "task": "causal-lm", "data.path": str(data),
        "data.prompt-column": "prompt", "data.response-column": "response",
        "data.group-column": "domain", "data.input-column": "none",
        "train.max-length": 0, "train.batch-size": args.batch, "train.lr": args.lr,
        "train.dtype": args.dtype, "lora.target-modules": args.targets,
        "eval.max-examples": args.eval_max, "eval.metric": "nll", "seed": args.seed,
        "strategy": "hetlora" if args.setup == "hetero" else "fedavg",
        "lora.fedavg-rank": 16 if args.setup == "rmax-drop" else 2,
        "devices.mix": ",".join(MIX)}
    cfg = RunConfig.from_run_config(overrides)
    profiles, examples = device_examples(cfg, args.devices)
    devices, ranks, steps, rounds = plan(args.setup, args, profiles)
    cfg = cfg.updated(num_rounds=rounds)
    print(f"{args.setup} seed {args.seed}: devices {devices} ranks {ranks} steps {steps}, "
          f"{rounds} rounds", flush=True)
    rows = federated(cfg, len(devices), lambda s: print(s, flush=True),
                     examples=[examples[p] for p in devices], steps=steps, ranks=ranks)
    for row in rows:
        for c in row.get("clients", []):
            c["profile"] = profiles[devices[c["partition_id"]]]
    write_json(Path(args.out) / "pays.json", {
        **provenance(started), "setup": args.setup, "seed": args.seed, "args": vars(args),
        "overrides": overrides, "devices": devices, "profiles": profiles, "ranks": ranks,
        "steps": steps, "mean_tokens": mean_tokens(cfg, [examples[p] for p in devices]),
        "curve": rows})


def mean_tokens(cfg, examples) -> float:
    """Mean tokens of a training pair as posed (what a step's cost scales with)."""
    from edge_lam.data.encode import pair_lengths
    from edge_lam.models.lora_model import load_tokenizer, resolve_model_source

    tokenizer = load_tokenizer(resolve_model_source(cfg.model))
    lengths = [float(pair_lengths(tokenizer, e, cfg).mean()) for e in examples]
    return statistics.fmean(lengths)


# ------------------------------------------------------------------------------ cost
def seconds_per_token() -> float:
    """2-core x86 vCPU, SmolLM2, fp32 (the `naive` row of llm_cost.json): step seconds per
    token of the batch."""
    rows = read_json(LLM_COST)["rows"]
    row = next(r for r in rows if r["option"] == "naive" and "smollm2" in r["model"])
    return row["step_s_median"] / (row["batch"] * row["seq"])


def costs(run: dict, per_token: float) -> list[dict]:
    """Per round: simulated seconds (the slowest device), uplink bytes, device-seconds,
    cumulated, with the round's quality."""
    batch = run["args"]["batch"]
    step_s = per_token * batch * run["mean_tokens"]
    out, clock, up, dev = [], 0.0, 0.0, 0.0
    for row in run["curve"]:
        if row["round"] == 0:
            out.append({"round": 0, "nll": row["loss"], "sim_s": 0.0, "uplink_bytes": 0.0,
                        "device_s": 0.0})
            continue
        slowest, compute = 0.0, 0.0
        for c in row["clients"]:
            hw = HARDWARE[c["profile"]]
            work = c["steps"] * step_s / hw.speed
            link = 8 * c["bytes_down"] / (hw.down_mbps * 1e6) + \
                8 * c["bytes_up"] / (hw.up_mbps * 1e6) + 2 * hw.latency_s
            slowest = max(slowest, work + link)
            compute += work
            up += c["bytes_up"]
        clock += slowest
        dev += compute
        out.append({"round": row["round"], "nll": row["loss"], "sim_s": clock,
                    "uplink_bytes": up, "device_s": dev})
    return out


def under_budget(rounds: list[dict], sim_s: float, uplink: float) -> float:
    """The quality of the last round finished within both budgets (round 0 if none)."""
    done = [r for r in rounds if r["sim_s"] <= sim_s and r["uplink_bytes"] <= uplink]
    return done[-1]["nll"]


def to_target(rounds: list[dict], target: float) -> dict | None:
    """The costs of the first round at or below the target NLL (None: never)."""
    hit = next((r for r in rounds if r["round"] > 0 and r["nll"] <= target), None)
    return None if hit is None else {k: hit[k] for k in ("round", "sim_s", "uplink_bytes",
                                                         "device_s")}


def report(runs_dir: Path, out: Path) -> None:
    runs = [read_json(p) for p in sorted(runs_dir.glob("pays-*/pays.json"))]
    if not runs:
        sys.exit(f"no pays-*/pays.json under {runs_dir}")
    per_token = seconds_per_token()
    by_setup: dict[str, list[dict]] = {}
    for r in runs:
        by_setup.setdefault(r["setup"], []).append(r)
    base = by_setup.get("weakest")
    if not base:
        sys.exit("the weakest setup's runs are missing: the budgets and the target come "
                 "from it")
    # budgets: half of the weakest setup's simulated time over its rounds, and all of its
    # uplink; target: the weakest setup's final NLL (mean over seeds)
    base_costs = [costs(r, per_token) for r in base]
    budget_s = TIME_SHARE * statistics.fmean(c[-1]["sim_s"] for c in base_costs)
    budget_up = UPLINK_SHARE * statistics.fmean(c[-1]["uplink_bytes"] for c in base_costs)
    target = statistics.fmean(c[-1]["nll"] for c in base_costs)
    rows = []
    for setup in SETUPS:
        group = by_setup.get(setup, [])
        if not group:
            continue
        per_seed = []
        for r in group:
            c = costs(r, per_token)
            per_seed.append({"seed": r["seed"], "rounds": c,
                             "under_budget": under_budget(c, budget_s, budget_up),
                             "under_time": under_budget(c, budget_s, float("inf")),
                             "under_uplink": under_budget(c, float("inf"), budget_up),
                             "to_target": to_target(c, target), "final": c[-1]["nll"]})
        qub = [s["under_budget"] for s in per_seed]
        reached = [s["to_target"] for s in per_seed if s["to_target"]]
        rows.append({
            "setup": setup, "seeds": [s["seed"] for s in per_seed],
            "devices": len(group[0]["devices"]), "ranks": group[0]["ranks"],
            "steps": group[0]["steps"],
            "qub_mean": statistics.fmean(qub),
            "time_only_mean": statistics.fmean(s["under_time"] for s in per_seed),
            "uplink_only_mean": statistics.fmean(s["under_uplink"] for s in per_seed),
            "qub_sd": statistics.stdev(qub) if len(qub) > 1 else 0.0,
            "final_mean": statistics.fmean(s["final"] for s in per_seed),
            "reached": f"{len(reached)}/{len(per_seed)}",
            "ctt_sim_s": statistics.fmean(t["sim_s"] for t in reached) if reached else None,
            "ctt_uplink": statistics.fmean(t["uplink_bytes"] for t in reached)
            if reached else None,
            "ctt_device_s": statistics.fmean(t["device_s"] for t in reached)
            if reached else None,
            "per_seed": per_seed})
    write_json(out / "hetero_pays.json", {
        "machine": runs[0]["machine"], "commands": sorted({r["command"] for r in runs}),
        "total_s": max(r["total_s"] for r in runs), "seconds_per_token": per_token,
        "budget_sim_s": budget_s, "budget_uplink_bytes": budget_up, "target_nll": target,
        "args": runs[0]["args"], "rows": rows})
    render(out)


def render(out: Path) -> None:
    run = read_json(out / "hetero_pays.json")
    a = run["args"]
    mb = lambda x: "-" if x is None else f"{x / 1e6:.1f} MB"
    sec = lambda x: "-" if x is None else f"{x:,.0f} s"
    lines = [
        "# Devices that pay: Quality-under-Budget and Cost-to-Target", "",
        f"SmolLM2-135M-Instruct, {a['devices']} devices (profiles "
        f"{' / '.join(MIX)} in turn), LoRA on `{a['targets']}`, batch {a['batch']}, lr "
        f"{a['lr']}, base weights in {a['dtype']}; the three rpi4s hold Code Alpaca, the "
        "other seven GSM8K; quality is the answer NLL per token on "
        f"{a['eval_max']} fixed test answers of both (lower is better).", "",
        f"Machine (training): {machine_line(run['machine'])}. Simulated time: "
        f"{run['seconds_per_token'] * 1e3:.2f} ms per token of a step on a 2-core x86 vCPU "
        "(benchmarks/results/llm_cost.json) / the profile's speed, plus payloads over the "
        "profile's links (edge_lam/config/hardware.py); a round lasts as long as its "
        "slowest device.", "",
        "Commands: " + "; ".join(f"`{c}`" for c in run["commands"]) + ".", "",
        f"Budget: {run['budget_sim_s']:,.0f} simulated s and "
        f"{run['budget_uplink_bytes'] / 1e6:.1f} MB of uplink (half of the simulated time "
        "`weakest` takes for its rounds, and all of its uplink); the NLL of the last round "
        "finished within both, and within each alone. Target: NLL {run['target_nll']:.4f} (`weakest`'s final, "
        "mean over seeds).", "",
        "| setup | devices | ranks | local steps | seeds | NLL under both budgets (mean +- sd)"
        " | time budget only | uplink budget only | final NLL | reached target | simulated s "
        "to target | uplink to target | device-s to target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in run["rows"]:
        lines.append(
            f"| {r['setup']} | {r['devices']} | {'/'.join(map(str, sorted(set(r['ranks']))))}"
            f" | {'/'.join(map(str, sorted(set(r['steps']))))} | {len(r['seeds'])} | "
            f"{r['qub_mean']:.4f} +- {r['qub_sd']:.4f} | {r['time_only_mean']:.4f} | "
            f"{r['uplink_only_mean']:.4f} | {r['final_mean']:.4f} | "
            f"{r['reached']} | {sec(r['ctt_sim_s'])} | {mb(r['ctt_uplink'])} | "
            f"{sec(r['ctt_device_s'])} |")
    best = min(run["rows"], key=lambda r: r["qub_mean"])
    lines += ["", f"Best under the budget: `{best['setup']}`."]
    (out / "hetero_pays.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in run["rows"]:
        for i, s in enumerate(r["per_seed"]):
            xs = [x["sim_s"] for x in s["rounds"]]
            ups = [x["uplink_bytes"] / 1e6 for x in s["rounds"]]
            ys = [x["nll"] for x in s["rounds"]]
            kw = {"label": r["setup"]} if i == 0 else {}
            color = f"C{SETUPS.index(r['setup'])}"
            axes[0].plot(xs, ys, color=color, alpha=0.8, **kw)
            axes[1].plot(ups, ys, color=color, alpha=0.8, **kw)
    axes[0].axvline(run["budget_sim_s"], ls=":", color="grey")
    axes[1].axvline(run["budget_uplink_bytes"] / 1e6, ls=":", color="grey")
    for ax in axes:
        ax.axhline(run["target_nll"], ls="--", color="grey")
        ax.grid(alpha=0.3)
        ax.set_ylabel("answer NLL (test)")
    axes[0].set_xlabel("simulated seconds")
    axes[1].set_xlabel("uplink MB (all devices)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "hetero_pays.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one setup and seed")
    r.add_argument("--setup", required=True, choices=SETUPS)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--model", default="smollm2-135m-instruct")
    r.add_argument("--shared", default=str(SHARED))
    r.add_argument("--devices", type=int, default=10)
    r.add_argument("--rounds", type=int, default=6)
    r.add_argument("--rmax-rounds", type=int, default=18)
    r.add_argument("--steps", type=int, default=10)
    r.add_argument("--cap", type=int, default=3, help="most local steps, x --steps")
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--lr", type=float, default=5e-4)
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--targets", default="q_proj,v_proj")
    r.add_argument("--eval-max", type=int, default=200)
    r.add_argument("--out", required=True)
    rep = sub.add_parser("report", help="the table from runs pays-<setup>-s<seed>/")
    rep.add_argument("runs", type=Path)
    rep.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/hetero-pays")
    ren = sub.add_parser("render", help="the table again from hetero_pays.json")
    ren.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/hetero-pays")
    args = ap.parse_args()
    if args.cmd == "run":
        return run(args)
    if args.cmd == "report":
        args.out.mkdir(parents=True, exist_ok=True)
        return report(args.runs, args.out)
    return render(args.out)


if __name__ == "__main__":
    main()
