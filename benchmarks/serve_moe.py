"""MoE layers as micro-services (S8), measured: a dense LLM made a mixture of experts without
training (`edge_lam.serving.moe`), its quality at k/E = 25%, 50%, 100% against the dense model in the same
run, and its serving over devices through the real ClientApp (`mode='serve'`,
`serve.kind='moe'`, in-process Flower grid): bytes per layer per token, work per device and
predicted seconds on the simulated fleet, for round-robin, greedy and Lyapunov
drift-plus-penalty scheduling.

Queries: AG News posed as an instruction (`task='lm-cls'`, label-word likelihood, the
template of benchmarks/ensemble.py). Calibration: `--calibration` training texts.
Also measured: random routing at k/E = 50% (same experts, a random k per token), the
baseline that says whether the router matters.

    python benchmarks/serve_moe.py --model smollm2-135m-instruct \
        --data ../shared/data/agnews --queries 150 --experts 8
    python benchmarks/serve_moe.py --render --out benchmarks/results/serve-moe
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # InProcessGrid

from benchmarks.common import RESULTS, machine_line, provenance, read_json, write_json  # noqa
from benchmarks.ensemble import TASKS  # noqa: E402
from edge_lam.config.run_config import RunConfig  # noqa: E402
from edge_lam.training.evaluation import ServerModel  # noqa: E402

NAME = "serve_moe"


def make_config(args, queries: int, top_k: int, scheduler: str = "round-robin",
                out: Path | None = None) -> dict:
    template, words = TASKS["agnews"]
    return {"mode": "serve", "serve.kind": "moe", "task": "lm-cls", "model": args.model,
            "data.path": args.data, "data.template": template, "data.label-words": words,
            "eval.max-examples": queries, "eval.batch-size": args.batch,
            "serve.moe-experts": args.experts, "serve.moe-top-k": top_k,
            "serve.moe-calibration": args.calibration,
            "serve.moe-router-neurons": args.router_neurons, "serve.moe-scheduler": scheduler,
            "serve.fleet": args.fleet, "min-devices": 1, "seed": args.seed,
            "results-dir": str(out or tempfile.gettempdir())}


def quality(args) -> tuple[dict, list[dict]]:
    """The dense model and the MoE at each k, on the same queries."""
    import edge_lam.serving.moe as moe_mod
    from server_app.serve.moe import label_logits, moe_model
    from server_app.serve.moe import quality as score

    cfg = RunConfig.from_run_config(make_config(args, args.queries, args.experts))
    task = ServerModel.prepare(cfg, with_model=False)
    truth = np.asarray(task.test.labels)
    started = time.perf_counter()
    tokenizer, model, plan = moe_model(cfg, task.label_names)
    plan_s = time.perf_counter() - started
    start = time.perf_counter()
    dense = label_logits(model, [], tokenizer, cfg, task.test)
    base = {**score(dense, truth), "seconds": time.perf_counter() - start,
            "plan_seconds": plan_s, "queries": len(truth)}
    print(f"dense: {base}", flush=True)
    layers = moe_mod.moefy(model, plan, args.experts)
    neurons = plan.assignment.shape[1]
    rows = []
    for k in sorted({max(1, args.experts // 4), max(1, args.experts // 2), args.experts}):
        for layer in layers:
            layer.top_k = k
        start = time.perf_counter()
        logits = label_logits(model, layers, tokenizer, cfg, task.test)
        rows.append({"top_k": k, "ratio": k / args.experts, "router": "representatives",
                     **score(logits, truth), "seconds": time.perf_counter() - start,
                     "ffn_flops_ratio": moe_mod.ffn_flops_ratio(
                         args.experts, k, args.router_neurons, neurons),
                     "max_logit_diff_vs_dense": float(np.abs(logits - dense).max()),
                     "agreement_with_dense": float((logits.argmax(1) == dense.argmax(1)).mean())})
        print(rows[-1], flush=True)
    rows.append(random_routing(args, model, layers, tokenizer, cfg, task, dense, truth))
    rows.append(oracle_routing(args, model, layers, tokenizer, cfg, task, dense, truth))
    return base, rows


def oracle_routing(args, model, layers, tokenizer, cfg, task, dense, truth) -> dict:
    """k = E / 2: each token's experts of largest output norm ||y_e(x)||, found by computing
    all E (no saving): the best any router could do with these experts."""
    from server_app.serve.moe import label_logits
    from server_app.serve.moe import quality as score
    from edge_lam.serving.moe import expert_output

    k = max(1, args.experts // 2)

    saved = [layer.experts for layer in layers]

    def oracle(layer, x, mask):
        act = layers[layer].act
        outs = torch.stack([expert_output(x, w, act) for w in saved[layer]], 1)  # (N, E, H)
        best = torch.topk(outs.norm(dim=-1), k, dim=-1).indices  # (N, k)
        keep = torch.zeros(outs.shape[:2], dtype=torch.bool).scatter_(1, best, True)
        return (outs * (keep & mask.any(1, keepdim=True))[..., None]).sum(1)

    for layer in layers:
        layer.experts, layer.runner = None, oracle
    try:
        logits = label_logits(model, layers, tokenizer, cfg, task.test)
    finally:
        for layer, experts in zip(layers, saved):
            layer.experts, layer.runner = experts, None
    return {"top_k": k, "ratio": k / args.experts, "router": "oracle (output norm)",
            **score(logits, truth),
            "max_logit_diff_vs_dense": float(np.abs(logits - dense).max()),
            "agreement_with_dense": float((logits.argmax(1) == dense.argmax(1)).mean())}


def random_routing(args, model, layers, tokenizer, cfg, task, dense, truth) -> dict:
    """k = E / 2 experts per token drawn at random (seeded): the router's baseline."""
    import edge_lam.serving.moe as moe_mod
    from server_app.serve.moe import label_logits
    from server_app.serve.moe import quality as score

    k = max(1, args.experts // 2)
    for layer in layers:
        layer.top_k = k
    real = moe_mod.router_scores
    gen = torch.Generator().manual_seed(args.seed)
    moe_mod.router_scores = lambda x, gate, up, act, scale: torch.rand(
        len(x), len(scale), generator=gen)
    try:
        logits = label_logits(model, layers, tokenizer, cfg, task.test)
    finally:
        moe_mod.router_scores = real
    return {"top_k": k, "ratio": k / args.experts, "router": "random", **score(logits, truth),
            "max_logit_diff_vs_dense": float(np.abs(logits - dense).max()),
            "agreement_with_dense": float((logits.argmax(1) == dense.argmax(1)).mean())}


def serving(args) -> dict:
    """`mode='serve'` with serve.kind='moe' through the real ClientApp on `--devices` in-process
    devices, per scheduler; the logits checked against the single-process MoE."""
    from flwr.app import Context, RecordDict
    from inprocess_grid import InProcessGrid

    from server_app.serve import mode
    from server_app.serve.moe import label_logits, moe_model
    from edge_lam.serving.moe import MoEPlan, moefy

    k = max(1, args.experts // 2)
    out = {"queries": args.serve_queries, "top_k": k, "devices": args.devices,
           "schedulers": []}
    runs = Path(tempfile.mkdtemp(prefix="serve-moe-"))  # plans and logits: not kept
    for i, scheduler in enumerate(("round-robin", "greedy", "lyapunov")):
        raw = make_config(args, args.serve_queries, k, scheduler, runs)
        cfg = RunConfig.from_run_config(raw)
        ctx = Context(run_id=i + 1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=raw)
        start = time.perf_counter()
        run_dir = mode.run(InProcessGrid(raw, num_nodes=args.devices), ctx, cfg)
        rep = json.loads((run_dir / "serve_moe.json").read_text())
        rep["wall_seconds"] = time.perf_counter() - start
        out["schedulers"].append({key: rep[key] for key in (
            "scheduler", "accuracy", "nll", "fleet", "bytes_per_layer_token",
            "dense_bytes_per_layer_token", "bytes_per_slot", "plan_bytes", "messages",
            "slots", "tokens_per_device", "pairs_per_device", "predicted_expert_s",
            "pair_seconds", "server_params", "expert_params", "wall_seconds")})
        print(out["schedulers"][-1], flush=True)
    task = ServerModel.prepare(cfg, with_model=False)
    tokenizer, model, _ = moe_model(cfg, task.label_names)
    layers = moefy(model, MoEPlan.from_arrays(dict(np.load(run_dir / "moe_plan.npz"))), k)
    local = label_logits(model, layers, tokenizer, cfg, task.test)
    out["max_logit_diff_vs_local"] = float(np.abs(
        np.load(run_dir / "serve_moe_logits.npy") - local).max())
    shutil.rmtree(runs, ignore_errors=True)
    return out


def render(res: dict) -> str:
    a, d = res["args"], res["dense"]
    lines = [f"# MoE layers as micro-services (S8): {a['model']}, AG News", "",
             f"{d['queries']} test queries posed as an instruction (label-word likelihood); "
             f"each FFN split into E = {a['experts']} experts by balanced k-means of its "
             f"neurons' activations on {a['calibration']} training texts; router: "
             f"{a['router_neurons']} representative neurons per expert. No training. "
             f"Seed {a['seed']}.", "",
             "| model | k / E | accuracy | NLL | agreement with dense | max logit diff | "
             "FFN FLOPs vs dense | seconds |", "|---|---|---|---|---|---|---|---|",
             f"| dense | - | {d['accuracy']:.3f} | {d['nll']:.3f} | 1.000 | 0 | 1.000 | "
             f"{d['seconds']:.1f} |"]
    for r in res["quality"]:
        flops = f"{r['ffn_flops_ratio']:.3f}" if "ffn_flops_ratio" in r else "-"
        secs = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        lines.append(f"| MoE, {r['router']} router | {r['top_k']}/{a['experts']} | "
                     f"{r['accuracy']:.3f} | {r['nll']:.3f} | {r['agreement_with_dense']:.3f} | "
                     f"{r['max_logit_diff_vs_dense']:.2g} | {flops} | {secs} |")
    s = res["serving"]
    lines += ["", f"Serving (`mode='serve'`, `serve.kind='moe'`, real ClientApp in process): "
              f"{s['queries']} queries, k = {s['top_k']}, {s['devices']} devices; logits vs "
              f"the single-process MoE: max difference {s['max_logit_diff_vs_local']:.2g}.", "",
              "| scheduler | bytes / layer / token | (dense FFN remote) | bytes / slot | "
              "plan bytes (once) | tokens per device | predicted expert s (fleet) |",
              "|---|---|---|---|---|---|---|"]
    for r in s["schedulers"]:
        lines.append(f"| {r['scheduler']} | {r['bytes_per_layer_token']:.0f} | "
                     f"{r['dense_bytes_per_layer_token']} | {r['bytes_per_slot']:.0f} | "
                     f"{r['plan_bytes']} | {', '.join(map(str, r['tokens_per_device']))} | "
                     f"{r['predicted_expert_s']:.3f} |")
    r = s["schedulers"][0]
    lines += ["", f"Fleet: {', '.join(r['fleet'])}. The server keeps "
              f"{r['server_params'] / 1e6:.1f} M parameters; the experts "
              f"({r['expert_params'] / 1e6:.1f} M) live on the devices. "
              "Bytes: wire bytes (serialised as Flower sends them, .npy headers included) of "
              "the float32 hidden states down and the partial sums up, plus a 1-byte mask per "
              "token and hosted expert; a token goes once to each device that hosts any of "
              "its experts.", "",
              f"Machine: {machine_line(res['machine'])}.", "",
              f"Command: `{res['command']}`; {res['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["quality"] if r["router"] == "representatives"]
    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    for i, key in enumerate(("accuracy", "nll")):
        ax[i].plot([r["ratio"] for r in rows], [r[key] for r in rows], "o-", label="MoE")
        ax[i].axhline(res["dense"][key], color="k", ls="--", label="dense")
        ax[i].set_xlabel("k / E")
        ax[i].set_ylabel(key)
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                         "data" / "agnews"))
    p.add_argument("--queries", type=int, default=150)
    p.add_argument("--serve-queries", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--calibration", type=int, default=64)
    p.add_argument("--router-neurons", type=int, default=8)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--fleet", default="rpi4,rpi5,jetson-orin-nano,laptop")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "serve-moe"))
    p.add_argument("--render", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    if args.render:
        res = read_json(out / f"{NAME}.json")
    else:
        started = time.perf_counter()
        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        dense, rows = quality(args)
        serve = serving(args)
        res = {"args": vars(args), "dense": dense, "quality": rows, "serving": serve,
               **provenance(started)}
        write_json(out / f"{NAME}.json", res)
        plot(res, out)
    (out / f"{NAME}.md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    main()
