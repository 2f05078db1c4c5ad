"""Layer-partitioned split inference (S8), measured: the DP's plan per fleet, its predicted
latency against the best single device and a naive even split, and the chosen plan run for
real through Flower messages (the real ClientApp in this process, `InProcessGrid`) against
the whole model run locally, on the same batches, in the same process.

Per batch shape (B x T random token ids, seeded) the server's own code times every unit
(embedding, each decoder layer, head: `server_app.serve.split.measure_costs`), then for
each fleet plans (`split_plan.choose`, 'dp' with the single-device fallback) and runs the
plan's ranges on the simulated devices (`server_app.serve.split.run_batch`). Predicted
seconds use the fleet's speeds and links (`server_app.serve.fleet`); measured seconds are
on THIS machine, where every "device" is this process: their difference from the local
whole-model time is the cost of the message hops (serialisation and copies, no network).
Fleets: 4 x rpi4; the same with a forced even 4-way split; rpi4 + rpi5 + laptop; a laptop
with room for 60% of the model + an rpi5; 4 devices that each hold about a third of the
model (no single device fits). The anchor table predicts even splits over 1-8 rpi4s.

    python benchmarks/serve_split.py                       # SmolLM2-135M, 1x128 and 8x128
    python benchmarks/serve_split.py --render
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_line, provenance, read_json, write_json  # noqa: E402
from server_app.serve.fleet import PROFILES, ServeDevice, fleet  # noqa: E402
from server_app.serve.split import measure_costs, run_batch  # noqa: E402
from server_app.serve.split_plan import (MIB, choose, even_segments,  # noqa: E402
                                         fixed_plan, plan_seconds)
from edge_lam.config.options import ConfigError  # noqa: E402
from edge_lam.config.run_config import RunConfig  # noqa: E402
from edge_lam.serving.layers import unit_names  # noqa: E402
from edge_lam.models.lora_model import resolve_model_source  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "serve-split"


def fleets(costs) -> list[tuple[str, list[ServeDevice], str]]:
    """(name, devices, plan how) for one batch shape; memories scaled to the model."""
    whole = costs.segment_bytes(0, costs.n)  # parameters + activations, tied once
    biggest = max(costs.param_bytes)
    third = (biggest + (whole - costs.work_bytes - biggest) / 3 + costs.work_bytes) / MIB
    rpi4 = fleet(["rpi4"] * 4)
    low = ServeDevice("laptop-lowmem", PROFILES["laptop"].speed, 0.6 * whole / MIB,
                      900, 900, 0.001)
    tight = [ServeDevice(f"small-{i}", PROFILES["rpi4"].speed, third, 80, 100, 0.004)
             for i in range(4)]
    return [("4 x rpi4", rpi4, "dp"),
            ("4 x rpi4, even split", rpi4,
             ",".join(f"{s.device}:{s.start}-{s.end}" for s in even_segments(costs.n,
                                                                             [0, 1, 2, 3]))),
            ("rpi4 + rpi5 + laptop", fleet(["rpi4", "rpi5", "laptop"]), "dp"),
            ("laptop (60% of model fits) + rpi5", [low, PROFILES["rpi5"]], "dp"),
            ("tight memory", tight, "dp")]


def run_fleet(model, costs, batches, name, devices, how, model_name) -> dict:
    from inprocess_grid import InProcessGrid  # the real ClientApp, in this process

    plan, compared = choose(costs, devices, how)
    raw = {"mode": "serve", "serve.kind": "split", "model": model_name, "task": "causal-lm"}
    grid = InProcessGrid(raw, num_nodes=len(devices))
    cfg = RunConfig.from_run_config(raw)
    nodes = grid.get_node_ids()
    runs = [run_batch(grid, cfg, nodes, plan, model, ids, mask, None) for ids, mask in batches]
    steady = runs[1:] or runs
    try:
        even = fixed_plan(costs, devices, even_segments(costs.n, list(range(len(devices)))))
    except ConfigError:  # an even share does not fit some device's memory
        even = None
    names = unit_names(model.config)
    return {
        "fleet": name, "how": plan.how, "fallback": bool(compared.get("fallback", False)),
        "segments": [{"device": devices[s.device].name, "units": [names[s.start],
                                                                  names[s.end - 1]],
                      "start": s.start, "end": s.end} for s in plan.segments],
        "chosen_s": plan.seconds, "dp_s": compared.get("dp"), "single_s": compared["single"],
        "even_s": even.seconds if even else None,
        "measured_split_s": float(np.mean([r["split_s"] for r in steady])),
        "measured_local_s": float(np.mean([r["local_s"] for r in steady])),
        "measured_hop_overhead_s": float(np.mean([r["overhead_s"] for r in steady])),
        "max_abs_logit_diff": max(r["diff"] for r in runs),
        "held_bytes": [h["param_bytes"] for h in runs[0]["hops"]],
        "hop_bytes": [[h["bytes_in"], h["bytes_out"]] for h in runs[0]["hops"]],
        "whole_model_bytes": costs.segment_bytes(0, costs.n) - costs.work_bytes}


def anchor(costs) -> list[dict]:
    """Predicted latency of an even split over k rpi4s (distributed-llama's Pi 4 setting)."""
    out = []
    for k in (1, 2, 4, 8):
        devices = fleet(["rpi4"] * k)
        segs = even_segments(costs.n, list(range(k)))
        out.append({"devices": k, "predicted_s": plan_seconds(costs, devices, tuple(segs))})
    return out


def measure(args) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    source = resolve_model_source(args.model)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    rng = np.random.default_rng(args.seed)
    shapes = []
    for shape in args.shapes.split(","):
        b, t = (int(x) for x in shape.split("x"))
        batches = [(torch.from_numpy(rng.integers(0, model.config.vocab_size, (b, t))),
                    torch.ones(b, t, dtype=torch.long)) for _ in range(args.batches)]
        costs = measure_costs(model, batches[0], None, args.repeats)
        rows = [run_fleet(model, costs, batches, name, devices, how, args.model)
                for name, devices, how in fleets(costs)]
        for r in rows:
            print(f"{shape} {r['fleet']}: {r['how']} predicted {r['chosen_s']:.3f} s, measured "
                  f"{r['measured_split_s']:.3f} s vs local {r['measured_local_s']:.3f} s",
                  flush=True)
        shapes.append({"shape": shape, "unit_seconds": list(costs.seconds),
                       "unit_param_bytes": list(costs.param_bytes),
                       "boundary_bytes": list(costs.boundary_bytes),
                       "work_bytes": costs.work_bytes, "fleets": rows, "anchor": anchor(costs)})
    return {"model": args.model, "layers": model.config.num_hidden_layers, "seed": args.seed,
            "batches": args.batches, "repeats": args.repeats, "shapes": shapes}


def _s(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def render(res: dict) -> str:
    lines = [f"# Split inference (S8): {res['model']} ({res['layers']} layers)", "",
             f"Machine: {machine_line(res['machine'])}.", f"Command: `{res['command']}`; "
             f"seed {res['seed']}, {res['batches']} batches per fleet (first excluded from the "
             f"measured means: devices load their units), unit times: median of "
             f"{res['repeats']}.", "",
             "Predicted seconds per batch are for the simulated fleet (speeds and links of "
             "`server_app/serve/fleet.py`). Measured seconds are on this machine, where every "
             "device is this process, so they cannot show the fleet's speeds; the hop "
             "overhead is measured directly: each hop's wall time (building the message, "
             "the ClientApp decoding it, encoding the reply, the server decoding it) minus "
             "the device's compute, summed over the hops of a batch (no network). Split vs "
             "local differences beyond that are noise of a shared 2-core machine.", ""]
    for shape in res["shapes"]:
        lines += [f"## Batch {shape['shape']} (B x T tokens)", "",
                  "| fleet | plan | predicted s | DP s | best single s | even split s | "
                  "measured split s | measured local s | measured hop overhead s | max abs "
                  "logit diff | largest device MiB / whole MiB |", "|" + "---|" * 11]
        for r in shape["fleets"]:
            plan = " -> ".join(f"{s['device']}[{s['units'][0]}..{s['units'][1]}]"
                               for s in r["segments"])
            how = r["how"] + (" (fallback)" if r["fallback"] else "")
            lines.append(
                f"| {r['fleet']} | {how}: {plan} | {_s(r['chosen_s'])} | {_s(r['dp_s'])} | "
                f"{_s(r['single_s'])} | {_s(r['even_s'])} | {r['measured_split_s']:.3f} | "
                f"{r['measured_local_s']:.3f} | {r['measured_hop_overhead_s']:.4f} | "
                f"{r['max_abs_logit_diff']:.1e} | "
                f"{max(r['held_bytes']) / MIB:.0f} / {r['whole_model_bytes'] / MIB:.0f} |")
        lines += ["", "Even split over k Raspberry Pi 4 (predicted s per batch): " + ", ".join(
            f"{a['devices']}: {a['predicted_s']:.3f}" for a in shape["anchor"]), ""]
    lines.append(f"Total: {res['total_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Predicted seconds per batch: chosen plan, best single device, even split, per fleet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = res["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = shape["fleets"]
        x = np.arange(len(rows))
        for k, (key, label) in enumerate((("chosen_s", "chosen plan"),
                                           ("single_s", "best single device"),
                                           ("even_s", "even split"))):
            ax.bar(x + (k - 1) * 0.27, [r[key] or 0.0 for r in rows], 0.27, label=label)
        ax.set_xticks(x, [r["fleet"].replace(" (", "\n(") for r in rows], fontsize=7,
                      rotation=20)
        ax.set_ylabel("predicted s per batch (0: does not fit)")
        ax.set_title(f"{res['model']}, batch {shape['shape']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--shapes", default="1x128,8x128", help="B x T batch shapes")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if not args.render:
        started = time.perf_counter()
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        res = measure(args)
        res.update(provenance(started))
        write_json(args.out / "serve_split.json", res)
    res = read_json(args.out / "serve_split.json")
    (args.out / "serve_split.md").write_text(render(res))
    plot(res, args.out / "serve_split.png")
    print(json.dumps({"out": str(args.out)}))


if __name__ == "__main__":
    main()
