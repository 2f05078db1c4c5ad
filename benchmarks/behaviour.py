"""Behaviour snapshot: seeded, tiny runs of every kind of run the app does, every metrics row
they write, so that a refactor can prove it changed no result ("max |difference| 0").

Each scenario (SCENARIOS below: run-config overrides + how many simulated devices) runs the
app the way Flower does, through public entry points only, so the same script runs before
and after a refactor of the core:

- the run config is pyproject.toml's `[tool.flwr.app.config]` (flattened to dotted keys, as
  Flower fuses it) with the scenario's overrides on top;
- the server side is the ServerApp object pyproject.toml's `[tool.flwr.app.components]`
  names (`serverapp`), called as Flower calls it, `app(grid, context)`: it parses the config
  and dispatches on `mode` and, for training, on `strategy` through the algorithm registry;
- the devices are the real ClientApp, reached through `tests/inprocess_grid.InProcessGrid`
  (each node its own Context and partition), in this process;
- what is recorded is what the run leaves in `results/<run-id>/`: every row of the files in
  RESULT_FILES that the run wrote (`metrics.jsonl`; `infer.json` and `infer_queries.jsonl`
  for `mode='infer'`; `unlearning.json`), and the SHA-256 of the final adapter's weights.

Determinism. Everything is seeded by the run config (`seed`, partitions, initialisation,
shuffling, availability, attacks); the tiny models are built from fixed torch seeds; torch
runs on a fixed number of threads (`--threads`, default 1; a different thread count may
change float sums). The one input that is *not* a function of the seed is the wall clock:
devices report measured seconds (`train-s`, `grad-s`, `seconds`, ...) in their replies, and
the app feeds them into decisions (the fleet's simulated clock and S2 / Oort selection; the
inference cascade's cheapest-first order). The harness's grid (`VirtualClockGrid`) therefore
replaces the reply metrics named in VIRTUAL_SECONDS by fixed virtual seconds before the
server sees them, the way InProcessGrid already makes `inject.SLEEP` virtual. What is left
that measures real time (or this process's history) is excluded from the comparison by the
explicit list EXCLUDED_KEYS (keys matched by name, anywhere in a row), each with its reason.
Paths under the scenario's scratch folder are written as `<work>` so runs in different
folders compare equal.

Compare. `--compare BEFORE.json AFTER.json` matches scenario by scenario, file by file, row
by row (by position) and key by key: numbers exactly (max |a - b|; NaN equals NaN; a NaN
against a number is inf; bools and strings compared for equality, mismatches counted), a
scenario, file, row or key present on one side only is reported as `missing` (in AFTER) or
`extra` (only in AFTER), never ignored. It prints a table and writes
`benchmarks/results/behaviour/compare.{json,md}`; it exits 1 if anything differs.

What it needs from the code it runs: pyproject.toml's `serverapp` and run config, the config
keys in SCENARIOS, the result files above, `tests/inprocess_grid.py` (the ClientApp,
`strategies.registry`, `strategies.robust.inject`), `tests/tiny_models.py` and
`benchmarks/common.py` (`provenance`, `write_json`; it imports `edge_lam.config.options`). It imports
no app module itself, so a refactor that moves modules fixes those helpers, not this script.
Rows are matched by position, so a refactor that reorders a list (the `clients` of a round)
shows up as differences: state it or keep the order.

Around a refactor (same machine, same --threads; --data: the shared data folder, default
$EDGE_LAM_SHARED_DATA, else ../shared/data beside the checkout):

    # at the old commit, in a clean worktree (copy this script in if it is not there yet)
    git worktree add /tmp/before <old-commit>
    cp benchmarks/behaviour.py /tmp/before/benchmarks/
    cd /tmp/before && python benchmarks/behaviour.py --data /abs/shared/data --out /abs/before.json
    cd - && git worktree remove --force /tmp/before
    # at the new commit
    python benchmarks/behaviour.py --out after.json
    python benchmarks/behaviour.py --compare before.json after.json   # exit 0: identical
    python benchmarks/behaviour.py --only fleet,infer --out x.json     # a subset, while fixing

The snapshot taken before the core refactor is `benchmarks/results/behaviour/before.json`
(`code.head` is its commit; `machine.git_commit` says "+uncommitted" only because this
script was an untracked copy there); `--compare benchmarks/results/behaviour/before.json
after.json` overwrites compare.{json,md}, which until then hold the determinism check (two
runs of that commit: 0 everywhere). The whole set runs in about 12 s on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import sys
import tempfile
import time
import tomllib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

OUT_DIR = ROOT / "benchmarks" / "results" / "behaviour"

# ------------------------------------------------------------------------------ scenarios
# Placeholders filled at run time: {bert} a tiny BERT (seq-cls), {llama} / {learnable} tiny
# Llamas (tests/tiny_models.py), {agnews} / {sst2} small folders of ../shared/data,
# {work} the scenario's scratch folder. BASE applies to every scenario (a scenario's own
# keys win); `devices` is the number of simulated devices; `resume_to` (optional) runs the
# scenario, then a second run with resume='<first run's folder>' and
# num-server-rounds=<resume_to>, and records the resumed folder.
BASE = {"model": "{bert}", "data.path": "{agnews}", "results-dir": "{work}/results",
        "num-server-rounds": 3, "train.local-steps": 2, "train.batch-size": 4,
        "eval.max-examples": 0, "eval.batch-size": 16}

SCENARIOS: dict[str, dict] = {
    # (a) the default run: pyproject's config (hetlora, seed 42, Dirichlet partitions,
    # device mix, ...) with a tiny model, 3 rounds of 2 local steps, 4 devices
    "default": {"devices": 4, "config": {}},
    # (b) FedKD (S3): mixed tasks (AG News + SST-2), compressed updates both ways
    "fedkd": {"devices": 4, "config": {
        "strategy": "fedkd", "fedkd.task-mix": "agnews,sst2",
        "fedkd.task.agnews.path": "{agnews}", "fedkd.task.sst2.path": "{sst2}",
        "fedkd.state-dir": "{work}/fedkd-state", "fedkd.compress": True,
        "fedkd.shared-rank": 4, "fedkd.local-rank": 8, "fedkd.device-eval-examples": 16}},
    # (c) unlearning (S4, recipes/unlearn.toml scaled down): train 1 round, forget
    # partition 3 in 1 unlearning round, 1 recovery round
    "unlearn": {"devices": 4, "config": {
        "strategy": "unlearn", "num-server-rounds": 1, "unlearn.clients": "3",
        "unlearn.rounds": 1, "unlearn.recovery-rounds": 1, "unlearn.grad-batches": 1,
        "data.partitioner": "iid"}},
    # (d) robust (S6, recipes/robust.toml): flexlora, multi-Krum f=1, leave-one-out
    # contributions, a fifth of the devices flip the sign of their update
    "robust": {"devices": 5, "config": {
        "strategy": "flexlora", "robust.aggregator": "multi-krum", "robust.f": 1,
        "robust.contribution": "report", "robust.contribution-examples": 16,
        "attack.kind": "sign-flip", "attack.fraction": 0.2, "data.partitioner": "iid"}},
    # (e) a fleet (S2, recipes/pi-fleet.toml): Raspberry Pis, Markov availability, S2's
    # joint selection and bandwidth allocation
    "fleet": {"devices": 8, "config": {
        "devices.mix": "rpi4,rpi4,rpi5,rpi5", "num-server-rounds": 4, "min-devices": 1,
        "fleet.selection": "s2", "fleet.per-round": 4, "fleet.bandwidth-mhz": 5.0,
        "fleet.availability": "markov"}},
    # (f) collaborative inference (S8, recipes/infer-ensemble.toml): three tiny Llamas
    # answer AG News as an instruction (4 devices: members cycle); partition 3 is an
    # adversary ('wrong')
    "infer": {"devices": 4, "config": {
        "mode": "infer", "task": "lm-cls", "model": "{llama}",
        "data.label-words": "Business,Sci/Tech,Sports,World",
        "infer.members": "{llama},{learnable},{llama}", "infer.method": "all",
        "infer.batch-size": 8, "infer.calibration": 8, "infer.attack": "wrong",
        "infer.attackers": "3"}},
    # (g) FlexLoRA (recipes/flexlora.toml)
    "flexlora": {"devices": 4, "config": {"strategy": "flexlora"}},
    # (h) exact resume (R3): 2 rounds of FedLaAvg (2 of 4 devices a round, stored updates,
    # the sampling RNG), then resumed from its checkpoint to 4 rounds
    "resume": {"devices": 4, "resume_to": 4, "config": {
        "num-server-rounds": 2, "fleet.selection": "fedlaavg", "fleet.per-round": 2,
        "data.partitioner": "iid"}},
}

# What a run writes that is recorded (those of them present in results/<run-id>/).
RESULT_FILES = ("metrics.jsonl", "infer.json", "infer_queries.jsonl", "unlearning.json")
# Final adapter weights, recorded by digest (the exact trained numbers, compared for equality).
ADAPTER_GLOB = "adapter/*.safetensors"

# Device reply metrics that carry measured wall seconds, replaced by these virtual seconds
# before the server reads them (the app makes decisions from them: see the docstring).
VIRTUAL_SECONDS = {"train-s": 1.0, "grad-s": 1.0, "seconds": 1.0, "handler-s": 1.0,
                   "startup-s": 0.0}

# Keys left out of the comparison (matched by name at any depth), and why.
EXCLUDED_KEYS = {
    "wall_s": "real wall-clock seconds (a round, a run, an unlearning phase; also the ratio "
              "cost_vs_training.wall_s): machine load",
    "eval_s": "real seconds of the server's evaluation of a round",
    "estimate_s": "robust: real seconds of the contribution estimate",
    "round_wall_s": "unlearning.json: real seconds per round",
    "requested_at": "unlearning.json: a timestamp",
    "completed_at": "unlearning.json: a timestamp",
    "at": "unlearning.json history: timestamps",
    "process_task": "count of tasks this process has handled (edge_lam.training.overhead): depends on "
                    "which scenarios ran before in the same process, not on the code",
}


def fill(value, subs: dict):
    return value.format(**subs) if isinstance(value, str) else value


def pyproject_config() -> dict:
    """pyproject.toml's run config as Flower fuses it: nested tables as dotted keys."""
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    out: dict = {}

    def walk(table: dict, prefix: str) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value

    walk(doc["tool"]["flwr"]["app"]["config"], "")
    return out


