"""Chain-of-thought steps as micro-services (S8), measured: monolithic vs steps, and placement.

1. The real flow (`server_app.serve.cot.run` through the ClientApp in this process, one
   simulated device per `--fleet` entry, all on this machine): GSM8K test questions answered
   greedily within a budget of `--budget` new tokens, monolithically (one step of the whole
   budget, on the device of least predicted latency) and in steps of each `--step-tokens`
   (budget / k steps, each on a different device, placed by `--placement`). Per run: exact
   match, agreement with the monolithic answer, tokens, steps, prefilled tokens, bytes moved
   (question + chain down, step up, UTF-8), measured seconds here, predicted latency on the
   fleet for every placement method, memory per device (parameters + KV cache of the largest
   context it held) and summed over the devices used. Predictions use the cost profile of
   the first (monolithic) run for every run, so they differ only in what the runs did.
2. Placement on synthetic fleets of `--fleet-sizes` devices (profiles with jittered speed
   and links, `--fleet-trials` each): a chain of `--placement-steps` steps of the smallest
   step size with the measured costs, each device taking at most ceil(S / D) steps, through
   the server relay (as the flow runs) and over direct device links (hand-overs couple the
   steps); exact vs heuristic vs greedy vs random: predicted latency, gap to exact, solver
   seconds. `--placement-only` redoes this part with the costs of an earlier run.

    python benchmarks/serve_cot.py --questions 40 --budget 256 --step-tokens 64,128
    python benchmarks/serve_cot.py --render --out benchmarks/results/serve-cot
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.common import machine_line, provenance, read_json, write_json  # noqa: E402
from server_app.serve import cot  # noqa: E402
from server_app.serve.fleet import PROFILES, ServeDevice  # noqa: E402
from server_app.serve.placement import METHODS, chain_problem, solve  # noqa: E402
from edge_lam.serving.generation import final_number  # noqa: E402

FLEET = "rpi4,rpi4,rpi4,rpi5,rpi5,rpi5,jetson-orin-nano,jetson-orin-nano,laptop,laptop"


def flow_run(args, step_tokens: int, work: Path, context: str = "full"
             ) -> tuple[dict, list[dict]]:
    """One `serve.kind='cot'` run through the ClientApp: (report, per-question rows)."""
    from flwr.app import Context, RecordDict
    from inprocess_grid import InProcessGrid

    from server_app import modes
    from edge_lam.config.run_config import RunConfig

    raw = {"mode": "serve", "serve.kind": "cot", "task": "causal-lm", "model": args.model,
           "data.path": str(args.data), "eval.max-examples": args.questions,
           "seed": args.seed, "serve.fleet": args.fleet, "serve.cot-step-tokens": step_tokens,
           "serve.cot-max-steps": args.budget // step_tokens, "serve.cot-baseline": False,
           "serve.cot-placement": args.placement, "serve.cot-batch-size": args.batch,
           "serve.cot-context": context, "results-dir": str(work)}
    grid = InProcessGrid(raw, num_nodes=len(args.fleet.split(",")))
    ctx = Context(run_id=step_tokens, node_id=0, node_config={}, state=RecordDict(),
                  run_config=raw)
    run_dir = modes.get("serve")(grid, ctx, RunConfig.from_run_config(raw))
    report = json.loads((run_dir / "serve_cot.json").read_text())
    report.pop("run_config")
    rows = [json.loads(x) for x in (run_dir / "serve_cot_questions.jsonl").read_text()
            .splitlines()]
    print(f"k={step_tokens} ({context}): exact match {report['cot']['exact_match']:.3f}, "
          f"{report['wall_s']:.0f} s", flush=True)
    return report, rows


def rescore(report: dict, rows: list[dict], costs: dict, mono_rows: list[dict]) -> dict:
    """The run's numbers with the common cost profile, and its agreement with monolithic."""
    devices = [ServeDevice(**d) for d in report["fleet"]]
    chains = [{"steps": r["steps"]} for r in rows]
    out = {k: report["cot"][k] for k in ("exact_match", "tokens", "steps", "bytes_down",
                                         "bytes_up", "prefill_tokens", "measured_s",
                                         "devices")}
    out["predicted_latency_s"] = {m: cot._mean_latency(costs, devices, chains, tuple(
        report["fleet_names"].index(n) for n in p["devices"]))
        for m, p in report["methods"].items()}
    out["solve_s"] = {m: p["solve_s"] for m, p in report["methods"].items()}
    out["memory"] = cot.memory_use(costs, [r["steps"] for r in rows],
                                   [d.name for d in devices])
    out["same_text_as_monolithic"] = float(np.mean([r["chain"] == m["chain"]
                                                    for r, m in zip(rows, mono_rows)]))
    out["same_answer_as_monolithic"] = float(np.mean(
        [final_number(r["chain"]) == final_number(m["chain"]) for r, m in zip(rows, mono_rows)]))
    return out


