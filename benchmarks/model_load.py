"""Loading an offline LLM: the one-time GGUF conversion, then the cached folder.

For each model (a known name, a .gguf file, a folder): the seconds to resolve it the first
time (assembling and dequantising the GGUF into the cache), the seconds to resolve it again
in a fresh process (the cached folder; the goal for SmolLM2 is under 5 s on 2 cores), the
seconds to load the model from that folder, and the folder's size on disk.

    python benchmarks/model_load.py --model smollm2-135m-instruct --model gemma-3-270m
    python benchmarks/model_load.py --render
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

from benchmarks.common import ROOT, machine_line, provenance, read_json, write_json  # noqa: E402

PROBE = """
import json, sys, time
t0 = time.perf_counter()
from edge_lam.models.lora_model import resolve_model_source
folder = resolve_model_source(sys.argv[1])
resolved = time.perf_counter() - t0
import torch
from transformers import AutoModelForCausalLM
t1 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
print(json.dumps({"folder": folder, "resolve_s": resolved,
                  "load_s": time.perf_counter() - t1,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def probe(model: str, env: dict) -> dict:
    """Resolve and load `model` in a fresh process (no in-process caches)."""
    done = subprocess.run([sys.executable, "-c", PROBE, model], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{model}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def measure(model: str, cache: Path) -> dict:
    env = {**os.environ, "EDGE_LAM_MODEL_CACHE": str(cache)}
    first, again = probe(model, env), probe(model, env)
    size = sum(f.stat().st_size for f in Path(first["folder"]).rglob("*") if f.is_file())
    return {"model": model, "params": first["params"], "first_resolve_s": first["resolve_s"],
            "cached_resolve_s": again["resolve_s"], "load_s": again["load_s"],
            "folder_mib": size / 2**20}


def write_report(out: Path) -> None:
    """model_load.md, from model_load.json alone."""
    res = read_json(out / "model_load.json")
    lines = [f"Machine: {machine_line(res['machine'])}.", "",
             f"Command: `{res['command']}`; {res['total_s']:.0f} s in all. Each resolve runs "
             "in a fresh process; the first one starts from an empty cache.", "",
             "| model | parameters | first resolve s (GGUF -> cache) | cached resolve s | "
             "load from cache s | cached folder MiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params']:,} | {r['first_resolve_s']:.1f} | "
              f"{r['cached_resolve_s']:.2f} | {r['load_s']:.2f} | {r['folder_mib']:,.0f} |"
              for r in res["rows"]]
    (out / "model_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.render:
        if not args.model:
            ap.error("give at least one --model")
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="edge-lam-model-cache-") as cache:
            rows = [measure(m, Path(cache)) for m in args.model]
        write_json(out / "model_load.json", {**provenance(started), "rows": rows})
    write_report(out)


if __name__ == "__main__":
    main()