def server_app():
    """The ServerApp object pyproject.toml names (`module:attribute`)."""
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module, attr = doc["tool"]["flwr"]["app"]["components"]["serverapp"].split(":")
    return getattr(importlib.import_module(module), attr)


def make_grid_class():
    from flwr.app import MetricRecord
    from inprocess_grid import InProcessGrid

    class VirtualClockGrid(InProcessGrid):
        """InProcessGrid whose device replies report virtual seconds (VIRTUAL_SECONDS)."""

        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            for reply in replies:
                if not reply.has_content():
                    continue
                for name, record in list(reply.content.metric_records.items()):
                    if any(k in record for k in VIRTUAL_SECONDS):
                        reply.content[name] = MetricRecord(
                            {k: (VIRTUAL_SECONDS[k] if k in VIRTUAL_SECONDS else v)
                             for k, v in record.items()})
            return replies

    return VirtualClockGrid


def prepare_inputs(work: Path, data: Path) -> dict:
    """Tiny models (fixed seeds) and small data folders; the placeholders' values."""
    import torch
    from tiny_models import make_tiny_bert, make_tiny_llama

    subs = {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        subs["bert"] = str(make_tiny_bert(work / "tiny-bert"))
    subs["llama"] = str(make_tiny_llama(work / "tiny-llama", seed=1))
    subs["learnable"] = str(make_tiny_llama(work / "learnable-llama", initializer_range=0.2,
                                            seed=0))
    for name, files in (("agnews", {"train.tsv": 800, "test.tsv": 200}),
                        ("sst2", {"train.tsv": 800, "validation.tsv": 200})):
        dst = work / "data" / name
        dst.mkdir(parents=True)
        for file, rows in files.items():
            lines = (data / name / file).read_text(encoding="utf-8").splitlines(keepends=True)
            (dst / file).write_text("".join(lines[: rows + 1]), encoding="utf-8")
        subs[name] = str(dst)
    return subs


def normalise(value, work: str):
    """JSON-safe copy with the scratch folder written as <work>."""
    if isinstance(value, str):
        return value.replace(work, "<work>")
    if isinstance(value, dict):
        return {normalise(k, work): normalise(v, work) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, work) for v in value]
    return value


