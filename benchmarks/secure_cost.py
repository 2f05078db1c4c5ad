"""What secure aggregation costs per round (issue 28 item 1): bytes and seconds with and
without SecAgg+ (`strategies.secure`), at 10 and 100 devices.

Each device holds a rank-16 LoRA update shaped like SmolLM2-135M's q,v adapters (30 layers,
hidden 576, kv 192: 921,600 values, 3.7 MB in float32). Plain: the device uploads its
float32 factors and the server averages them (`hetlora_aggregate`). Secure: the real
device stages (`strategies.secure.device`: keys, shares, encoding + masking) and the real
server (`strategies.secure.server.SecureRound`: routing, unmasking) run in this process,
each timed on its own; with `--neighbours` k devices mask against k others (SecAgg+) instead
of all (SecAgg). Each secure setting is also run with one device dropping before masking
and one after (the server then rebuilds one self-mask more and the dropped one's pair
masks), and the secure sum is checked against the plain one.

    python benchmarks/secure_cost.py                    # 10 and 100 devices
    python benchmarks/secure_cost.py --render
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_line, provenance, read_json, write_json  # noqa: E402

OUT = Path(__file__).parent / "results" / "secure"
LAYERS, HIDDEN, KV, RANK = 30, 576, 192, 16


def lora_state(rng) -> dict[str, np.ndarray]:
    state = {}
    for layer in range(LAYERS):
        for name, d_out in (("q_proj", HIDDEN), ("v_proj", KV)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            state[prefix + ".lora_A.weight"] = rng.normal(0, 0.02, (RANK, HIDDEN)).astype(
                np.float32)
            state[prefix + ".lora_B.weight"] = rng.normal(0, 0.002, (d_out, RANK)).astype(
                np.float32)
    return state


class Timed:
    """Delivers QUERY `secagg` stages to the device handler, timing each device."""

    def __init__(self, contexts, drop=()):
        self.contexts, self.drop = contexts, set(drop)
        self.device_s = {n: 0.0 for n in contexts}

    def send_and_receive(self, messages, timeout=None):
        from strategies.secure import device

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if (node, msg.content["config"]["stage"]) in self.drop:
                continue
            t0 = time.perf_counter()
            replies.append(device.handle(msg, self.contexts[node]))
            self.device_s[node] += time.perf_counter() - t0
        return replies


def one(devices: int, neighbours: int, dropouts: bool, states, counts, server_round: int
        ) -> dict:
    from flwr.app import ConfigRecord, Context, RecordDict

    from strategies.lora.math import hetlora_aggregate
    from strategies.secure import device, encoding
    from strategies.secure.protocol import as_int64
    from strategies.secure.server import SecureRound

    ids = list(range(1, devices + 1))
    contexts = {i: Context(run_id=1, node_id=i, node_config={}, state=RecordDict(),
                           run_config={}) for i in ids}
    before, after = (ids[1], ids[2]) if dropouts else (None, None)
    grid = Timed(contexts, drop={(after, "unmask")} if after else ())
    rnd = SecureRound(1, server_round, neighbours, 0.66, 60.0)
    t0 = time.perf_counter()
    u1 = rnd.begin(grid, ids)
    setup_s = time.perf_counter() - t0
    inputs, encode_s, mask_s = {}, [], []
    for node in u1:
        if node == before:
            continue
        t0 = time.perf_counter()
        vector, _ = encoding.encode(states[node - 1], counts[node - 1], RANK, "padded", 8.0)
        t1 = time.perf_counter()
        config = ConfigRecord({"server-round": server_round, **rnd.train_config(node)})
        inputs[node] = device.mask_input(contexts[node], config, vector.view(np.uint64))
        t2 = time.perf_counter()
        encode_s.append(t1 - t0)
        mask_s.append(t2 - t1)
    t0 = time.perf_counter()
    total = rnd.finish(grid, inputs)
    finish_s = time.perf_counter() - t0 - rnd.seconds["unmask"] + rnd.seconds["unmask-server"]
    template = {k: np.zeros_like(v) for k, v in states[0].items()}
    got, weight, _ = encoding.decode(as_int64(total), template, "padded", RANK, 8.0)
    arrived = sorted(inputs)
    want = hetlora_aggregate([states[n - 1] for n in arrived], [counts[n - 1] for n in arrived],
                             RANK)
    error = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    stage_bytes = rnd.info()["bytes"]
    per_device_keys = sum(stage_bytes.values()) / devices
    masked_bytes = int(inputs[arrived[0]].nbytes)
    routing_s = setup_s + rnd.seconds["unmask"] - sum(grid.device_s.values())
    return {
        "devices": devices, "neighbours": neighbours or devices - 1, "threshold": rnd.t,
        "dropped_before_masking": int(before is not None),
        "dropped_after_masking": int(after is not None),
        "upload_bytes_per_device": masked_bytes,
        "key_bytes_per_device": round(per_device_keys),
        "device_key_s": float(np.mean([grid.device_s[n] for n in ids])),
        "device_encode_s": float(np.mean(encode_s)), "device_mask_s": float(np.mean(mask_s)),
        "server_route_s": max(routing_s, 0.0), "server_unmask_s": finish_s,
        "max_abs_error_vs_plain": error, "weight": weight}


def plain(states, counts) -> dict:
    from edge_lam.records import record_nbytes, to_record
    from strategies.lora.math import hetlora_aggregate

    t0 = time.perf_counter()
    hetlora_aggregate(states, counts, RANK)
    return {"upload_bytes_per_device": record_nbytes(to_record(states[0])),
            "server_aggregate_s": time.perf_counter() - t0}


def run(args) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # the server
    started = time.perf_counter()
    rows = []
    for n in args.devices:
        rng = np.random.default_rng(n)
        states = [lora_state(rng) for _ in range(n)]
        counts = [int(c) for c in rng.integers(50, 500, n)]
        base = plain(states, counts)
        rows.append({"devices": n, "mode": "plain", **base})
        print(f"{n} devices plain: {base}", flush=True)
        k_plus = 2 * math.ceil(math.log2(n))
        settings = [(0, False), (0, True)]
        if k_plus < n - 1:
            settings += [(k_plus, False), (k_plus, True)]
        for r, (k, drops) in enumerate(settings, start=1):
            row = one(n, k, drops, states, counts, r)
            row["mode"] = "secagg" if k == 0 else "secagg+"
            rows.append(row)
            print(f"{n} devices {row['mode']} k={row['neighbours']} drops={drops}: "
                  f"mask {row['device_mask_s']:.3f} s, unmask {row['server_unmask_s']:.3f} s, "
                  f"error {row['max_abs_error_vs_plain']:.2e}", flush=True)
    payload = {**provenance(started), "values_per_device": int(sum(
        v.size for v in lora_state(np.random.default_rng(0)).values())), "rows": rows,
        "note": "one process plays every device in turn and the server (this machine's "
                "seconds per device; on a fleet the device columns run in parallel)"}
    write_json(OUT / "secure_cost.json", payload)
    (OUT / "secure_cost.md").write_text(render(payload))


def render(p: dict) -> str:
    lines = ["# Secure aggregation: bytes and seconds per round", "",
             f"Machine: {machine_line(p['machine'])}. Command: `{p['command']}`. "
             f"{p['values_per_device']:,} LoRA values per device (SmolLM2-135M q,v at rank "
             "16). Rendered from `secure_cost.json`; "
             + p["note"] + ".", "",
             "| devices | mode | k | t | drops (before / after masking) | upload per device "
             "| key stages per device | device: keys + shares s | device: encode + mask s "
             "| server s | max error vs plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        if r["mode"] == "plain":
            lines.append(f"| {r['devices']} | plain (float32) | | | | "
                         f"{r['upload_bytes_per_device'] / 1e6:.2f} MB | 0 | 0 | 0 | "
                         f"{r['server_aggregate_s']:.3f} | 0 |")
            continue
        lines.append(
            f"| {r['devices']} | {r['mode']} | {r['neighbours']} | {r['threshold']} | "
            f"{r['dropped_before_masking']} / {r['dropped_after_masking']} | "
            f"{r['upload_bytes_per_device'] / 1e6:.2f} MB | "
            f"{r['key_bytes_per_device'] / 1e3:.1f} kB | {r['device_key_s']:.3f} | "
            f"{r['device_encode_s'] + r['device_mask_s']:.3f} | "
            f"{r['server_route_s'] + r['server_unmask_s']:.3f} | "
            f"{r['max_abs_error_vs_plain']:.1e} |")
    lines += ["", "Upload: the masked input is int64 fixed point (2x the float32 adapter); the "
              "key stages add the public keys and the encrypted shares (grow with k). A "
              "device's masking cost grows with its k neighbours (one ChaCha20 stream of the "
              "whole update each); the server's with the survivors (one self-mask each) and "
              "the dropped devices' neighbours.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.render:
        (OUT / "secure_cost.md").write_text(render(read_json(OUT / "secure_cost.json")))
    else:
        run(args)


if __name__ == "__main__":
    main()
