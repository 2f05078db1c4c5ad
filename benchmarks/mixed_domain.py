"""A mixed-domain federation (FlowerTune-style) on a real LLM: devices hold GSM8K (maths,
worked answers), Code Alpaca (code) or AG News posed as an instruction (topic by label-word
likelihood); one global adapter is trained over all of them.

Per domain, the global adapter is compared with the zero-shot model and with the domain
trained alone (a federation of that domain's devices only, the same steps per device).
Metrics: AG News accuracy (label likelihood), GSM8K answer NLL per token and greedy exact
match on the final `#### number`, Code Alpaca answer NLL per token.

The federation runs in-process with the functions the Flower apps call (as quality.py):

    python benchmarks/mixed_domain.py --model smollm2-135m-instruct --setups federated
    python benchmarks/mixed_domain.py --setups alone-gsm8k --out /tmp/m2   # side by side
    python benchmarks/mixed_domain.py --combine /tmp/m1 /tmp/m2 --out benchmarks/results/x
    python benchmarks/mixed_domain.py --render --out benchmarks/results/x
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (machine_line, parse_value, provenance, read_json,  # noqa: E402
                               write_json)
from strategies.lora.math import aggregate  # noqa: E402
from edge_lam.config.run_config import RunConfig  # noqa: E402
from edge_lam.training.device import DeviceInfo, train_round  # noqa: E402
from edge_lam.training.evaluation import ServerModel  # noqa: E402
from edge_lam.training.lora import state_nbytes, truncate_lora  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data
AGNEWS_TEMPLATE = ("What is the topic of this news article: World, Sports, Business or "
                   "Sci/Tech?\n{text}\nAnswer:")
DOMAINS = {  # name -> run-config overrides of that domain's devices and test set
    "gsm8k": {"task": "causal-lm", "data.path": "gsm8k", "train.max-length": 384},
    "code": {"task": "causal-lm", "data.path": "codealpaca", "train.max-length": 384,
             "eval.metric": "nll"},
    "agnews": {"task": "lm-cls", "data.path": "agnews", "data.template": AGNEWS_TEMPLATE,
               "data.label-words": "Business,Sci/Tech,Sports,World"},
}
HEADLINE = {"gsm8k": ("exact_match", "loss"), "code": ("loss",), "agnews": ("accuracy",)}


def domain_configs(base: dict, data_root: Path) -> dict[str, RunConfig]:
    return {d: RunConfig.from_run_config({**base, **over,
                                          "data.path": str(data_root / over["data.path"])})
            for d, over in DOMAINS.items()}


def evaluate_all(servers: dict[str, ServerModel], state) -> dict[str, dict]:
    return {d: {k: v for k, v in s.evaluate(state).items()
                if k in ("accuracy", "loss", "perplexity", "exact_match", "examples")}
            for d, s in servers.items()}


def run(setup: str, cfgs: dict[str, RunConfig], per_domain: int, eval_every: int,
        log, zero_shot: dict | None = None, own_only: bool = False) -> list[dict]:
    """Rounds of a federation of `per_domain` devices per domain (setup 'federated') or of
    one domain's devices alone ('alone-<domain>'), evaluated on every domain's test set."""
    domains = list(cfgs) if setup == "federated" else [setup.removeprefix("alone-")]
    devices = [(d, i) for d in domains for i in range(per_domain)]
    any_cfg = cfgs[domains[0]]
    servers = {d: ServerModel.prepare(c) for d, c in cfgs.items()}
    if setup != "federated" and own_only:  # a domain alone: scored on its own test set
        servers = {d: s for d, s in servers.items() if d in domains}
    state = servers[domains[0]].initial_state()
    ranks = [any_cfg.rank_for(any_cfg.device_for(k)) for k in range(len(devices))]
    # every setup starts from the same initial adapter (B = 0: the base model): evaluate once
    rows = [{"round": 0, "domains": zero_shot or evaluate_all(servers, state), "wall_s": 0.0}]
    if zero_shot is not None:
        rows[0]["domains"] = {d: v for d, v in zero_shot.items() if d in servers}
    log(f"  round 0: {rows[-1]['domains']}")
    for rnd in range(1, any_cfg.num_rounds + 1):
        t0 = time.perf_counter()
        states, counts, clients, sents = [], [], [], []
        for (domain, index), rank in zip(devices, ranks):
            sent = truncate_lora(state, rank)
            info = DeviceInfo(partition_id=index, num_partitions=per_domain)
            cfg = cfgs[domain]
            new, n, m = train_round(cfg, info, servers[domain].label_names, rank, sent, rnd)
            states.append(new)
            sents.append(sent)
            counts.append(n)
            clients.append({"domain": domain, "rank": rank, "num_examples": n,
                            "train_loss": m["train_loss"], "train_s": m["train_s"],
                            "bytes_up": state_nbytes(new)})
        state = aggregate(any_cfg.strategy, state, sents, states, counts, any_cfg.r_max)
        row = {"round": rnd, "clients": clients, "train_wall_s": time.perf_counter() - t0}
        if rnd % eval_every == 0 or rnd == any_cfg.num_rounds:
            row["domains"] = evaluate_all(servers, state)
            log(f"  round {rnd}: {row['domains']}")
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--strategy", default="flexlora")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-domain", type=int, default=3, help="devices per domain")
    ap.add_argument("--local-steps", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--eval-max", type=int, default=300)
    ap.add_argument("--generate", type=int, default=100,
                    help="GSM8K test questions answered greedily for exact match")
    ap.add_argument("--setups", default="federated,alone-gsm8k,alone-code,alone-agnews")
    ap.add_argument("--alone-own-domain", action="store_true",
                    help="score `alone-<domain>` setups on their own domain only (faster)")
    ap.add_argument("--zero-shot-from", type=Path, default=None,
                    help="a mixed_domain.json of the same settings whose round 0 to reuse")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", default="federated",
                    help="the federated setup's column (runs of several strategies combined)")
    ap.add_argument("--data-root", type=Path, default=SHARED,
                    help="folder holding gsm8k/, codealpaca/ and agnews/")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                    "mixed-domain")
    ap.add_argument("--combine", nargs="+", type=Path)
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.render:
        return write_report(args.out)
    if args.combine:
        runs = [read_json(p / "mixed_domain.json") for p in args.combine]
        write_json(args.out / "mixed_domain.json", {
            "machine": runs[0]["machine"], "command": [r["command"] for r in runs],
            "total_s": max(r["total_s"] for r in runs), "args": runs[0]["args"],
            "curves": {k: v for r in runs for k, v in r["curves"].items()}})
        return write_report(args.out)
    started = time.perf_counter()
    base = {"model": args.model, "strategy": args.strategy, "num-server-rounds": args.rounds,
            "train.local-steps": args.local_steps, "eval.max-examples": args.eval_max,
            "eval.generate-examples": args.generate, "data.partitioner": "iid",
            "train.lr": 5e-4, "eval.batch-size": 32}
    for item in args.set:
        key, _, value = item.partition("=")
        base[key] = parse_value(value)
    cfgs = domain_configs(base, args.data_root)
    curves = {}
    zero = None  # round 0 is the same base model for every setup: evaluated once
    if args.zero_shot_from:
        zero = next(iter(read_json(args.zero_shot_from)["curves"].values()))[0]["domains"]
    for setup in args.setups.split(","):
        print(f"{setup}:", flush=True)
        name = args.name if setup == "federated" else setup
        curves[name] = run(setup, cfgs, args.per_domain, args.eval_every,
                           lambda s: print(s, flush=True), zero, args.alone_own_domain)
        if zero is None and set(curves[name][0]["domains"]) == set(cfgs):
            zero = curves[name][0]["domains"]  # a full round 0: the next setups reuse it
        write_json(args.out / "mixed_domain.json", {
            **provenance(started), "args": {k: str(v) if isinstance(v, Path) else v
                                            for k, v in vars(args).items()},
            "base_config": base, "curves": curves})
    write_report(args.out)


def _fmt(metric: str, value: float) -> str:
    return f"{value:.3f}"


def strategies(run: dict) -> str:
    """The strategy of the run, or of each combined run (their commands say)."""
    commands = run["command"] if isinstance(run["command"], list) else [run["command"]]
    found = [c.split("--strategy ")[1].split()[0] for c in commands if "--strategy " in c]
    return ", ".join(dict.fromkeys(found)) or run["args"]["strategy"]


def write_report(out: Path) -> None:
    run = read_json(out / "mixed_domain.json")
    args, curves = run["args"], run["curves"]
    zero = {}  # round 0 of every setup is the base model: merge what each evaluated
    for rows in curves.values():
        zero |= rows[0]["domains"]
    cols = ["zero-shot", *curves]
    lines = [f"Mixed-domain federation: {args['per_domain']} devices per domain (GSM8K, Code "
             f"Alpaca, AG News as an instruction), model {args['model']}, strategy "
             f"{strategies(run)} (device ranks 2/4/8/16 by profile), {args['rounds']} rounds "
             f"x {args['local_steps']} local steps, lr 5e-4; `alone-<domain>`: that domain's "
             "devices only, same steps per device. Test sets: up to "
             f"{args['eval_max']} pairs per domain; GSM8K exact match on {args['generate']} "
             "questions, greedy.", "", f"Machine: {machine_line(run['machine'])}.", "",
             "Commands: " + "; ".join(f"`{c}`" for c in (
                 run["command"] if isinstance(run["command"], list) else [run["command"]]))
             + f"; {run['total_s']:.0f} s.", "",
             "| domain: metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for domain, metrics in HEADLINE.items():
        for metric in metrics:
            if metric not in zero.get(domain, {}):
                continue
            name = {"loss": "answer NLL / token (lower is better)", "exact_match":
                    "exact match", "accuracy": "accuracy"}[metric]
            cells = [_fmt(metric, zero[domain][metric])]
            for rows in curves.values():
                last = [r for r in rows if "domains" in r][-1]["domains"]
                cells.append(_fmt(metric, last[domain][metric]) if domain in last else "-")
            lines.append(f"| {domain}: {name} | " + " | ".join(cells) + " |")
    (out / "mixed_domain.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