def read_results(run_dir: Path) -> dict:
    files = {}
    for name in RESULT_FILES:
        path = run_dir / name
        if not path.is_file():
            continue
        text = path.read_text()
        files[name] = [json.loads(x) for x in text.splitlines() if x.strip()] \
            if name.endswith(".jsonl") else [json.loads(text)]
    adapters = sorted(run_dir.glob(ADAPTER_GLOB))
    if adapters:
        files["adapter"] = [{p.relative_to(run_dir).as_posix():
                             hashlib.sha256(p.read_bytes()).hexdigest() for p in adapters}]
    return files


def run_once(raw: dict, devices: int, run_id: int) -> Path:
    from flwr.app import Context, RecordDict

    grid = make_grid_class()(raw, num_nodes=devices)
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(raw))
    server_app()(grid, context)
    return (Path(raw["results-dir"]) / str(run_id)).resolve()  # absolute (BASE sets it)


def run_scenario(name: str, spec: dict, subs: dict, defaults: dict) -> dict:
    overrides = {k: fill(v, subs) for k, v in {**BASE, **spec["config"]}.items()}
    raw = {**defaults, **overrides}
    started = time.perf_counter()
    run_dir = run_once(raw, spec["devices"], run_id=1)
    if spec.get("resume_to"):  # the resumed run goes on in (and writes to) the same folder
        raw = raw | {"resume": str(run_dir), "num-server-rounds": spec["resume_to"]}
        run_once(raw, spec["devices"], run_id=2)
    seconds = time.perf_counter() - started
    return {"devices": spec["devices"], "resume_to": spec.get("resume_to"),
            "config": normalise(overrides, subs["work"]), "seconds": seconds,
            "results": normalise(read_results(run_dir), subs["work"])}