def synthetic_fleet(rng: np.random.Generator, size: int) -> list:
    """`size` devices drawn from the profiles, speed and bandwidth jittered x U(0.5, 1.5)."""
    names = list(PROFILES)
    out = []
    for i in range(size):
        base = PROFILES[names[int(rng.integers(len(names)))]]
        j = rng.uniform(0.5, 1.5, 3)
        out.append(replace(base, name=f"{base.name}-{i}", speed=base.speed * j[0],
                           up_mbps=base.up_mbps * j[1], down_mbps=base.down_mbps * j[2]))
    return out


def placement_study(args, costs: dict, shape: dict) -> list[dict]:
    step = min(args.step_tokens_list)
    steps = cot.planned_steps(costs, shape["prompt_tokens"], shape["question_bytes"],
                              shape["bytes_per_token"], step, args.placement_steps)
    return [row for links in ("relay", "direct") for row in
            _placement_rows(args, steps, step, links)]


def _placement_rows(args, steps, step: int, links: str) -> list[dict]:
    out = []
    for size in args.fleet_size_list:
        cap = math.ceil(args.placement_steps / size)
        rows = {m: {"seconds": [], "solve_s": [], "gap": []} for m in METHODS}
        for trial in range(args.fleet_trials):
            rng = np.random.default_rng([args.seed, size, trial])
            problem = chain_problem(steps, synthetic_fleet(rng, size), cap, links)
            got = {m: solve(problem, m, seed=args.seed + trial) for m in METHODS}
            for m, p in got.items():
                rows[m]["seconds"].append(p.seconds)
                rows[m]["solve_s"].append(p.solve_s)
                rows[m]["gap"].append(p.seconds / got["exact"].seconds - 1)
        out.append({"links": links, "devices": size, "steps": args.placement_steps,
                    "step_tokens": step,
                    "device_steps": cap, **{m: {k: float(np.mean(v)) for k, v in r.items()}
                                            | {"gap_max": float(np.max(r["gap"]))}
                                            for m, r in rows.items()}})
        print(f"placement {links} D={size}: " + ", ".join(
            f"{m} {out[-1][m]['seconds']:.2f} s" for m in METHODS), flush=True)
    return out


