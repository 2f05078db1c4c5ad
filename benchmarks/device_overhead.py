"""What a round costs a device around its training: process start, imports, model load.

Each case is a real deployment (benchmarks/federation.py: a SuperLink with TLS and node
authentication, one SuperNode started by deploy/supernode.sh, `flwr run`), one device so no
two trainings share the 2 cores, 3 rounds of the run's local training. Every reply reports
(edge_lam.training.overhead) `startup-s` (the task's claim to the handler: a fresh `flwr-clientapp`'s start
and imports, or only Flower's pulls in the warm runtime), `handler-s` and `train-s`; the
round's overhead is startup + handler - train (model load, data preparation, hand-over).

- runtime `flower`: Flower 1.39's default, a fresh ClientApp process per message;
- runtime `warm`: deploy/supernode.sh's default, edge-lam-device (client_app/runtime.py).

Models: all-MiniLM-L6-v2 (seq-cls) and SmolLM2-135M-Instruct (lm-cls, LoRA on q,v) on AG News;
natively, and MiniLM on an emulated Raspberry Pi 4 (aarch64 under QEMU user mode with a
Cortex-A72: deploy/emulate-arm64.sh; a relative hint, slower than a real Pi).

    python benchmarks/device_overhead.py                      # every case
    python benchmarks/device_overhead.py --cases minilm-x86-warm,minilm-x86-flower
    python benchmarks/device_overhead.py --render             # devices/overhead.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import copy_app, machine_line, provenance, read_json, write_json  # noqa: E402
from benchmarks.federation import Device, Federation, read_env_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "devices"
DATA = ROOT.parent / "shared" / "data" / "agnews"
MODELS = {
    "minilm": "model='sentence-transformers/all-MiniLM-L6-v2' task='seq-cls'",
    "smollm2": ("model='smollm2-135m-instruct' task='lm-cls' lora.target-modules='q_proj,v_proj' "
                "data.template='What is the topic of this news article: World, Sports, Business "
                "or Sci/Tech?\\n{text}\\nAnswer:' data.label-words='Business,Sci/Tech,Sports,World' "
                "train.batch-size=8"),
}
CASES = ["minilm-x86-flower", "minilm-x86-warm", "smollm2-x86-flower", "smollm2-x86-warm",
         "minilm-arm64-warm"]


def run_case(case: str, rounds: int, steps: int, data: Path, arm64_env: dict | None) -> dict:
    model, arch, runtime = case.split("-")
    device = Device("device", "rpi4", f"data-dir='{data}' partition-id=0 num-partitions=10",
                    emulated=arch == "arm64", runtime=runtime)
    config = " ".join([MODELS[model], f"data.path='{data}'", f"num-server-rounds={rounds}",
                       "min-devices=1", f"train.local-steps={steps}", "eval.max-examples=64",
                       "round-timeout=3000.0"])
    with tempfile.TemporaryDirectory() as tmp:
        with Federation(Path(tmp), [device], arm64_env, qemu_cpu="cortex-a72") as fed:
            ready = fed.wait_ready(1800)["device"]
            start = time.perf_counter()
            rows, _, run_id = fed.run(copy_app(Path(tmp) / "app"), config, timeout=5400)
            wall = time.perf_counter() - start
            status = fed.run_status(run_id)
    per_round = []
    for r in rows[1:]:
        c = r["clients"][0]
        overhead = c["startup_s"] + c["handler_s"] - c["train_s"]
        per_round.append({"round": r["round"], "startup_s": c["startup_s"],
                          "handler_s": c["handler_s"], "train_s": c["train_s"],
                          "overhead_s": overhead, "overhead_pct": 100 * overhead / c["train_s"],
                          "process_task": int(c["process_task"]),
                          "platform": c.get("platform", "?")})
    later = per_round[1:] or per_round
    return {"case": case, "model": model, "arch": arch, "runtime": runtime, "steps": steps,
            "ready_s": ready, "run_s": wall, "status": status, "rounds": per_round,
            "later_rounds_overhead_pct": statistics.median(r["overhead_pct"] for r in later),
            "all_rounds_overhead_pct": 100 * sum(r["overhead_s"] for r in per_round)
            / sum(r["train_s"] for r in per_round)}


def render(data: dict) -> str:
    lines = ["# A device's cost per round around its training", "",
             f"Machine: {machine_line(data['machine'])}. One device (rpi4 profile) per "
             f"federation, {data['rounds']} rounds, AG News partition 0 of 10; overhead = "
             "startup (claim to handler) + handler - training.", "",
             "| model | device | runtime | local steps | ready after (s) | round 1: startup / "
             "overhead / training (s) | later rounds: overhead / training (s) | overhead, "
             "later rounds | overhead, all rounds | run status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in data["cases"]:
        first, later = c["rounds"][0], c["rounds"][1:]
        later_txt = ", ".join(f"{r['overhead_s']:.2f} / {r['train_s']:.1f}" for r in later)
        where = "emulated Pi 4 (aarch64, cortex-a72)" if c["arch"] == "arm64" else "x86-64"
        lines.append(f"| {c['model']} | {where} | {c['runtime']} | {c['steps']} | "
                     f"{c['ready_s']:.0f} | {first['startup_s']:.2f} / {first['overhead_s']:.2f}"
                     f" / {first['train_s']:.1f} | {later_txt} | "
                     f"{c['later_rounds_overhead_pct']:.1f}% | {c['all_rounds_overhead_pct']:.1f}%"
                     f" | {c['status']} |")
    lines += ["", "`flower`: Flower 1.39's default, a fresh ClientApp process per message; "
              "`warm`: deploy/supernode.sh's default, one long-lived edge-lam-device. Emulated "
              "rows run under QEMU user mode on this host: a relative hint, not a Pi's speed.",
              "", f"Command: `{data['command']}`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="train.local-steps (default 10)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--arm64-env", default="/var/cache/edge-lam-arm64/bookworm/env.sh")
    p.add_argument("--render", action="store_true")
    args = p.parse_args()
    path = OUT / "overhead.json"
    if not args.render:
        started = time.perf_counter()
        cases = [c for c in args.cases.split(",") if c]
        unknown = [c for c in cases if c not in CASES]
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}: choose among {', '.join(CASES)}")
        arm64 = read_env_file(Path(args.arm64_env)) if any("arm64" in c for c in cases) else None
        results = []
        for case in cases:  # the JSON is rewritten after every case: a long run keeps what it has
            print(f"device_overhead: {case} ...", flush=True)
            results.append(run_case(case, args.rounds, args.steps, Path(args.data), arm64))
            print(f"device_overhead: {case}: later rounds "
                  f"{results[-1]['later_rounds_overhead_pct']:.1f}%", flush=True)
            write_json(path, {"rounds": args.rounds, "cases": results, **provenance(started)})
    (OUT / "overhead.md").write_text(render(read_json(path)))
    print((OUT / "overhead.md").read_text())


if __name__ == "__main__":
    main()
