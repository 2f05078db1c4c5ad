"""Lyapunov drift-plus-penalty scheduling of MoE experts over edge devices (S8), measured.

A synthetic fleet of `server_app.serve.fleet` profiles (default 2 x rpi4, rpi5,
jetson-orin-nano, laptop) serves E experts, each on `--replicas` devices (striped, so each
device holds at most ceil(E x replicas / D) experts). Per slot (1 s):
- demand: n(t) ~ Poisson tokens routed top-2 over experts with Zipf(1) popularity (a random
  permutation per seed): a(t) ~ Multinomial(2 n(t), p); the mean is `--load` x the largest
  demand the fleet can serve on average while device `--fail` is down (`capacity_margin`,
  the LP over mean rates), so a good schedule stays stable through the failure;
- speed: mu_d(t) = nominal_d x (1 + 0.3 sin(2 pi t / 500 + phi_d)) x throttle_d(t), the
  throttle a Markov chain (1 -> 0.5 with probability 0.005 per slot, back with 0.02);
- failure: device `--fail` (a Jetson) is dead for slots [0.4 T, 0.55 T): capacity 0, never
  assigned; tokens already on it wait for it.
- cost: energy, watts x seconds per token (`lyapunov.WATTS`), J per token.
Every scheduler sees the same trace (per seed): drift-plus-penalty (`linear` and `quadratic`
objectives) for each V, and the baselines cheapest, fastest, random, round robin. C*: the LP
optimum over the trace's mean demand and mean capacities, with rates per pattern of alive
devices (none on the dead one while it is dead); B = 1/2 mean sum_d (A_d^2 + S_d^2)
measured in the run, so the bound is C* + B / V. Late: tokens not computed within
`--deadline` slots. The state machine: every run starts with empty queues; seeds 0, 1, 2.

    python benchmarks/serve_lyapunov.py                   # 10,000 slots, 3 seeds
    python benchmarks/serve_lyapunov.py --render --out benchmarks/results/serve-lyapunov
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, machine_line, provenance, read_json, write_json  # noqa: E402
from server_app.serve.fleet import fleet  # noqa: E402
from server_app.serve.lyapunov import (BASELINES, OBJECTIVES, BaselineScheduler,  # noqa: E402
                                       LyapunovScheduler, capacity_margin, energy_costs,
                                       late_tokens, optimal_average_cost, simulate,
                                       striped_hosts)

FLEET = ["rpi4", "rpi5", "jetson-orin-nano", "laptop"] * 2
BASE_SECONDS_PER_TOKEN = 0.01  # one expert FFN token on the measuring machine (speed 1.0)


def make_trace(args, seed: int, devices, hosts) -> dict:
    """Demand (T, E), capacity (T, D), alive (T, D) for one seed."""
    rng = np.random.default_rng(seed)
    slots, experts, n = args.slots, hosts.shape[0], len(devices)
    nominal = np.array([d.speed for d in devices]) / BASE_SECONDS_PER_TOKEN  # tokens per slot
    phase = rng.uniform(0, 2 * np.pi, n)
    t = np.arange(slots)[:, None]
    diurnal = 1 + 0.3 * np.sin(2 * np.pi * t / 500 + phase)  # (T, D)
    throttle = np.ones((slots, n))
    state = np.zeros(n, bool)
    for s in range(slots):
        flip = rng.random(n) < np.where(state, 0.02, 0.005)
        state ^= flip
        throttle[s] = np.where(state, 0.5, 1.0)
    alive = np.ones((slots, n), bool)
    if args.fail >= 0:
        alive[int(0.4 * slots):int(0.55 * slots), args.fail] = False
    capacity = np.floor(nominal * diurnal * throttle) * alive
    zipf = 1.0 / np.arange(1, experts + 1)
    popularity = rng.permutation(zipf / zipf.sum())
    window = ~alive.all(1) if (~alive).any() else np.ones(slots, bool)  # the failure window
    theta = capacity_margin(popularity, capacity[window].mean(0), hosts)  # serveable then
    tokens = rng.poisson(args.load * theta / 2, slots)  # router input tokens, top-2
    demand = np.stack([rng.multinomial(2 * k, popularity) for k in tokens]).astype(float)
    return {"demand": demand, "capacity": capacity, "alive": alive, "theta": theta}


def measure(run: dict, trace: dict, c_star: float, deadline: int) -> dict:
    backlog = run["backlog"][1:].sum(1)  # (T,)
    late, judged = late_tokens(run["arrivals"], run["served"], deadline)
    demand = trace["demand"].sum()
    b = 0.5 * float(np.mean((run["arrivals"] ** 2).sum(1) + (trace["capacity"] ** 2).sum(1)))
    half = len(backlog) // 2
    per_slot = trace["demand"].sum(1).mean()  # tokens routed per slot
    return {"cost": float(run["cost"].mean()),
            "excess_pct": 100 * (float(run["cost"].mean()) / c_star - 1),
            "backlog": float(backlog.mean()), "backlog_slots": float(backlog.mean() / per_slot), "max_backlog": float(backlog.max()),
            "final_backlog": float(backlog[-1]),
            "growth": float(np.polyfit(np.arange(half), backlog[-half:], 1)[0]),
            "late_pct": 100 * late / max(judged, 1), "dropped_pct": 100 * float(
                run["dropped"].sum()) / demand, "B": b}


def run_seed(args, seed: int, devices, hosts, cost, spt) -> dict:
    trace = make_trace(args, seed, devices, hosts)
    states, counts = np.unique(trace["alive"], axis=0, return_counts=True)
    c_star, _ = optimal_average_cost(trace["demand"].mean(0), trace["capacity"].mean(0), hosts,
                                     cost, states, counts / counts.sum())
    out = {"seed": seed, "c_star": c_star, "theta": trace["theta"], "runs": []}
    schedulers = [(f"dpp-{obj}", v, lambda o=obj, v=v: LyapunovScheduler(
        devices, hosts, v, cost, spt, objective=o)) for obj in args.objectives for v in args.v]
    schedulers += [(rule, None, lambda r=rule: BaselineScheduler(r, devices, hosts, cost, spt,
                                                                 seed=seed))
                   for rule in BASELINES]
    for name, v, make in schedulers:
        started = time.perf_counter()
        run = simulate(make(), trace["demand"], trace["capacity"], trace["alive"])
        row = {"scheduler": name, "V": v, **measure(run, trace, c_star, args.deadline),
               "seconds": time.perf_counter() - started}
        out["runs"].append(row)
        print(f"seed {seed} {name} V={v}: cost {row['cost']:.3f} (C* {c_star:.3f}) backlog "
              f"{row['backlog']:.0f} max {row['max_backlog']:.0f} late {row['late_pct']:.2f}%",
              flush=True)
    return out


def decision_time(experts: int, devices: int, slots: int = 200) -> dict:
    """Mean milliseconds of one `assign` at E experts x D devices (4 replicas each)."""
    fl = fleet((["rpi4", "rpi5", "jetson-orin-nano", "laptop"] * devices)[:devices])
    cost, spt = energy_costs(fl, BASE_SECONDS_PER_TOKEN)
    hosts = striped_hosts(experts, devices, 4)
    rng = np.random.default_rng(0)
    out = {}
    for obj in OBJECTIVES:
        sched = LyapunovScheduler(fl, hosts, 10.0, cost, spt, objective=obj)
        total = 0.0
        for t in range(slots):
            demand = rng.poisson(50, experts).astype(float)
            alive = rng.random(devices) > 0.05
            started = time.perf_counter()
            sched.assign(t, demand, alive)
            total += time.perf_counter() - started
            sched.observe(t, sched.nominal_service * rng.random(devices))
        out[obj] = 1e3 * total / slots
    return out


def summarise(seeds: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (scheduler, V)."""
    rows = []
    for i, first in enumerate(seeds[0]["runs"]):
        row = {"scheduler": first["scheduler"], "V": first["V"]}
        for key in ("cost", "excess_pct", "backlog", "backlog_slots", "max_backlog", "growth",
                    "late_pct", "dropped_pct", "B"):
            vals = np.array([s["runs"][i][key] for s in seeds])
            row[key], row[key + "_std"] = float(vals.mean()), float(vals.std())
        rows.append(row)
    return rows


def fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def write_report(out: Path) -> None:
    res = read_json(out / "serve_lyapunov.json")
    a, rows = res["args"], res["summary"]
    c_star = float(np.mean([s["c_star"] for s in res["seeds"]]))
    theta = float(np.mean([s["theta"] for s in res["seeds"]]))
    lines = [
        (f"MoE expert scheduling on {len(a['fleet'])} devices ({', '.join(a['fleet'])}), "
         f"{a['experts']} experts x {a['replicas']} replicas, {a['slots']:,} slots of 1 s, "
         f"seeds {', '.join(str(s['seed']) for s in res['seeds'])}; demand at {a['load']:.0%} "
         f"of the largest the fleet can serve while device {a['fail']} is down ({theta:.0f} "
         f"tokens/slot, mean over seeds); device {a['fail']} dead for slots "
         f"[{int(0.4 * a['slots'])}, {int(0.55 * a['slots'])}). Cost = energy, J per slot; "
         f"C* (LP over mean rates, per seed) = {c_star:.2f} J/slot on average. Mean (std) over "
         f"seeds. vs C*: time-average cost / C* - 1; bound: B / V in J/slot; backlog in "
         f"tokens and in slots of demand (total backlog / tokens routed per slot); growth: "
         f"slope of the total backlog over the second half (tokens/slot, ~0 when stable); "
         f"late: tokens not computed within {a['deadline']} slots of arriving."), "",
        ("| scheduler | V | cost J/slot | vs C* % | bound B/V | backlog (tokens) | backlog "
         "(slots) | max backlog | growth | late % | dropped % |"),
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bound = "" if not r["V"] else fmt(r["B"] / r["V"])
        v = "" if r["V"] is None else format(r["V"], "g")
        lines.append(
            f"| {r['scheduler']} | {v} | {r['cost']:.2f} | {r['excess_pct']:+.2f} "
            f"({r['excess_pct_std']:.2f}) | {bound} | {fmt(r['backlog'])} "
            f"({fmt(r['backlog_std'])}) | {r['backlog_slots']:.2f} | {fmt(r['max_backlog'])} | "
            f"{r['growth']:.2f} | {r['late_pct']:.2f} | {r['dropped_pct']:.2f} |")
    dt = res["decision_ms"]
    lines += ["", f"Per-slot decision time at E = {dt['experts']}, D = {dt['devices']}: "
              + ", ".join(f"{k} {dt[k]:.3f} ms" for k in OBJECTIVES) + ".", "",
              (f"Plot: `serve_lyapunov.png`. Machine: {machine_line(res['machine'])}. "
               f"Command: `{res['command']}` ({res['total_s']:.0f} s).")]
    (out / "serve_lyapunov.md").write_text("\n".join(lines) + "\n")


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["summary"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for obj in OBJECTIVES:
        pts = [r for r in rows if r["scheduler"] == f"dpp-{obj}"]
        ax.plot([r["backlog_slots"] for r in pts], [r["excess_pct"] for r in pts], "o-",
                label=f"drift-plus-penalty ({obj}), V = " +
                ", ".join(format(r["V"], "g") for r in pts))
        for r in pts if obj == "quadratic" else []:
            ax.annotate(f"{r['V']:g}", (r["backlog_slots"], r["excess_pct"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 4))
    for r in rows:
        if r["V"] is None:
            ax.plot(r["backlog_slots"], r["excess_pct"], "s", label=r["scheduler"])
    ax.axhline(0.0, ls="--", c="k", lw=1, label="C* (LP optimum)")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(min(r["excess_pct"] for r in rows) * 2 - 0.1,
                max(r["excess_pct"] for r in rows) * 3)
    ax.set_xlabel("time-average backlog (slots of demand)")
    ax.set_ylabel("time-average cost above C* (%)")
    ax.set_title("S8: cost vs backlog as V varies (mean of seeds)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "serve_lyapunov.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=10_000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--load", type=float, default=0.85, help="mean demand / serveable maximum")
    ap.add_argument("--fail", type=int, default=2, help="device dead for 15%% of slots (-1: none)")
    ap.add_argument("--deadline", type=int, default=5, help="slots before a token is late")
    ap.add_argument("--v", type=float, nargs="+",
                    default=[0, 1, 100, 1e3, 1e4, 1e5, 1e6, 1e7])
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    ap.add_argument("--decision-experts", type=int, default=64)
    ap.add_argument("--decision-devices", type=int, default=100)
    ap.add_argument("--out", type=Path, default=RESULTS / "serve-lyapunov")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.render:
        return write_report(args.out)
    started = time.perf_counter()
    devices = fleet(FLEET)
    hosts = striped_hosts(args.experts, len(devices), args.replicas)
    cost, spt = energy_costs(devices, BASE_SECONDS_PER_TOKEN)
    seeds = [run_seed(args, s, devices, hosts, cost, spt) for s in range(args.seeds)]
    dt = decision_time(args.decision_experts, args.decision_devices)
    res = {"args": {**{k: v for k, v in vars(args).items() if k not in ("out", "render")},
                    "fleet": [d.name for d in devices]},
           "cost_per_token": cost.tolist(), "seconds_per_token": spt.tolist(),
           "hosts": hosts.astype(int).tolist(), "seeds": seeds, "summary": summarise(seeds),
           "decision_ms": {"experts": args.decision_experts,
                           "devices": args.decision_devices, **dt}, **provenance(started)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "serve_lyapunov.json", res)
    plot(res, args.out)
    write_report(args.out)
    print((args.out / "serve_lyapunov.md").read_text())


if __name__ == "__main__":
    main()
