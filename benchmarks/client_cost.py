"""Client cost: peak resident memory and seconds per local step of one device process.

Trains all-MiniLM-L6-v2 with LoRA at rank 16 (batch 16) in a fresh process, as a device
would, and reports peak RSS (MiB = 2**20 bytes) and the median step time, on batches padded
to 128 tokens (`--padding max`) or cut to their longest text as devices train
(`--padding real`: dynamic padding, at most 128), with the base model's dropout skipped (the
default, `train.base-dropout=false`) or kept (`--base-dropout`). Each run writes
client_cost_r<rank>_<padding>[_dropout].json; client_cost.md is rendered from all of them.

    python benchmarks/client_cost.py --rank 16 --padding max --base-dropout   # the old way
    python benchmarks/client_cost.py --rank 16 --padding real                 # today's device
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_line, provenance, read_json, write_json  # noqa: E402


def measure(rank: int, steps: int, batch: int, seq: int, data: str, model_name: str,
            padding: str = "max", base_dropout: bool = False) -> dict:
    import torch

    from edge_lam.config.run_config import RunConfig
    from edge_lam.data.text import load_split_frames, resolve_columns, to_examples, label_names_of
    from edge_lam.models.lora_model import get_lora_model, load_tokenizer, resolve_model_source

    cfg = RunConfig.from_run_config({"strategy": "fedavg", "lora.fedavg-rank": rank,
                                     "model": model_name, "train.base-dropout": base_dropout})
    frames = load_split_frames(str(Path(data).resolve()), "")
    cols = resolve_columns(frames["train"], cfg)
    labels = label_names_of(frames, cols)
    ex = to_examples(frames["train"], cols, labels)
    rss_before_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = get_lora_model(cfg, labels, rank)
    tok = load_tokenizer(resolve_model_source(cfg.model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    times, lengths = [], []
    pad = {"padding": "max_length"} if padding == "max" else {"padding": True}
    for i in range(steps + 3):
        sl = slice(i * batch, (i + 1) * batch)
        enc = tok(ex.texts[sl], truncation=True, max_length=seq, return_tensors="pt", **pad)
        lengths.append(enc["input_ids"].shape[1])
        t0 = time.perf_counter()
        loss = model(**enc, labels=torch.tensor(ex.labels[sl])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 3:  # warm-up steps are not timed
            times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"rank": rank, "batch": batch, "seq": seq, "padding": padding,
            "base_dropout": base_dropout, "mean_tokens": statistics.fmean(lengths[3:]),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "trainable_params": trainable,
            "s_per_step_median": statistics.median(times), "s_per_step_mean": statistics.mean(times),
            "model": model_name,
            # ru_maxrss is in KiB on Linux: / 1024 gives MiB
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_model_mib": rss_before_model / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--padding", choices=("max", "real"), default="real",
                    help="max: every batch padded to --seq; real: to its longest text")
    ap.add_argument("--base-dropout", action="store_true",
                    help="keep the base model's dropout in training (train.base-dropout)")
    ap.add_argument("--data", default="../shared/data/agnews")
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--render", action="store_true",
                    help="only write client_cost.md from --out/client_cost_r*.json")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.render:
        started = time.perf_counter()
        res = measure(args.rank, args.steps, args.batch, args.seq, args.data, args.model,
                      args.padding, args.base_dropout)
        name = f"client_cost_r{args.rank}_{args.padding}{'_dropout' if args.base_dropout else ''}"
        write_json(out / f"{name}.json", {**provenance(started), **res})
        print(json.dumps(res, indent=2))
    write_report(out)


def write_report(out: Path) -> None:
    """client_cost.md, from the client_cost_r*.json files alone."""
    runs = sorted((read_json(p) for p in out.glob("client_cost_r*.json")),
                  key=lambda r: (r["rank"], r.get("padding", "max") == "real",
                                 not r.get("base_dropout", True)))
    if not runs:
        raise SystemExit(f"no client_cost_r*.json in {out}: run the benchmark first")
    lines = ["| rank | batches (batch x tokens) | base model's dropout | s per step (median) | "
             "peak RSS MiB | RSS before model MiB | trainable params | torch threads |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        tokens = (f"{r['batch']} x {r['seq']} (padded)" if r.get("padding", "max") == "max"
                  else f"{r['batch']} x {r['mean_tokens']:.0f} on average (real lengths)")
        lines.append(f"| {r['rank']} | {tokens} | "
                     f"{'kept' if r.get('base_dropout', True) else 'skipped'} | "
                     f"{r['s_per_step_median']:.2f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['rss_before_model_mib']:.0f} | {r['trainable_params']:,} | "
                     f"{r['threads']} |")
    machines = sorted({machine_line(r["machine"]) for r in runs})
    lines += ["", "Machine: " + "; ".join(machines) + ".", "",
              "Commands (each a fresh process): " + "; ".join(f"`{r['command']}`"
                                                             for r in runs) + "."]
    (out / "client_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
