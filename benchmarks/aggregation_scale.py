"""Aggregation at scale (P3): 100 devices' LoRA replies shaped like Qwen2.5-0.5B (hidden 896,
intermediate 4,864, 24 layers, q,k,v,o + gate,up,down; r_max 16: 35.2 MB per device at rank
16), ranks 2/4/8/16 over the devices, aggregated by each method in a fresh process.

Reported per method: seconds, the memory-bandwidth floor (every input byte read once, at the
bandwidth this machine reads a 1 GiB array with numpy), their ratio, and the peak resident
memory above the inputs in units of one rank-16 adapter (the kernel's high-water mark, reset
once the inputs are built).

    python benchmarks/aggregation_scale.py                  # hetlora, flexlora, 100 devices
    python benchmarks/aggregation_scale.py --render
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (machine_info, machine_line, provenance, read_json,  # noqa: E402
                               run_fresh, write_json)

RESULTS = Path(__file__).parent / "results"
HIDDEN, INTER, KV, LAYERS = 896, 4864, 128, 24
MODULES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV),
           "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, INTER),
           "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}  # (d_in, d_out)
RANKS = (2, 4, 8, 16)


def make_states(devices: int, layers: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    states = []
    for k in range(devices):
        r = RANKS[k % len(RANKS)]
        state = {}
        for layer in range(layers):
            for name, (d_in, d_out) in MODULES.items():
                prefix = f"base_model.model.model.layers.{layer}.mlp.{name}" \
                    if name.endswith(("gate_proj", "up_proj", "down_proj")) else \
                    f"base_model.model.model.layers.{layer}.self_attn.{name}"
                state[prefix + ".lora_A.weight"] = rng.standard_normal(
                    (r, d_in), dtype=np.float32) * 0.01
                state[prefix + ".lora_B.weight"] = rng.standard_normal(
                    (d_out, r), dtype=np.float32) * 0.01
        states.append(state)
    return states


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def read_bandwidth() -> float:
    """Bytes per second at which numpy reads a 1 GiB float32 array (best of 3)."""
    data = np.ones(1 << 28, dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - t0)
    return data.nbytes / best


def measure(method: str, devices: int, layers: int) -> dict:
    import torch  # noqa: F401  (loaded before the clock, as in the server, which evaluates)

    from strategies.lora.math import AGGREGATORS
    from edge_lam.training.lora import state_nbytes

    states = make_states(devices, layers)
    counts = [100 + 7 * k for k in range(devices)]
    inputs = sum(state_nbytes(s) for s in states)
    bandwidth = read_bandwidth()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    out = AGGREGATORS[method](states, counts, max(RANKS))
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    again = None
    if seconds < 10:  # a server aggregates every round: the second call is the steady cost
        del out
        t0 = time.perf_counter()
        out = AGGREGATORS[method](states, counts, max(RANKS))
        again = time.perf_counter() - t0
    adapter = state_nbytes(out)
    return {"method": method, "devices": devices, "layers": layers, "seconds": seconds,
            "seconds_again": again,
            "input_bytes": inputs, "adapter_bytes_r16": adapter,
            "bandwidth_bytes_s": bandwidth, "floor_s": inputs / bandwidth,
            "peak_extra_bytes": (peak - base) * 1024,
            "peak_extra_adapters": (peak - base) * 1024 / adapter,
            "machine": machine_line(machine_info())}


def render(rows: list[dict]) -> str:
    first = rows[0]
    lines = [f"{first['devices']} devices, LoRA shaped like Qwen2.5-0.5B ({first['layers']} "
             "layers, q,k,v,o + gate,up,down), ranks 2/4/8/16 over the devices, r_max 16: "
             f"{first['adapter_bytes_r16'] / 1e6:.1f} MB per rank-16 adapter, "
             f"{first['input_bytes'] / 1e9:.2f} GB of replies in all. Floor: the replies read "
             f"once at {first['bandwidth_bytes_s'] / 1e9:.1f} GB/s (numpy sum of 1 GiB).", "",
             f"Machine: {first['machine']}.", "",
             "| method | seconds (first call) | seconds (next rounds) | floor s | x floor "
             "(next rounds) | peak memory above the inputs |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        again = r.get("seconds_again")
        steady = again if again is not None else r["seconds"]
        lines.append(f"| {r['method']} | {r['seconds']:.2f} | "
                     f"{'-' if again is None else f'{again:.2f}'} | {r['floor_s']:.2f} | "
                     f"{steady / r['floor_s']:.1f} | {r['peak_extra_bytes'] / 1e6:.0f} MB "
                     f"({r['peak_extra_adapters']:.1f} adapters) |")
    lines += ["", "Command: `python benchmarks/aggregation_scale.py`; each method in a fresh "
              "process."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="hetlora,flexlora")
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--one", help="measure this method here and print JSON (internal)")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.render:
        doc = read_json(args.out / "aggregation_scale.json")
        (args.out / "aggregation_scale.md").write_text(render(doc["rows"]) + "\n")
        return
    if args.one:
        print(json.dumps(measure(args.one, args.devices, args.layers)))
        return
    started, rows = time.perf_counter(), []
    for method in args.methods.split(","):
        rows.append(run_fresh(__file__, "--one", method, "--devices", str(args.devices),
                              "--layers", str(args.layers)))
        print(f"{method}: {rows[-1]['seconds']:.2f} s, again {rows[-1]['seconds_again']} s "
              f"(floor {rows[-1]['floor_s']:.2f} s), "
              f"+{rows[-1]['peak_extra_adapters']:.1f} adapters", flush=True)
    write_json(args.out / "aggregation_scale.json", {"rows": rows, **provenance(started)})
    (args.out / "aggregation_scale.md").write_text(render(rows) + "\n")


if __name__ == "__main__":
    main()