def app_code() -> dict:
    """HEAD and whether the app's own code differs from it (machine.git_commit also counts
    benchmarks/, where this script may be an uncommitted copy)."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True,
                              text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "edge_lam", "strategies", "client_app",
                "server_app", "pyproject.toml", "tests/inprocess_grid.py",
                "tests/tiny_models.py")
    return {"head": git("rev-parse", "HEAD"), "app_uncommitted": dirty.splitlines()}


def snapshot(args) -> None:
    import torch

    from benchmarks.common import provenance, write_json

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}: use {', '.join(SCENARIOS)}")
    defaults = pyproject_config()
    out = {"scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="behaviour-") as tmp:
        inputs = Path(tmp) / "inputs"
        inputs.mkdir()
        subs = prepare_inputs(inputs, Path(args.data))
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            # inputs are shared; every path under tmp is written as <work>
            got = run_scenario(name, SCENARIOS[name], {**subs, "work": str(work)}, defaults)
            got = normalise(got, tmp)
            out["scenarios"][name] = got
            print(f"{name}: {got['seconds']:.1f} s, "
                  f"{sum(len(v) for v in got['results'].values())} rows", flush=True)
    payload = {**provenance(started), "code": app_code(), "threads": args.threads,
               "virtual_seconds": VIRTUAL_SECONDS, "excluded_keys": EXCLUDED_KEYS, **out}
    write_json(Path(args.out), payload)
    print(f"wrote {args.out} ({payload['total_s']:.1f} s)")


# -------------------------------------------------------------------------------- compare
def _flatten(value, path: str, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if k in EXCLUDED_KEYS:
                continue
            _flatten(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flatten(v, f"{path}[{i}]", out)
        if not value:
            out[path] = []
    else:
        out[path] = value


def _metric_name(path: str) -> str:
    """A leaf's metric: its path without list indices (clients[2].rank -> clients[].rank)."""
    import re

    return re.sub(r"\[\d+\]", "[]", path)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _difference(a, b) -> tuple[float | None, bool]:
    """(|a - b| for two numbers else None, whether they differ)."""
    if _is_number(a) and _is_number(b):
        if isinstance(a, float) and math.isnan(a) or isinstance(b, float) and math.isnan(b):
            same = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and \
                math.isnan(b)
            return (0.0 if same else math.inf), not same
        if a == b:
            return 0.0, False
        d = abs(a - b)
        return (d if d > 0 else math.inf), True  # inf - inf etc.
    return None, not (a == b and type(a) is type(b))


