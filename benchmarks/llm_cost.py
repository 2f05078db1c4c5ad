"""An LLM device's cost: seconds per local step and peak resident memory of SmolLM2-135M
instruction tuning with LoRA, per memory option, each in a fresh process.

GSM8K prompt/response pairs (chat template), batch 4, every sequence cut (prompt middle
first, `task.data.fit`) and padded to exactly 256 tokens, LoRA on q,k,v,o + MLP. Options:

- `naive`: fp32, the model's own loss (`labels=`): logits for every position x 49,152 tokens.
- `response-logits`: our default: logits only where a response token is predicted.
- `chunked`: + `train.loss-chunk=64` (vocabulary projection 64 tokens at a time).
- `checkpointing`: + `train.gradient-checkpointing=true`.
- `bf16`: + `train.dtype=bfloat16` frozen weights (LoRA stays fp32).

    python benchmarks/llm_cost.py --all              # every option at r=8, best at r=2/16
    python benchmarks/llm_cost.py --render           # llm_cost.md from llm_cost.json
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

from benchmarks.common import (machine_info, machine_line, provenance,  # noqa: E402
                               read_json, run_fresh, write_json)

OPTIONS = {  # name -> run-config overrides (cumulative, as a device would turn them on)
    "naive": {},
    "response-logits": {},
    "chunked": {"train.loss-chunk": 64},
    "checkpointing": {"train.loss-chunk": 64, "train.gradient-checkpointing": True},
    "bf16": {"train.loss-chunk": 64, "train.gradient-checkpointing": True,
             "train.dtype": "bfloat16"},
}
RESULTS = Path(__file__).parent / "results"
PI_RAM_MIB = {"Raspberry Pi 4 (4 GB)": 4096, "Raspberry Pi 5 (8 GB)": 8192}
# what the OS and services leave free on a Pi (Raspberry Pi OS Lite idles at ~200-300 MB)
OS_RESERVE_MIB = 512


def measure(option: str, rank: int, steps: int, batch: int, seq: int, data: str,
            model: str) -> dict:
    import torch

    from task.config import RunConfig
    from task.data import (encode_pairs, load_split_frames, resolve_columns, to_examples)
    from task.families import training_loss
    from task.model import get_lora_model, load_tokenizer, resolve_model_source

    cfg = RunConfig.from_run_config({"model": model, "task": "causal-lm", "strategy": "fedavg",
                                     "lora.fedavg-rank": rank, "train.max-length": seq,
                                     "data.path": data, **OPTIONS[option]})
    frames = load_split_frames(str(Path(data).resolve()), "")
    ex = to_examples(frames["train"], resolve_columns(frames["train"], cfg), ())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    net = get_lora_model(cfg, (), rank)
    load_s = time.perf_counter() - t0
    tok = load_tokenizer(resolve_model_source(cfg.model))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    net.train()
    times, losses, response_tokens = [], [], []
    for i in range(steps + 2):
        sl = slice(i * batch, (i + 1) * batch)
        enc = encode_pairs(tok, ex.texts[sl], ex.responses[sl], cfg)
        pad = seq - enc["input_ids"].shape[1]  # exactly `seq` tokens, as the probe
        enc = {k: torch.nn.functional.pad(v, (0, pad), value=v_pad)
               for (k, v), v_pad in zip(enc.items(), (tok.pad_token_id, 0, -100))}
        response_tokens.append(int((enc["labels"] != -100).sum()))
        t0 = time.perf_counter()
        if option == "naive":
            loss = net(**enc).loss
        else:
            loss = training_loss(cfg, net, enc)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:  # warm-up steps are not timed
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    return {"option": option, "rank": rank, "batch": batch, "seq": seq,
            "overrides": OPTIONS[option], "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_s": load_s,
            "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "step_s_median": statistics.median(times), "step_s": times, "loss": losses,
            "response_tokens_per_batch": statistics.mean(response_tokens),
            "rss_before_model_mib": rss_before / 1024,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "machine": machine_line(machine_info())}


def render(rows: list[dict]) -> str:
    lines = ["| option | rank | s per step (median) | peak RSS MiB | trainable params | "
             "fits a Pi 4 (4 GB) / Pi 5 (8 GB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        fits = " / ".join("yes" if r["peak_rss_mib"] + OS_RESERVE_MIB <= ram else "no"
                          for ram in PI_RAM_MIB.values())
        lines.append(f"| {r['option']} | {r['rank']} | {r['step_s_median']:.2f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['trainable_params']:,} | {fits} |")
    first = rows[0]
    return "\n".join([
        f"SmolLM2-135M-Instruct, GSM8K pairs (chat template), batch {first['batch']} x "
        f"{first['seq']} tokens (about {first['response_tokens_per_batch']:.0f} response tokens "
        "per batch), LoRA on q,k,v,o,gate,up,down; median of the timed steps after 2 warm-up "
        "steps; each row a fresh process.", "",
        f"Machine: {first['machine']}.", "", *lines, "",
        f"\"Fits\": peak RSS + {OS_RESERVE_MIB} MiB for the OS within the board's RAM. Options "
        "are cumulative (each row adds to the one before, from `response-logits` on); "
        "`naive` is the model's own loss with full-vocabulary logits at every position.", "",
        "Command: `python benchmarks/llm_cost.py --all`."])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--option", choices=tuple(OPTIONS), default="response-logits")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                          "data" / "gsm8k"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--all", action="store_true", help="every option at r=8, then the "
                    "last one at r=2 and r=16, each in a fresh process")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.render:
        doc = read_json(args.out / "llm_cost.json")
        (args.out / "llm_cost.md").write_text(render(doc["rows"]) + "\n")
        return
    if not args.all:
        print(json.dumps(measure(args.option, args.rank, args.steps, args.batch, args.seq,
                                 args.data, args.model)))
        return
    runs = [(o, 8) for o in OPTIONS] + [("bf16", 2), ("bf16", 16)]
    rows, started = [], time.perf_counter()
    for option, rank in runs:
        rows.append(run_fresh(__file__, "--option", option, "--rank", str(rank), "--steps",
                              str(args.steps), "--batch", str(args.batch), "--seq",
                              str(args.seq), "--data", args.data, "--model", args.model))
        print(f"{option} r={rank}: {rows[-1]['step_s_median']:.2f} s/step, "
              f"{rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    write_json(args.out / "llm_cost.json", {"rows": rows, **provenance(started)})
    (args.out / "llm_cost.md").write_text(render(rows) + "\n")


if __name__ == "__main__":
    main()
