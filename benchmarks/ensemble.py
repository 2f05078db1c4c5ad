"""Collaborative inference (S8, S6), measured: members alone, every combination method, the
cascade's accuracy-cost curve, and Byzantine members, on labelled queries posed as
instructions (AG News or SST-2, `task='lm-cls'`).

Members: the base LLM, adapters fine-tuned here on different devices' data (each on one
Dirichlet partition, so each is biased toward its device's classes), and optionally a
different LLM (`--other gemma-3-270m`). Each member scores the same queries with the very
function devices run (`task.answer.label_probabilities`), timed on this machine; the
combination, trust and cascade are `server_app.infer.report.summarise`, as in `mode='infer'`.
Byzantine: the f = floor((M - 1) / 3) members of best calibration quality answer `wrong`
(certainty on a label other than their own best) or at random.

    python benchmarks/ensemble.py --data ../shared/data/agnews --queries 300
    python benchmarks/ensemble.py --render --out benchmarks/results/ensemble-agnews
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_line, provenance, read_json, write_json  # noqa: E402
from server_app.infer.report import Answers, Knobs, summarise  # noqa: E402
from task.answer import Member, attacked, label_probabilities  # noqa: E402
from task.config import RunConfig  # noqa: E402
from task.device import DeviceInfo, train_round  # noqa: E402
from task.evaluation import ServerTask  # noqa: E402

TASKS = {  # data folder name -> (template, label words)
    "agnews": ("What is the topic of this news article: World, Sports, Business or "
               "Sci/Tech?\n{text}\nAnswer:", "Business,Sci/Tech,Sports,World"),
    "sst2": ("Is the sentiment of this movie review negative or positive?\n{text}\nAnswer:",
             "negative,positive"),
}


def make_config(args) -> RunConfig:
    template, words = TASKS.get(Path(args.data).name, TASKS["agnews"])
    return RunConfig.from_run_config({
        "model": args.model, "task": "lm-cls", "data.path": args.data,
        "data.template": template, "data.label-words": words, "strategy": "fedavg",
        "lora.fedavg-rank": 8, "lora.target-modules": "q_proj,v_proj", "train.lr": 1e-3,
        "train.batch-size": 8, "train.local-steps": args.adapter_steps,
        "eval.max-examples": args.queries, "seed": args.seed,
        "data.partitioner": "dirichlet", "data.dirichlet-alpha": 0.5})


def train_adapters(cfg: RunConfig, task: ServerTask, count: int, out: Path) -> list[Member]:
    """One adapter per device partition (of 10), fine-tuned from the base model alone."""
    members = []
    for k in range(count):
        state, n, metrics = train_round(cfg, DeviceInfo(partition_id=k, num_partitions=10),
                                        task.label_names, cfg.r_max, task.initial_state(), 1)
        folder = task.save_adapter(state, out / f"device{k}" / "adapter")
        print(f"adapter {k}: {n} texts, train loss {metrics['train_loss']:.3f}", flush=True)
        members.append(Member(cfg.model, str(folder)))
    return members


def answers_of(cfg, task, members: list[Member], batch: int) -> Answers:
    probs, seconds, names = [], [], []
    for member in members:
        p, cost = label_probabilities(cfg, member, task.test.texts, task.label_names)
        probs.append(p)
        seconds.append(np.full(len(p), cost["seconds"] / len(p)))
        names.append(member.name)
        print(f"{member.name}: {cost['seconds']:.1f} s", flush=True)
    q = len(task.test)
    return Answers(names, np.stack(probs), np.ones((len(members), q), bool), np.stack(seconds),
                   np.arange(q) // batch)


def byzantine(ans: Answers, truth: np.ndarray, knobs: Knobs, attack: str, seed: int) -> dict:
    """Clean and attacked method accuracies, the f best-calibrated members attacking."""
    clean = summarise(ans, truth, knobs)
    f = (len(ans.names) - 1) // 3
    if f == 0:
        return {"f": 0, "members": len(ans.names), "attackers": []}
    quality = [m["calibration_accuracy"] for m in clean["members"]]
    bad = list(np.argsort(quality)[::-1][:f])
    probs = ans.probs.copy()
    rng = np.random.default_rng(seed)
    for i in bad:
        probs[i] = attacked(probs[i], attack, rng)
    hit = summarise(Answers(ans.names, probs, ans.valid, ans.seconds, ans.batch_of), truth,
                    knobs)
    keep = [i for i in range(len(ans.names)) if i not in bad]  # the attackers removed
    honest = summarise(Answers([ans.names[i] for i in keep], ans.probs[keep], ans.valid[keep],
                               ans.seconds[keep], ans.batch_of), truth, knobs)
    return {"f": f, "members": len(ans.names), "attack": attack,
            "attackers": [ans.names[i] for i in bad],
            "clean": {m["method"]: m["accuracy"] for m in clean["methods"]},
            "honest_only": {m["method"]: m["accuracy"] for m in honest["methods"]},
            "attacked": {m["method"]: m["accuracy"] for m in hit["methods"]},
            "trust_after": hit["trust"][-1]}


def write_report(out: Path) -> None:
    run = read_json(out / "ensemble.json")
    rep, a = run["report"], run["args"]
    best_member = max(rep["members"], key=lambda m: m["accuracy"])
    best_method = max(rep["methods"], key=lambda m: m["accuracy"])
    cas = rep["cascade"]
    lines = [f"Collaborative inference on {Path(a['data']).name} posed as an instruction: "
             f"{rep['queries']} test queries ({rep['calibration']} for calibration, the "
             f"others scored), seed {a['seed']}. Members: the base {a['model']}, "
             f"{a['adapters']} adapters fine-tuned here ({a['adapter_steps']} steps each on "
             "one Dirichlet(0.5) partition of 10)" + (f", and {a['other']}" if a["other"]
                                                      else "") + ".", "",
             f"Machine: {machine_line(run['machine'])}.", "",
             f"Command: `{run['command']}`; {run['total_s']:.0f} s.", "",
             "| member or method | accuracy | seconds per query |", "|---|---|---|"]
    lines += [f"| {m['member']} | {m['accuracy']:.4f} | {m['seconds_per_query']:.4f} |"
              for m in rep["members"]]
    lines += [f"| **{m['method']}** | {m['accuracy']:.4f} | {m['seconds_per_query']:.4f} |"
              for m in rep["methods"]]
    lines += ["", f"Best ensemble: {best_method['method']} {best_method['accuracy']:.4f} vs "
              f"the best member {best_member['accuracy']:.4f} "
              f"({100 * (best_method['accuracy'] - best_member['accuracy']):+.1f} points).", "",
              f"Cascade (members added cheapest first, {rep.get('confidence', 'max')} "
              f"probability): threshold {cas['chosen']['threshold']:.3f} answers "
              f"{cas['chosen']['accuracy']:.4f} at {cas['chosen']['seconds_per_query']:.4f} s "
              f"per query, {100 * cas['chosen']['escalated']:.0f}% of queries escalated, vs "
              f"asking everyone {cas['everyone']['accuracy']:.4f} at "
              f"{cas['everyone']['seconds_per_query']:.4f} s: "
              f"{100 * cas['saved_share']:.0f}% of the compute saved, "
              f"{100 * (cas['chosen']['accuracy'] - cas['everyone']['accuracy']):+.1f} points."]
    byz = run["byzantine"]
    if byz.get("f"):
        lines += ["", f"Byzantine: {byz['f']} of {byz['members']} members answer "
                  f"`{byz['attack']}` (the best calibrated: {', '.join(byz['attackers'])}).",
                  "`honest only`: the same method over the other members, the attackers "
                  "removed (what a perfect defence could keep).", "",
                  "| method | clean | honest only | attacked | attacked - clean | attacked - "
                  "honest only |", "|---|---|---|---|---|---|"]
        lines += [f"| {m} | {byz['clean'][m]:.4f} | {byz['honest_only'][m]:.4f} | "
                  f"{byz['attacked'][m]:.4f} | "
                  f"{100 * (byz['attacked'][m] - byz['clean'][m]):+.1f} pt | "
                  f"{100 * (byz['attacked'][m] - byz['honest_only'][m]):+.1f} pt |"
                  for m in byz["clean"]]
        lines += ["", "Trust after the last batch, attacked: " + ", ".join(
            f"{n} {t:.2f}" for n, t in zip(run["report"]["members_names"],
                                              byz["trust_after"])) + "."]
    (out / "ensemble.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--other", default="", help="a different LLM as one more member")
    ap.add_argument("--data", default="../shared/data/agnews")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--calibration", type=int, default=60)
    ap.add_argument("--adapters", type=int, default=6)
    ap.add_argument("--adapter-steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--attack", default="wrong", choices=("wrong", "random"))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                    "ensemble-agnews")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--rescore", action="store_true",
                    help="score again from --out/answers.npz (the members' saved answers)")
    args = ap.parse_args()
    if args.render:
        return write_report(args.out)
    started = time.perf_counter()
    if args.rescore:
        saved = np.load(args.out / "answers.npz")
        ans = Answers(list(saved["names"]), saved["probs"], saved["valid"], saved["seconds"],
                      saved["batch_of"])
        truth = saved["truth"]
    else:
        cfg = make_config(args)
        task = ServerTask.prepare(cfg)
        work = Path("/tmp") / f"edge-lam-ensemble-{args.seed}"
        members = [Member(cfg.model)] + train_adapters(cfg, task, args.adapters, work)
        if args.other:
            members.append(Member(args.other))
        ans = answers_of(cfg, task, members, args.batch)
        truth = np.asarray(task.test.labels)
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.out / "answers.npz", names=np.array(ans.names),
                            probs=ans.probs, valid=ans.valid, seconds=ans.seconds,
                            batch_of=ans.batch_of, truth=truth)
    knobs = Knobs(args.calibration)
    report = summarise(ans, truth, knobs)
    report.pop("combined")
    report["members_names"] = ans.names
    report["confidence"] = knobs.confidence
    byz = byzantine(ans, truth, knobs, args.attack, args.seed)
    write_json(args.out / "ensemble.json", {**provenance(started), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "report": report, "byzantine": byz})
    from server_app.infer.mode import write_plots

    write_plots(args.out, report, ans.names)
    write_report(args.out)


if __name__ == "__main__":
    main()