def compare(before: dict, after: dict) -> dict:
    """Per scenario and per metric: compared leaves, max |difference|, non-numeric
    mismatches, leaves missing in `after` and extra in `after`."""
    result: dict = {}
    names = list(dict.fromkeys([*before.get("scenarios", {}), *after.get("scenarios", {})]))
    for name in names:
        sb, sa = before["scenarios"].get(name), after["scenarios"].get(name)
        metrics: dict[str, dict] = {}

        def entry(metric: str) -> dict:
            return metrics.setdefault(metric, {"compared": 0, "max_abs_diff": 0.0,
                                               "mismatches": 0, "missing": 0, "extra": 0})

        if sb is None or sa is None:
            result[name] = {"status": "missing" if sa is None else "extra", "metrics": {}}
            continue
        rb, ra = sb["results"], sa["results"]
        for file in dict.fromkeys([*rb, *ra]):
            rows_b, rows_a = rb.get(file, []), ra.get(file, [])
            for i in range(max(len(rows_b), len(rows_a))):
                fb, fa = {}, {}
                if i < len(rows_b):
                    _flatten(rows_b[i], "", fb)
                if i < len(rows_a):
                    _flatten(rows_a[i], "", fa)
                if i >= len(rows_a):
                    entry(f"{file}: row").update(missing=entry(f"{file}: row")["missing"] + 1)
                if i >= len(rows_b):
                    entry(f"{file}: row").update(extra=entry(f"{file}: row")["extra"] + 1)
                for path in dict.fromkeys([*fb, *fa]):
                    e = entry(f"{file}: {_metric_name(path)}")
                    if path not in fa:
                        e["missing"] += 1
                        continue
                    if path not in fb:
                        e["extra"] += 1
                        continue
                    e["compared"] += 1
                    diff, differs = _difference(fb[path], fa[path])
                    if diff is not None:
                        e["max_abs_diff"] = max(e["max_abs_diff"], diff)
                    elif differs:
                        e["mismatches"] += 1
        bad = {m: e for m, e in metrics.items()
               if e["max_abs_diff"] or e["mismatches"] or e["missing"] or e["extra"]}
        result[name] = {"status": "different" if bad else "identical",
                        "max_abs_diff": max((e["max_abs_diff"] for e in metrics.values()),
                                            default=0.0),
                        "mismatches": sum(e["mismatches"] for e in metrics.values()),
                        "missing": sum(e["missing"] for e in metrics.values()),
                        "extra": sum(e["extra"] for e in metrics.values()),
                        "compared": sum(e["compared"] for e in metrics.values()),
                        "metrics": metrics}
    return result


def _fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.3g}"


