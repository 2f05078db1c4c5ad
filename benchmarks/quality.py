"""Quality of fedavg (r=2, r=16), hetlora, flexlora and centralised LoRA (r=16) on AG News.

The federation is driven in-process with the very functions the Flower apps call
(edge_lam.training.device.train_round, strategies.lora.math.AGGREGATORS, edge_lam.training.lora.truncate_lora,
edge_lam.training.evaluation.ServerModel), so it runs anywhere torch runs (a GPU box without Flower
installed, too). Bytes are payload bytes (raw array bytes; see benchmarks/common.py).

    python benchmarks/quality.py --data ../shared/data/agnews --rounds 20 --devices 10
    python benchmarks/quality.py --render      # quality.md + .png again from quality.json
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (machine_line, parse_value, provenance, read_json,  # noqa: E402
                               write_json)
from edge_lam.training.device import DeviceInfo, train_round  # noqa: E402
from edge_lam.training.evaluation import ServerModel  # noqa: E402
from edge_lam.config.run_config import RunConfig  # noqa: E402
from edge_lam.models.families import family  # noqa: E402
from edge_lam.training.lora import (compress_base_deltas, expand_base_deltas,  # noqa: E402
                                    state_nbytes, truncate_lora)
from strategies.lora.diagnostics import aggregation_error  # noqa: E402
from strategies.lora.math import aggregate  # noqa: E402
from strategies.lora.server_opt import ServerOptimizer  # noqa: E402

SETUPS = {  # name -> run-config overrides (`-rlr`: lora.rank-matched-lr, the default)
    "fedavg-r2": {"strategy": "fedavg", "lora.fedavg-rank": 2},
    "fedavg-r16": {"strategy": "fedavg", "lora.fedavg-rank": 16},
    "hetlora": {"strategy": "hetlora", "lora.rank-matched-lr": False},
    "flexlora": {"strategy": "flexlora", "lora.rank-matched-lr": False},
    "rankwise": {"strategy": "rankwise", "lora.rank-matched-lr": False},
    "hetlora-sw": {"strategy": "hetlora-sw", "lora.rank-matched-lr": False},
    "flexlora-delta": {"strategy": "flexlora-delta", "lora.rank-matched-lr": False},
    "flora": {"strategy": "flora", "lora.rank-matched-lr": False},
    "fedex": {"strategy": "fedex", "lora.rank-matched-lr": False},
    # lora.rank-matched-lr: each device learns as standalone LoRA at its own rank's scaling
    "hetlora-rlr": {"strategy": "hetlora", "lora.rank-matched-lr": True},
    "fedex-rlr": {"strategy": "fedex", "lora.rank-matched-lr": True},
    "flora-rlr": {"strategy": "flora", "lora.rank-matched-lr": True},
    "rankwise-rlr": {"strategy": "rankwise", "lora.rank-matched-lr": True},
    "central-r16": {"strategy": "fedavg", "lora.fedavg-rank": 16},
    # issue 27: where rank binds (fedavg and centralised at every rank) ...
    **{f"fedavg-r{r}": {"strategy": "fedavg", "lora.fedavg-rank": r} for r in (4, 8, 32)},
    **{f"central-r{r}": {"strategy": "fedavg", "lora.fedavg-rank": r} for r in (2, 32)},
    # ... and mixed ranks that do not hurt: scaling conventions, exact aggregation with a
    # low-rank downlink, server optimisers, rank warm-up (all with the rank-matched lr)
    "hetlora-rslora": {"strategy": "hetlora", "lora.scaling-rule": "rslora"},
    "fedex-rlr-k16": {"strategy": "fedex", "lora.base-delta-rank": 16},
    "hetlora-fedadam": {"strategy": "hetlora", "lora.server-optimizer": "fedadam",
                        "lora.server-lr": 1e-3},
    "hetlora-fedavgm": {"strategy": "hetlora", "lora.server-optimizer": "fedavgm",
                        "lora.server-momentum": 0.5},
    "hetlora-warmup2": {"strategy": "hetlora", "lora.rank-warmup-rounds": 2},
}


def headline(cfg: RunConfig) -> tuple[str, bool]:
    """(the curve key that measures quality, higher is better): accuracy for classification,
    the answer NLL per response token (`loss`) for `causal-lm`, whose token accuracy is not
    the quality it is trained for."""
    return ("accuracy", True) if family(cfg).labelled else ("loss", False)


def metric_line(cfg: RunConfig, row: dict) -> str:
    key, _ = headline(cfg)
    return f"acc {row['accuracy']:.4f}" if key == "accuracy" else f"nll {row['loss']:.4f}"


def device_ranks(cfg: RunConfig, num_devices: int, rnd: int) -> list[int]:
    """Each device's rank in round `rnd` (the strategy's `rank_of`, with warm-up)."""
    ranks = [cfg.rank_for(cfg.device_for(p)) for p in range(num_devices)]
    if rnd <= cfg.lora.rank_warmup_rounds:
        ranks = [min(ranks)] * num_devices
    return ranks


def federated(cfg: RunConfig, num_devices: int, log, examples=None, steps=None,
              ranks=None) -> list[dict]:
    """The federation in-process: per round, each device gets the global state at its rank
    (base deltas through `lora.base-delta-rank`, as the strategy sends them), trains, and
    the aggregate (then `lora.server-optimizer`) is the new global state. `examples[k]`,
    `steps[k]` and `ranks[k]`: device k's own data, local steps and rank (default: its
    partition, the config's steps, its profile's rank)."""
    task = ServerModel.prepare(cfg)
    state = task.initial_state()
    rows = [{"round": 0, **task.evaluate(state), "wall_s": 0.0}]
    server_opt = ServerOptimizer(cfg)
    for rnd in range(1, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        states, counts, clients, sents = [], [], [], []
        for pid, rank in enumerate(ranks or device_ranks(cfg, num_devices, rnd)):
            sent = truncate_lora(state, rank)
            payload = compress_base_deltas(sent, cfg.lora.base_delta_rank)
            info = DeviceInfo(partition_id=pid, num_partitions=num_devices)
            dcfg = cfg if steps is None else cfg.updated("train", local_steps=steps[pid])
            new, n, m = train_round(dcfg, info, task.label_names, rank,
                                    expand_base_deltas(payload), rnd,
                                    examples=None if examples is None else examples[pid])
            states.append(new)
            sents.append(sent)
            counts.append(n)
            clients.append({"partition_id": pid, "rank": rank, "num_examples": n,
                            "steps": dcfg.train.local_steps,
                            "train_loss": m["train_loss"], "train_s": m["train_s"],
                            "bytes_down": state_nbytes(payload), "bytes_up": state_nbytes(new)})
        aggregated = aggregate(cfg.strategy, state, sents, states, counts, cfg.r_max)
        err = aggregation_error(aggregated, states, counts)
        state = server_opt.step(rnd, state, aggregated)
        row = {"round": rnd, **task.evaluate(state), "wall_s": time.perf_counter() - t0,
               "aggregation_error": err, "clients": clients}
        rows.append(row)
        log(f"  round {rnd}: {metric_line(cfg, row)}"  # None: exact by construction
            + ("" if err is None else f" agg.err {err:.3f}"))
    return rows


def centralised(cfg: RunConfig, num_devices: int, log) -> list[dict]:
    """One model at lora.fedavg-rank on the union of the data, as many steps per round as
    the federation."""
    task = ServerModel.prepare(cfg)
    state = task.initial_state()
    rows = [{"round": 0, **task.evaluate(state), "wall_s": 0.0}]
    steps = cfg.updated("train", local_steps=cfg.train.local_steps * num_devices)
    for rnd in range(1, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        state, n, m = train_round(steps, DeviceInfo(), task.label_names, cfg.lora.fedavg_rank,
                                  state, rnd)
        rows.append({"round": rnd, **task.evaluate(state), "wall_s": time.perf_counter() - t0})
        log(f"  round {rnd}: {metric_line(cfg, rows[-1])}")
    return rows


def summarise(name: str, rows: list[dict], cfg: RunConfig | None = None) -> dict:
    """One setup's numbers. Classification: final and best accuracy (`final_acc`,
    `best_acc`); `causal-lm`: the answer NLL (`final_nll`, `best_nll`, lower is better) and,
    apart, the token accuracy."""
    fed = [r for r in rows if r.get("clients")]
    per_round = lambda key: (sum(sum(c[key] for c in r["clients"]) for r in fed) / len(fed)
                             if fed else 0)
    errs = [r["aggregation_error"] for r in fed if r.get("aggregation_error") is not None]
    out = {"setup": name, "bytes_up_per_round": per_round("bytes_up"),
           "bytes_down_per_round": per_round("bytes_down"),
           "mean_agg_error": sum(errs) / len(errs) if errs else None,
           "wall_s": sum(r["wall_s"] for r in rows)}
    if cfg is not None and headline(cfg)[0] == "loss":
        return {**out, "metric": "nll", "final_nll": rows[-1]["loss"],
                "best_nll": min(r["loss"] for r in rows),
                "final_token_acc": rows[-1]["accuracy"]}
    return {**out, "metric": "accuracy", "final_acc": rows[-1]["accuracy"],
            "best_acc": max(r["accuracy"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="../shared/data/agnews")
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--setups", default="fedavg-r2,fedavg-r16,hetlora,flexlora,central-r16",
                    help=f"comma-separated, of {', '.join(SETUPS)}")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--eval-max", type=int, default=0,
                    help="test texts evaluated each round (0 = the whole test split)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other run-config override, e.g. --set task=lm-cls")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--render", action="store_true",
                    help="only write quality.md and quality.png from --out/quality.json")
    ap.add_argument("--zero-shot", type=float, default=None,
                    help="with --from-logs: the base model's accuracy on the same test texts")
    ap.add_argument("--machine-from", type=Path, default=None,
                    help="with --from-logs: a finished run's quality.json of the same batch "
                         "(its machine and total time)")
    ap.add_argument("--commands", nargs="*", default=[],
                    help="with --from-logs: the commands that wrote the logs")
    ap.add_argument("--from-logs", nargs="+", metavar="SETUP=LOG",
                    help="only write one report into --out from the printed logs of runs cut "
                         "short (accuracy and aggregation error per finished round)")
    ap.add_argument("--combine", nargs="+", metavar="DIR",
                    help="only write one report into --out from the quality.json of runs in "
                         "these folders (setups run as processes side by side)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render:
        return write_report(out)
    if args.from_logs:  # with --combine: finished runs and runs cut short in one report
        return from_logs(out, args, dict(item.split("=", 1) for item in args.from_logs))
    if args.combine:
        return combine(out, [Path(d) for d in args.combine])
    started = time.perf_counter()
    base = {"model": args.model, "data.path": args.data, "num-server-rounds": args.rounds,
            "train.local-steps": args.local_steps, "eval.max-examples": args.eval_max,
            "seed": args.seed, "data.partitioner": "dirichlet", "data.dirichlet-alpha": 0.5}
    for item in args.set:
        key, _, value = item.partition("=")
        base[key] = parse_value(value)
    results, curves = [], {}
    for name in args.setups.split(","):
        cfg = RunConfig.from_run_config({**base, **SETUPS[name]})
        print(f"{name}: r_max={cfg.r_max}", flush=True)
        runner = centralised if name.startswith("central") else federated
        rows = runner(cfg, args.devices, lambda s: print(s, flush=True))
        curves[name] = rows
        results.append(summarise(name, rows, cfg))
        write_json(out / "quality.json", {**provenance(started), "args": vars(args),
                                          "base_config": base, "summary": results,
                                          "curves": curves})
    write_report(out)


ROUND_LINE = re.compile(r"^  round (\d+): acc ([\d.]+)(?: agg\.err ([\d.]+))?")


def from_logs(out: Path, args, logs: dict[str, str]) -> None:
    """quality.json (and report) from the logs of runs stopped before their last round (a
    GPU lease ran out): rounds, accuracy and aggregation error as printed; no bytes or
    times (those are written only when a run finishes). With --combine, the finished runs
    of the same batch come first, as written."""
    finished = [read_json(Path(d) / "quality.json") for d in args.combine or []]
    summary = [dict(s, rounds_done=args.rounds) for r in finished for s in r["summary"]]
    curves = {k: v for r in finished for k, v in r["curves"].items()}
    zero_shot = args.zero_shot
    if zero_shot is None and curves:
        zero_shot = next(iter(curves.values()))[0]["accuracy"]
    for name, log in logs.items():
        rows = [{"round": 0, "accuracy": zero_shot, "wall_s": 0.0,
                 "aggregation_error": None}] if zero_shot is not None else []
        for line in Path(log).read_text().splitlines():
            hit = ROUND_LINE.match(line)
            if hit:
                err = float(hit.group(3)) if hit.group(3) else None
                rows.append({"round": int(hit.group(1)), "accuracy": float(hit.group(2)),
                             "wall_s": 0.0, "aggregation_error": err})
        curves[name] = rows
        errs = [r["aggregation_error"] for r in rows if r["aggregation_error"] is not None]
        summary.append({"setup": name, "final_acc": rows[-1]["accuracy"],
                        "best_acc": max(r["accuracy"] for r in rows),
                        "rounds_done": rows[-1]["round"], "bytes_up_per_round": None,
                        "bytes_down_per_round": None,
                        "mean_agg_error": sum(errs) / len(errs) if errs else None,
                        "wall_s": 0.0})
    source = finished[0] if finished else read_json(args.machine_from)
    write_json(out / "quality.json", {
        "machine": source["machine"], "command": [r["command"] for r in finished] +
        args.commands, "total_s": max([r["total_s"] for r in finished] or
                                      [source["total_s"]]),
        "args": (finished[0]["args"] if finished else
                 {k: v for k, v in vars(args).items() if k not in ("machine_from", "combine")})
        | {"from_logs": logs, "rounds": args.rounds},
        "base_config": finished[0].get("base_config", {}) if finished else {},
        "summary": summary, "curves": curves, "from_logs": True, "zero_shot": zero_shot})
    write_report(out)


def combine(out: Path, parts: list[Path]) -> None:
    """One quality.json (and report) from setups run as separate processes."""
    runs = [read_json(p / "quality.json") for p in parts]
    summary = [s for r in runs for s in r["summary"]]
    curves = {k: v for r in runs for k, v in r["curves"].items()}
    commands = [r["command"] for r in runs]
    write_json(out / "quality.json", {
        "machine": runs[0]["machine"], "command": commands,
        "total_s": max(r["total_s"] for r in runs), "args": runs[0]["args"],
        "base_config": runs[0]["base_config"], "summary": summary, "curves": curves})
    write_report(out)


TITLES = {"agnews": "AG News", "gsm8k": "GSM8K", "codealpaca": "Code Alpaca", "sst2": "SST-2"}


def data_title(path) -> str:
    name = Path(str(path)).name
    return TITLES.get(name, name)


def write_report(out: Path) -> None:
    """quality.md and quality.png, from quality.json alone."""
    run = read_json(out / "quality.json")
    results, curves, args = run["summary"], run["curves"], argparse.Namespace(**run["args"])
    nll = results[0].get("metric") == "nll"  # causal-lm: the answer NLL, lower is better
    name, key = ("answer NLL", "loss") if nll else ("acc", "accuracy")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"{data_title(args.data)}, {args.devices} devices, Dirichlet alpha=0.5, "
             f"{args.rounds} rounds x "
             f"{args.local_steps} local steps (batch {run.get('base_config', {}).get('train.batch-size', 16)}, seed "
             f"{run.get('base_config', {}).get('seed', 42)}), model {args.model}.", "",
             f"Machine: {machine_line(run['machine'])}.", "",
             *([f"Run-config overrides: `{' '.join(args.set)}`.", ""]
               if getattr(args, "set", None) else []),
             "Command" + ("s (side by side): " if isinstance(run.get("command"), list) else ": ")
             + "; ".join(f"`{c}`" for c in (run["command"] if isinstance(run.get("command"),
                                                                            list)
                                            else [run.get("command", "?")]))
             + f"; {run.get('total_s', 0):.0f} s in all (model loading included)"
             + ("" if not any(r["wall_s"] for r in results) else "; per setup: " + ", ".join(
                 f"{r['setup']} {r['wall_s']:.0f} s" for r in results if r["wall_s"])) + ".",
             "",
             *([f"Zero-shot (round 0, the base model): {run['zero_shot']:.4f}.", ""]
               if run.get("zero_shot") is not None else []),
             *([f"Setups with fewer than {args.rounds} `rounds done` were stopped when the GPU "
                "lease ran out: their rows and curves are read from the runs' logs (accuracy "
                "and aggregation error per finished round; no byte counts or times there).",
                ""] if run.get("from_logs") else []),
             f"| setup | rounds done | final {name} | best {name} | payload bytes up / round (all "
             "devices) | payload bytes down / round | mean aggregation error |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        err = "n/a" if r["mean_agg_error"] is None else f"{r['mean_agg_error']:.3f}"
        up, down = r["bytes_up_per_round"], r["bytes_down_per_round"]
        central = r["setup"].startswith("central")
        up = "n/a" if up is None else f"{up / 1e6:.2f} MB" if up else "0 (central)"
        down = "n/a" if down is None else f"{down / 1e6:.2f} MB" if down else "-"
        done = r.get("rounds_done", args.rounds)
        final, best = (r["final_nll"], r["best_nll"]) if nll else (r["final_acc"], r["best_acc"])
        lines.append(f"| {r['setup']} | {done} | {final:.4f} | {best:.4f} | "
                     f"{'0 (central)' if central else up} | {'-' if central else down} | "
                     f"{err} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(7, 4))
    for setup, rows in curves.items():
        ax.plot([r["round"] for r in rows], [r[key] for r in rows], label=setup)
    title = "MiniLM-L6" if "minilm" in args.model.lower() else Path(args.model).name
    ax.set(xlabel="round", ylabel="answer NLL per token (test)" if nll else "test accuracy",
           title=f"{data_title(args.data)}, LoRA on {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120)


if __name__ == "__main__":
    main()
