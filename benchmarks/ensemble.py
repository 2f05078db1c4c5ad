"""Collaborative inference (S8, S6), measured: members alone, every combination method, the
cascade's accuracy-cost curve, and Byzantine members, on labelled queries posed as
instructions (AG News or SST-2, `task='lm-cls'`) or on GSM8K (`task='causal-lm'`: greedy
answers with token log-probabilities, voting on the final number, exact match).

Members: the base LLM, adapters fine-tuned here on different devices' data (each on one
Dirichlet partition, so each is biased toward its device's classes), and optionally a
different LLM (`--other gemma-3-270m`). Each member scores the same queries with the very
function devices run (`edge_lam.serving.answer.label_probabilities`), timed on this machine; the
combination, trust and cascade are `server_app.infer.report.summarise`, as in `mode='infer'`.
Byzantine: the f = floor((M - 1) / 3) members of best calibration quality answer `wrong`
(certainty on a label other than their own best) or at random.

    python benchmarks/ensemble.py --data ../shared/data/agnews --queries 300
    python benchmarks/ensemble.py --data ../shared/data/gsm8k --queries 500 --calibration 100 \
        --adapter-steps 100 --out benchmarks/results/ensemble-gsm8k
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
from server_app.infer.report import Answers, Knobs, generated_votes, summarise  # noqa: E402
from edge_lam.serving.answer import (Member, attacked, attacked_answers, generated_answers,  # noqa: E402
                                     label_probabilities)
from edge_lam.config.run_config import RunConfig  # noqa: E402
from edge_lam.training.device import DeviceInfo, train_round  # noqa: E402
from edge_lam.training.evaluation import ServerModel  # noqa: E402

TASKS = {  # data folder name -> (template, label words)
    "agnews": ("What is the topic of this news article: World, Sports, Business or "
               "Sci/Tech?\n{text}\nAnswer:", "Business,Sci/Tech,Sports,World"),
    "sst2": ("Is the sentiment of this movie review negative or positive?\n{text}\nAnswer:",
             "negative,positive"),
}


def generation(args) -> bool:
    return Path(args.data).name == "gsm8k"


def make_config(args) -> RunConfig:
    if generation(args):  # adapters on one IID partition of 10 each (no labels to skew)
        return RunConfig.from_run_config({
            "model": args.model, "task": "causal-lm", "data.path": args.data,
            "strategy": "fedavg", "lora.fedavg-rank": 8,
            "lora.target-modules": "q_proj,v_proj", "train.lr": 1e-3, "train.batch-size": 8,
            "train.max-length": 384, "train.local-steps": args.adapter_steps,
            "eval.max-examples": args.queries, "eval.max-new-tokens": args.max_new_tokens,
            "infer.batch-size": args.gen_batch or args.batch, "seed": args.seed,
            "data.partitioner": "iid"})
    template, words = TASKS.get(Path(args.data).name, TASKS["agnews"])
    return RunConfig.from_run_config({
        "model": args.model, "task": "lm-cls", "data.path": args.data,
        "data.template": template, "data.label-words": words, "strategy": "fedavg",
        "lora.fedavg-rank": 8, "lora.target-modules": "q_proj,v_proj", "train.lr": 1e-3,
        "train.batch-size": 8, "train.local-steps": args.adapter_steps,
        "eval.max-examples": args.queries, "seed": args.seed,
        "data.partitioner": "dirichlet", "data.dirichlet-alpha": 0.5})


def train_adapters(cfg: RunConfig, task: ServerModel, count: int, out: Path) -> list[Member]:
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
    if cfg.task == "causal-lm":
        return generated_of(cfg, task, members, batch)
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


def generated_of(cfg, task, members: list[Member], batch: int) -> Answers:
    """Every member's greedy answers and confidences (exp of the mean token log-probability),
    timed; `probs` is filled by `generated_votes`."""
    texts, conf, seconds, names = [], [], [], []
    for member in members:
        got, logprobs, cost = generated_answers(cfg, member, task.test.texts)
        texts.append(got)
        conf.append([float(np.exp(np.mean(lp))) if lp else 0.0 for lp in logprobs])
        seconds.append(np.full(len(got), cost["seconds"] / len(got)))
        names.append(member.name)
        print(f"{member.name}: {cost['seconds']:.1f} s, {cost['generated_tokens']} tokens",
              flush=True)
    q = len(task.test)
    return Answers(names, np.zeros((len(members), q, 0)), np.ones((len(members), q), bool),
                   np.stack(seconds), np.arange(q) // batch,
                   texts=np.array(texts, dtype=object), conf=np.array(conf))


def attacked_copy(ans: Answers, bad: list[int], attack: str, seed: int,
                  references: list[str] | None, calibration: int) -> Answers:
    """`ans` with members `bad` answering adversarially (generated answers: colluding on one
    made-up number per query, or each its own random number)."""
    if ans.texts is None:
        probs = ans.probs.copy()
        rng = np.random.default_rng(seed)
        for i in bad:
            probs[i] = attacked(probs[i], attack, rng)
        return Answers(ans.names, probs, ans.valid, ans.seconds, ans.batch_of)
    texts, conf = ans.texts.copy(), ans.conf.copy()
    for i in bad:
        got, lp = attacked_answers(list(texts[i]), [[0.0]] * len(texts[i]), attack,
                                   np.random.default_rng([seed, 7919]),
                                   np.random.default_rng([seed, i]))
        texts[i] = np.array(got, dtype=object)
        conf[i] = np.exp([np.mean(x) for x in lp])
    out = Answers(ans.names, ans.probs, ans.valid, ans.seconds, ans.batch_of, texts=texts,
                  conf=conf)
    generated_votes(out, references, calibration)
    return out


def subset(ans: Answers, keep: list[int], references, calibration: int) -> Answers:
    if ans.texts is None:
        return Answers([ans.names[i] for i in keep], ans.probs[keep], ans.valid[keep],
                       ans.seconds[keep], ans.batch_of)
    out = Answers([ans.names[i] for i in keep], ans.probs[keep], ans.valid[keep],
                  ans.seconds[keep], ans.batch_of, texts=ans.texts[keep], conf=ans.conf[keep])
    generated_votes(out, references, calibration)
    return out


def merge_answers(folders: list[Path], out: Path) -> None:
    """One answers.npz with the members of every folder's, which must have answered the same
    queries (same truth or references, same batches)."""
    runs = [dict(np.load(f / "answers.npz")) for f in folders]
    first = runs[0]
    same = ("references", "batch_of") if "references" in first else ("truth", "batch_of")
    for f, run in zip(folders[1:], runs[1:]):
        for key in same:
            if key not in run or not np.array_equal(run[key], first[key]):
                raise SystemExit(f"{f}/answers.npz answered other queries than "
                                 f"{folders[0]}/answers.npz ({key} differs): merge runs of the "
                                 "same data, --queries and --seed")
    merged = {k: first[k] for k in ("batch_of", "truth", "references") if k in first}
    for key in ("names", "valid", "seconds", "texts", "conf", "probs"):
        if key == "probs" and "texts" in first:  # votes are recomputed from the texts
            merged[key] = np.zeros((len(merged["names"]), len(first["batch_of"]), 0))
        elif key in first:
            merged[key] = np.concatenate([r[key] for r in runs])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **merged)


def byzantine(ans: Answers, truth: np.ndarray, knobs: Knobs, attack: str, seed: int,
              references: list[str] | None = None) -> dict:
    """Clean and attacked method accuracies, the f best-calibrated members attacking
    (generated answers: the truth is re-derived, the attackers' numbers are candidates)."""
    clean = summarise(ans, truth, knobs)
    f = (len(ans.names) - 1) // 3
    if f == 0:
        return {"f": 0, "members": len(ans.names), "attackers": []}
    quality = [m["calibration_accuracy"] for m in clean["members"]]
    bad = [int(i) for i in np.argsort(quality, kind="stable")[::-1][:f]]
    hit_ans = attacked_copy(ans, bad, attack, seed, references, knobs.calibration)
    hit = summarise(hit_ans, truth if ans.texts is None else
                    generated_votes(hit_ans, references, knobs.calibration), knobs)
    keep = [i for i in range(len(ans.names)) if i not in bad]  # the attackers removed
    honest_ans = subset(ans, keep, references, knobs.calibration)
    honest = summarise(honest_ans, truth if ans.texts is None else
                       generated_votes(honest_ans, references, knobs.calibration), knobs)
    return {"f": f, "members": len(ans.names), "attack": attack,
            "attackers": [ans.names[i] for i in bad],
            "clean": {m["method"]: m["accuracy"] for m in clean["methods"]},
            "honest_only": {m["method"]: m["accuracy"] for m in honest["methods"]},
            "attacked": {m["method"]: m["accuracy"] for m in hit["methods"]},
            "trust_after": hit["trust"][-1]}


def _provenance_lines(run: dict) -> list[str]:
    if not run.get("sources"):
        return [f"Machine: {machine_line(run['machine'])}.", "",
                f"Command: `{run['command']}`; {run['total_s']:.0f} s.", ""]
    lines = ["Members answered in separate jobs, then were scored together "
             f"(`{run['command']}`):", ""]
    lines += [f"- {len(src['members'])} member(s) on {machine_line(src['machine'])}: "
              f"`{src['command']}`; {src['total_s']:.0f} s." for src in run["sources"]]
    return lines + [""]


def write_report(out: Path) -> None:
    run = read_json(out / "ensemble.json")
    rep, a = run["report"], run["args"]
    best_member = max(rep["members"], key=lambda m: m["accuracy"])
    best_method = max(rep["methods"], key=lambda m: m["accuracy"])
    cas = rep["cascade"]
    gen = Path(a["data"]).name == "gsm8k"
    metric = "exact match" if gen else "accuracy"
    posed = (f", greedy answers of at most {a.get('max_new_tokens')} tokens, voting on the "
             "final number (exact match)") if gen else " posed as an instruction"
    lines = [f"Collaborative inference on {Path(a['data']).name}{posed}: "
             f"{rep['queries']} test queries ({rep['calibration']} for calibration, the "
             f"others scored), seed {a['seed']}. Members: the base {a['model']}, "
             f"{a['adapters']} adapters fine-tuned here ({a['adapter_steps']} steps each on "
             f"one {'IID' if gen else 'Dirichlet(0.5)'} partition of 10)" +
             (f", and {a['other']}" if a["other"] else "") + ".", "",
             *_provenance_lines(run),
             f"| member or method | {metric} | seconds per query |", "|---|---|---|"]
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
    ap.add_argument("--max-new-tokens", type=int, default=256, help="GSM8K: answer length")
    ap.add_argument("--gen-batch", type=int, default=0,
                    help="GSM8K: prompts generated together (default --batch, the batch "
                         "trust is updated after)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="score the members of several earlier runs' answers.npz together "
                         "(the same queries; members answered in separate jobs)")
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
    references = None
    if args.merge:
        merge_answers(args.merge, args.out / "answers.npz")
    if args.rescore or args.merge:
        saved = np.load(args.out / "answers.npz")
        ans = Answers(list(saved["names"]), saved["probs"], saved["valid"], saved["seconds"],
                      saved["batch_of"])
        truth = saved["truth"]
        if "texts" in saved:  # generated answers: votes again from the texts
            ans.texts, ans.conf = saved["texts"].astype(object), saved["conf"]
            references = [str(r) for r in saved["references"]]
            truth = generated_votes(ans, references, args.calibration)
    else:
        cfg = make_config(args)
        task = ServerModel.prepare(cfg)
        work = Path("/tmp") / f"edge-lam-ensemble-{args.seed}"
        members = [Member(cfg.model)] + train_adapters(cfg, task, args.adapters, work)
        if args.other:
            members.append(Member(args.other))
        ans = answers_of(cfg, task, members, args.batch)
        truth = np.asarray(task.test.labels)
        extra = {}
        if ans.texts is not None:
            references = task.test.responses
            truth = generated_votes(ans, references, args.calibration)
            extra = {"texts": ans.texts.astype(str), "conf": ans.conf,
                     "references": np.array(references)}
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.out / "answers.npz", names=np.array(ans.names),
                            probs=ans.probs, valid=ans.valid, seconds=ans.seconds,
                            batch_of=ans.batch_of, truth=truth, **extra)
    knobs = Knobs(args.calibration)
    report = summarise(ans, truth, knobs)
    report.pop("combined")
    report["members_names"] = ans.names
    report["confidence"] = knobs.confidence
    byz = byzantine(ans, truth, knobs, args.attack, args.seed, references)
    sources = [{"folder": str(f), "members": list(np.load(f / "answers.npz")["names"]),
                **{k: v for k, v in read_json(f / "ensemble.json").items()
                   if k in ("machine", "command", "total_s")}}
               for f in args.merge or [] if (f / "ensemble.json").is_file()]
    write_json(args.out / "ensemble.json", {**provenance(started), "args": {
        k: str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list)
        else v for k, v in vars(args).items()},
        "report": report, "byzantine": byz, **({"sources": sources} if sources else {})})
    from server_app.infer.mode import write_plots

    write_plots(args.out, report, ans.names)
    write_report(args.out)


if __name__ == "__main__":
    main()