def render(result: dict, before: dict, after: dict, paths: tuple[str, str]) -> str:
    def commit(run: dict) -> str:
        code = run.get("code") or {}
        if code.get("head"):
            dirty = code.get("app_uncommitted")
            return f"{code['head'][:7]} (app code " + \
                (f"with uncommitted changes: {', '.join(dirty)})" if dirty else "as committed)")
        return (run.get("machine") or {}).get("git_commit") or "unknown"

    lines = ["# Behaviour before / after", "",
             f"`python benchmarks/behaviour.py --compare {paths[0]} {paths[1]}`", "",
             f"- before: `{paths[0]}`, code at {commit(before)}, "
             f"threads {before.get('threads')}",
             f"- after: `{paths[1]}`, code at {commit(after)}, threads {after.get('threads')}",
             *(["- the same code on both sides: this is the determinism check (two runs of "
                "one commit must give 0 everywhere)"]
               if commit(before) == commit(after) else []),
             "- numbers compared exactly (max |difference|); other values for equality; "
             "rows and keys on one side only count as missing / extra",
             "- excluded keys (real time or process history): " +
             ", ".join(f"`{k}`" for k in EXCLUDED_KEYS), "",
             "| scenario | status | leaves compared | max abs diff | non-numeric mismatches "
             "| missing | extra |", "|---|---|---|---|---|---|---|"]
    for name, r in result.items():
        if "compared" not in r:
            lines.append(f"| {name} | {r['status']} (whole scenario) | 0 | | | | |")
            continue
        lines.append(f"| {name} | {r['status']} | {r['compared']} | {_fmt(r['max_abs_diff'])} "
                     f"| {r['mismatches']} | {r['missing']} | {r['extra']} |")
    lines += ["", "Per metric (path in the result file, list indices dropped):", ""]
    for name, r in result.items():
        lines += [f"## {name}", "", "| metric | compared | max abs diff | mismatches | missing "
                  "| extra |", "|---|---|---|---|---|---|"]
        for metric, e in sorted(r["metrics"].items()):
            lines.append(f"| `{metric}` | {e['compared']} | {_fmt(e['max_abs_diff'])} | "
                         f"{e['mismatches']} | {e['missing']} | {e['extra']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def run_compare(before_path: str, after_path: str, out_dir: Path = OUT_DIR) -> int:
    before = json.loads(Path(before_path).read_text())
    after = json.loads(Path(after_path).read_text())
    result = compare(before, after)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"before": before_path, "after": after_path,
               "before_commit": (before.get("machine") or {}).get("git_commit"),
               "after_commit": (after.get("machine") or {}).get("git_commit"),
               "excluded_keys": EXCLUDED_KEYS, "scenarios": result}
    (out_dir / "compare.json").write_text(json.dumps(payload, indent=1, default=str))
    (out_dir / "compare.md").write_text(render(result, before, after,
                                               (before_path, after_path)))
    width = max(len(n) for n in result) if result else 8
    for name, r in result.items():
        print(f"{name:<{width}}  {r['status']:<9}  max |diff| {_fmt(r.get('max_abs_diff', 0))}"
              f"  mismatches {r.get('mismatches', 0)}  missing {r.get('missing', 0)}"
              f"  extra {r.get('extra', 0)}  ({r.get('compared', 0)} leaves)")
        for metric, e in r["metrics"].items():
            if e["max_abs_diff"] or e["mismatches"] or e["missing"] or e["extra"]:
                print(f"    {metric}: max |diff| {_fmt(e['max_abs_diff'])}, mismatches "
                      f"{e['mismatches']}, missing {e['missing']}, extra {e['extra']}")
    print(f"wrote {out_dir / 'compare.md'}")
    return 0 if all(r["status"] == "identical" for r in result.values()) else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(OUT_DIR / "snapshot.json"))
    p.add_argument("--only", default="", help="comma-separated scenario names")
    p.add_argument("--threads", type=int, default=1, help="torch threads (fixed)")
    p.add_argument("--data", default=os.environ.get("EDGE_LAM_SHARED_DATA",
                                                     str(ROOT.parent / "shared" / "data")))
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = p.parse_args()
    if args.compare:
        raise SystemExit(run_compare(*args.compare))
    snapshot(args)


if __name__ == "__main__":
    main()