def write_report(out: Path) -> None:
    res = read_json(out / "serve_cot.json")
    a = res["args"]
    mono = res["runs"][0]
    lines = [f"Chain-of-thought steps as micro-services (S8) on {Path(a['data']).name}: "
             f"{a['questions']} test questions, greedy, a budget of {a['budget']} new tokens, "
             f"model {a['model']}, seed {a['seed']}; fleet `{a['fleet']}`, steps placed "
             f"`{a['placement']}`, each on a different device.", "",
             f"Machine: {machine_line(res['machine'])}.", "",
             f"Command: `{res['command']}`; {res['total_s']:.0f} s. Peak RSS of this process "
             f"(every simulated device shares one model copy): {res['peak_rss_mib']:.0f} MiB.",
             "", "Cost profile (measured here, single stream): prefill "
             f"{1e3 * res['costs']['prefill_s']:.1f} ms + "
             f"{1e3 * res['costs']['prefill_per_token_s']:.2f} ms per context token, "
             f"{1e3 * res['costs']['decode_per_token_s']:.1f} ms per new token; parameters "
             f"{res['costs']['param_bytes'] / 2 ** 20:.0f} MiB, KV cache "
             f"{res['costs']['kv_bytes_per_token'] / 1024:.1f} KiB per token.", "",
             "| step tokens | steps (max) | exact match | same answer as mono | same text | "
             "tokens | prefilled tokens | bytes down + up | measured s (all questions) | "
             "predicted s: exact / heuristic / greedy / random | memory peak / sum MiB "
             "(devices) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        c, p = r["result"], r["result"]["predicted_latency_s"]
        label = f"{r['step_tokens']} (monolithic)" if r["max_steps"] == 1 else \
            f"{r['step_tokens']}" + (" (last step only)" if r.get("context") == "last" else "")
        lines.append(
            f"| {label} | {c['steps']:.2f} ({r['max_steps']}) | {c['exact_match']:.3f} | "
            f"{c['same_answer_as_monolithic']:.3f} | {c['same_text_as_monolithic']:.3f} | "
            f"{c['tokens']:.1f} | {c['prefill_tokens']:.0f} | "
            f"{c['bytes_down'] + c['bytes_up']:.0f} | {c['measured_s']:.1f} | "
            + " / ".join(f"{p[m]:.2f}" for m in METHODS) +
            f" | {c['memory']['peak_mib']:.0f} / {c['memory']['sum_mib']:.0f} "
            f"({c['memory']['devices']}) |")
    m0 = mono["result"]
    lines += ["", "Against monolithic (exact placement): " + "; ".join(
        f"k={r['step_tokens']}{' (last step only)' if r.get('context') == 'last' else ''}: "
        f"latency {_pct(r['result']['predicted_latency_s']['exact'], m0['predicted_latency_s']['exact'])}"
        f", total memory {_pct(r['result']['memory']['sum_mib'], m0['memory']['sum_mib'])}, "
        f"bytes {_pct(r['result']['bytes_down'] + r['result']['bytes_up'], m0['bytes_down'] + m0['bytes_up'])}"
        f", exact match {100 * (r['result']['exact_match'] - m0['exact_match']):+.1f} pt"
        for r in res["runs"][1:]) + ".", ""]
    again = res.get("placement_provenance")
    lines += ["Placement on synthetic fleets (profiles with speed and links x U(0.5, 1.5)), "
              f"{a['fleet_trials']} fleets each, steps of the smallest size with the costs "
              "above; `relay`: through the server (the flow above), `direct`: device to device "
              "(a device running consecutive steps keeps the chain); predicted chain seconds "
              "(mean), gap to exact (mean / max), solver ms (mean)" +
              (f"; redone by `{again['command']}` ({again['total_s']:.0f} s)" if again else "")
              + ":", "",
              "| links | devices | steps | steps per device | " + " | ".join(METHODS) + " |",
              "|---|---|---|---|" + "---|" * len(METHODS)]
    for p in res["placement"]:
        lines.append(f"| {p.get('links', 'relay')} | {p['devices']} | {p['steps']} | "
                     f"{p['device_steps']} | " + " | ".join(
            f"{p[m]['seconds']:.2f} s, +{100 * p[m]['gap']:.1f}% / "
            f"+{100 * p[m]['gap_max']:.1f}%, {1e3 * p[m]['solve_s']:.2f} ms" for m in METHODS)
            + " |")
    (out / "serve_cot.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(res, out / "serve_cot.png")


def plot(res: dict, path: Path) -> None:
    """Left: predicted latency and summed memory per step size; right: placement gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [str(r["step_tokens"]) + (" (mono)" if r["max_steps"] == 1 else
                                       " (last)" if r.get("context") == "last" else "")
              for r in res["runs"]]
    x = np.arange(len(labels))
    left.bar(x - 0.2, [r["result"]["predicted_latency_s"]["exact"] for r in res["runs"]], 0.4,
             label="predicted latency (s)")
    mem = left.twinx()
    mem.bar(x + 0.2, [r["result"]["memory"]["sum_mib"] for r in res["runs"]], 0.4,
            color="tab:orange", label="memory summed over devices (MiB)")
    left.set(xticks=x, xticklabels=labels, xlabel="step tokens", ylabel="seconds per question")
    mem.set_ylabel("MiB")
    left.legend(loc="upper left", fontsize=7)
    mem.legend(loc="upper right", fontsize=7)
    sizes = [p["devices"] for p in res["placement"]]
    for m in METHODS:
        right.plot(sizes, [100 * p[m]["gap"] for p in res["placement"]], "o-", label=m)
    right.set(xlabel="devices in the fleet", ylabel="gap to exact (%, mean)", yscale="symlog",
              title="Placement of 8 steps")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.1f}%" if old else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "gsm8k")
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--budget", type=int, default=256, help="new tokens per question")
    ap.add_argument("--step-tokens", default="64,128", help="step sizes besides monolithic")
    ap.add_argument("--fleet", default=FLEET)
    ap.add_argument("--placement", default="exact", choices=METHODS)
    ap.add_argument("--contexts", default="full", help="serve.cot-context values to run "
                    "the steps with: full (the chain so far), last (the previous step only)")
    ap.add_argument("--batch", type=int, default=20, help="questions per QUERY")
    ap.add_argument("--fleet-sizes", default="3,5,10,20,30")
    ap.add_argument("--fleet-trials", type=int, default=10)
    ap.add_argument("--placement-steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve-cot")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--placement-only", action="store_true",
                    help="redo the placement study with the costs of --out/serve_cot.json")
    args = ap.parse_args()
    if args.render:
        return write_report(args.out)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    args.step_tokens_list = [int(k) for k in args.step_tokens.split(",")]
    args.fleet_size_list = [int(d) for d in args.fleet_sizes.split(",")]
    if args.placement_only:
        res = read_json(args.out / "serve_cot.json")
        res["placement"] = placement_study(args, res["costs"], res["question_shape"])
        res["placement_provenance"] = provenance(started)
        write_json(args.out / "serve_cot.json", res)
        return write_report(args.out)
    work = Path("/tmp") / f"edge-lam-serve-cot-{args.seed}-{args.out.name}"
    runs, mono_rows, chains = [], None, []
    contexts = args.contexts.split(",")
    settings = [(args.budget, "full")] + [(k, c) for k in sorted(args.step_tokens_list,
                                                                 reverse=True)
                                          for c in contexts]
    for k, context in settings:
        report, rows = flow_run(args, k, work, context)
        report["fleet_names"] = [d["name"] for d in report["fleet"]]
        if mono_rows is None:
            mono_rows, costs, shape = rows, report["costs"], report["question_shape"]
        runs.append({"step_tokens": k, "max_steps": args.budget // k, "context": context,
                     "result": rescore(report, rows, costs, mono_rows)})
        chains.append(json.dumps({"step_tokens": k, "context": context,
                                  "chains": [x["chain"] for x in rows],
                                  "references": [x["reference"] for x in rows]}))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chains.jsonl").write_text("\n".join(chains) + "\n")
    placement = placement_study(args, costs, shape)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_json(args.out / "serve_cot.json", {
        **provenance(started), "args": {k: str(v) if isinstance(v, Path) else v
                                        for k, v in vars(args).items()},
        "costs": costs, "question_shape": shape, "peak_rss_mib": peak, "runs": runs,
        "placement": placement})
    write_report(args.out)


if __name__ == "__main__":
    main()
