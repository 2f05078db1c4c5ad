"""What every benchmark records beside its numbers, and how its markdown is made.

Each result file `benchmarks/results/<name>.json` holds `machine` (processor model, cores,
threads, GPU, library versions, git commit), `command` (the command line that wrote it) and
`total_s` (wall seconds of the whole command). The markdown next to it is rendered from that
JSON alone (`python benchmarks/<name>.py --render`), so a table can always be regenerated and
never drifts from its source.

Byte counts have one meaning per name everywhere in this project:
- *payload bytes*: the raw bytes of the arrays (numpy `nbytes`), what the in-process
  benchmarks count;
- *wire bytes*: the serialised arrays as Flower sends them (each array adds a small .npy
  header), what `bytes_up` / `bytes_down` in a run's `metrics.jsonl` count.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from edge_lam.config.options import parse_value  # noqa: F401  (also re-exported for the scripts)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
# What `flwr run` needs of the checkout (it rewrites pyproject.toml: runs get a copy).
APP_FILES = ("pyproject.toml", "README.md", "edge_lam", "strategies", "client_app", "server_app")
LIBRARIES = ("torch", "transformers", "peft", "flwr", "opacus", "numpy", "flwr-datasets")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "edge_lam", "strategies", "client_app", "server_app", "benchmarks"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def machine_info() -> dict:
    """The machine and software a measurement ran on."""
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions,
            "git_commit": _git_commit(), "gpu": None}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def machine_line(info: dict | str) -> str:
    """One line for a markdown report (older result files hold a plain string)."""
    if isinstance(info, str):
        return info
    where = f"{info['gpu']} (GPU); host CPU {info['cpu']}" if info["gpu"] else \
        f"CPU only: {info['cpu']}"
    libs = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    return (f"{where}, {info['cores']} cores, "
            f"{info.get('torch_threads', '?')} torch threads; Python {info['python']}, {libs}; "
            f"code at {info.get('git_commit') or 'unknown commit'}")


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def run_fresh(script: str, *args: str, python: str = sys.executable,
              env: dict | None = None) -> dict:
    """Run `python <script> <args>` in a fresh process (peak memory and timings of one case
    alone) and return the JSON object it printed last. `python` may be another interpreter
    (an emulated one, deploy/emulate-arm64.sh); `env` is added to this process's environment."""
    done = subprocess.run([python, script, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{python} {script} {' '.join(args)} exited {done.returncode}:\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def set_overrides(pairs: list[str]) -> dict:
    """`--set key=value` pairs as run-config overrides (values typed as `flwr run` types them)."""
    return {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in pairs)}


def run_inprocess(raw: dict, devices: int, run_id: int,
                  server: str = "strategies.lora.server") -> tuple[list[dict], Path]:
    """One federation in this process: the real ServerApp logic (`server`: the algorithm's
    module with `prepare_run` and `federate`) and ClientApp handlers over
    `tests/inprocess_grid.InProcessGrid`. Returns (metrics.jsonl rows, the results folder)."""
    import importlib

    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from inprocess_grid import InProcessGrid

    from edge_lam.config.run_config import RunConfig

    module = importlib.import_module(server)
    plan = module.prepare_run(RunConfig.from_run_config(raw), run_id)
    run_dir = module.federate(InProcessGrid(raw, num_nodes=devices), plan)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, run_dir


def write_json(path: Path, payload: dict) -> None:
    """Write a result file atomically (a crash mid-write never leaves half a JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: run the benchmark first (without --render)")
    return json.loads(path.read_text())


def copy_app(dst: Path) -> Path:
    """A copy of the Flower app to `flwr run` (Flower moves the federations out of its
    pyproject.toml, so the checkout's own is never run)."""
    dst.mkdir(parents=True)
    for name in APP_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst / name)
    return dst


def provenance(started: float) -> dict:
    """`machine`, `command`, `total_s` for a result file; `started` is a perf_counter()."""
    return {"machine": machine_info(), "command": command_line(),
            "total_s": time.perf_counter() - started}

