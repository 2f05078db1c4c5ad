"""Split generation with per-device KV caches (issue 29 item 1), measured over real Flower
QUERY messages (the real ClientApp in this process, `InProcessGrid`).

For each plan (the whole model on one device; even 2- and 3-way splits), greedy generation
of `--new` tokens from random prompts (B x T, seeded) goes down the chain
(`server_app.serve.split.generate_batch`): time to first token (the prompt's pass), decode
seconds per token with the devices' KV caches, the same chain without caches (the whole
sequence again every step, today's split), and the whole model's `generate` here; wire
bytes of the prompt's pass and of a decode step; and whether the tokens equal `generate`'s.
Every "device" is this process: the split's extra time over one range is the hops'
serialisation and the caches' round trip through the Flower context, not a network.

    python benchmarks/split_generate.py                     # SmolLM2-135M
    python benchmarks/split_generate.py --render
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.common import machine_line, provenance, read_json, write_json  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "split-generate"


def run(args) -> None:
    from transformers import AutoModelForCausalLM

    from inprocess_grid import InProcessGrid
    from server_app.serve.split import generate_batch
    from server_app.serve.split_plan import Plan, Segment
    from edge_lam.config.run_config import RunConfig
    from edge_lam.models.lora_model import resolve_model_source

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    source = resolve_model_source(args.model)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    n = model.config.num_hidden_layers + 2
    raw = {"mode": "serve", "serve.kind": "split", "model": args.model, "task": "causal-lm"}
    cfg = RunConfig.from_run_config(raw)
    grid = InProcessGrid(raw, num_nodes=3)
    nodes = grid.get_node_ids()
    rows = []
    for shape in args.shapes.split(","):
        b, t = (int(v) for v in shape.split("x"))
        ids = torch.from_numpy(np.random.default_rng(args.seed).integers(
            0, model.config.vocab_size, (b, t)))
        for parts in (1, 2, 3):
            cuts = [round(n * k / parts) for k in range(parts + 1)]
            text = ",".join(f"{k}:{cuts[k]}-{cuts[k + 1]}" for k in range(parts))
            plan = Plan(tuple(Segment(k, cuts[k], cuts[k + 1]) for k in range(parts)), 0.0,
                        "fixed")
            generate_batch(grid, cfg, nodes, plan, model, ids, 2, f"warm-{shape}-{parts}")
            g = generate_batch(grid, cfg, nodes, plan, model, ids, args.new,
                               f"{shape}-{parts}")
            rows.append({"shape": shape, "devices": parts, "plan": text, **g})
            print(f"{shape} on {parts} device(s): TTFT {g['ttft_s']:.3f} s, "
                  f"{g['tokens_per_s']:.2f} tok/s cached, {g['nocache_tokens_per_s']:.2f} "
                  f"without, {g['local_tokens_per_s']:.2f} local; equal "
                  f"{g['equal_to_generate']}", flush=True)
    payload = {**provenance(started), "model": args.model, "threads": args.threads,
               "new_tokens": args.new, "seed": args.seed, "rows": rows}
    write_json(OUT / "split_generate.json", payload)
    (OUT / "split_generate.md").write_text(render(payload))


def render(p: dict) -> str:
    lines = ["# Split generation with per-device KV caches", "",
             f"Machine: {machine_line(p['machine'])}, {p['threads']} torch thread(s). "
             f"Command: `{p['command']}`. {p['model']}, random prompts (seed {p['seed']}), "
             f"{p['new_tokens']} greedy tokens; every device is this process (Flower "
             "messages through the in-process grid). Rendered from `split_generate.json`.",
             "", "| prompts | devices | ranges | TTFT s | tok/s, KV caches | tok/s, no caches "
             "| tok/s, whole model here | prompt pass bytes | step bytes | = generate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        lines.append(f"| {r['shape']} | {r['devices']} | `{r['plan']}` | {r['ttft_s']:.3f} | "
                     f"{r['tokens_per_s']:.2f} | {r['nocache_tokens_per_s']:.2f} | "
                     f"{r['local_tokens_per_s']:.2f} | {r['prefill_bytes']:,} | "
                     f"{r['step_bytes']:,} | {r['equal_to_generate']} |")
    lines += ["", "tok/s counts every prompt of the batch. Without caches every step "
              "re-runs the whole sequence so far through the chain (timed over the first "
              "4 tokens, when the sequence is shortest: later steps only cost more).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--shapes", default="1x64,4x64")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.render:
        (OUT / "split_generate.md").write_text(render(read_json(OUT / "split_generate.json")))
    else:
        run(args)


if __name__ == "__main__":
    main()
