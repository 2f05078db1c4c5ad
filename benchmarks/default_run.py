"""The quick start, measured: README's `flwr run . --stream` with its defaults, timed end to end.

Runs a copy of the app (flwr rewrites pyproject.toml) through the Flower SuperLink of the
current FLWR_HOME (Flower starts a local one if none runs, and its start is then part of the
time), then keeps what README quotes:

- `default_run_metrics.jsonl`: the run's metrics.jsonl, as written;
- `default_run.json`: machine, command, wall seconds of `flwr run`, accuracy per round, and the
  framework overhead per round (round wall time minus the devices' training and the server's
  evaluation: Flower messaging, Ray actors, model loading, aggregation);
- `default_run.md`: both tables, rendered from the JSON alone (`--render`).

    python benchmarks/default_run.py                      # README's defaults, ~5 min on 2 cores
    python benchmarks/default_run.py --render
    python benchmarks/default_run.py --run-config "model='/tmp/tiny' num-server-rounds=1" \\
        --out /tmp/default-run-smoke                        # what the smoke test runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (ROOT, RESULTS, copy_app, machine_line, provenance,  # noqa: E402
                               read_json, write_json)
from benchmarks.overhead import overhead_rows, overhead_table  # noqa: E402

ENV_FLAGS = ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "HF_HUB_OFFLINE", "FLWR_HOME")


def run(run_config: str, federation_config: str, out: Path) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edge-lam-default-run-") as tmp:
        app, results = copy_app(Path(tmp) / "app"), Path(tmp) / "results"
        cmd = ["flwr", "run", str(app), "--stream", "--run-config",
               " ".join(filter(None, [f"results-dir='{results}'", run_config]))]
        if federation_config:
            cmd += ["--federation-config", federation_config]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        flwr_s = time.perf_counter() - t0
        output = proc.stdout + proc.stderr
        runs = sorted(results.iterdir()) if results.is_dir() else []
        if proc.returncode != 0 or len(runs) != 1:
            raise SystemExit(f"`flwr run` failed (exit {proc.returncode}, {len(runs)} result "
                             f"folders); its output ends with:\n{output[-3000:]}")
        metrics = (runs[0] / "metrics.jsonl").read_text()
    out.mkdir(parents=True, exist_ok=True)
    (out / "default_run_metrics.jsonl").write_text(metrics)
    rows = [json.loads(line) for line in metrics.splitlines()]
    write_json(out / "default_run.json", {
        **provenance(started), "flwr_command": " ".join(cmd[:3] + ["--stream"]),
        "run_config": run_config, "federation_config": federation_config,
        "env": {k: os.environ.get(k) for k in ENV_FLAGS}, "flwr_run_s": flwr_s,
        "curve": [{"round": r["round"], "accuracy": r["accuracy"], "loss": r["loss"]}
                  for r in rows],
        "overhead": overhead_rows(rows)})
    write_report(out)


def write_report(out: Path) -> None:
    """default_run.md, from default_run.json alone."""
    res = read_json(out / "default_run.json")
    curve = " -> ".join(f"{r['accuracy']:.3f}" for r in res["curve"])
    lines = [f"`flwr run . --stream` with run config `{res['run_config'] or 'the defaults'}`"
             + (f" and federation config `{res['federation_config']}`"
                if res["federation_config"] else "") + ".", "",
             f"Machine: {machine_line(res['machine'])}.", "",
             "Environment: " + ", ".join(f"{k}={v}" for k, v in res["env"].items()) + ".", "",
             f"Command: `{res['command']}`. `flwr run` took **{res['flwr_run_s']:.0f} s** "
             f"({res['flwr_run_s'] / 60:.1f} min); accuracy per round (round 0 = before "
             f"training): {curve}.", "",
             "| round | accuracy | loss |", "|---|---|---|"]
    lines += [f"| {r['round']} | {r['accuracy']:.4f} | {r['loss']:.4f} |" for r in res["curve"]]
    lines += ["", "Framework overhead per round:", "", *overhead_table(res["overhead"])]
    (out / "default_run.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-config", default="", help="overrides, as for `flwr run`")
    ap.add_argument("--federation-config", default="", help="e.g. 'num-supernodes=4'")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--render", action="store_true",
                    help="only write default_run.md from --out/default_run.json")
    args = ap.parse_args()
    if args.render:
        return write_report(Path(args.out))
    run(args.run_config, args.federation_config, Path(args.out))


if __name__ == "__main__":
    main()
