"""What installing edge-lam costs each platform, and how long its imports take there.

Per platform: the dependency set pyproject.toml's markers resolve to (uv, with the target's
own markers), whether it holds CUDA packages, and the installed size (installed with
`uv pip install --target` into a temporary folder; the largest packages listed):

- x86-64 laptop/server: the CPU torch (from --cpu-torch, e.g. a folder of wheels or PyTorch's
  CPU index); beside it, what PyPI's default would pull (CUDA packages counted, not installed);
- Raspberry Pi (aarch64): the markers' torch (CPU-only); beside it, what torch 2.13 would pull;
- Jetson: everything but torch (JetPack's own torch is not on PyPI: not measured).

Import times: `import torch` and the warm runtime's whole preload (torch, transformers, peft,
numpy, flwr), natively and on the emulated aarch64 (deploy/emulate-arm64.sh) with a Pi 4's
(cortex-a72) and a Pi 5's (cortex-a76) CPU: emulation, a relative hint only.

    python benchmarks/device_install.py                 # measure, write the JSON, render
    python benchmarks/device_install.py --torch-cpus 2.9.1,2.10.0   # Pi 4 / Pi 5 CPU check
    python benchmarks/device_install.py --render        # the .md files from their JSON
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_line, provenance, read_json, write_json  # noqa: E402
from benchmarks.federation import read_env_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")  # uv needs no interpreter of its own here
OUT = ROOT / "benchmarks" / "results" / "devices"
CUDA = re.compile(r"^(nvidia-|triton|cuda-)", re.I)
PLATFORM = {"x86_64": "x86_64-manylinux_2_36", "aarch64": "aarch64-manylinux_2_36"}
IMPORTS = {"torch": "import torch",
           "preload": "import torch, transformers, peft, numpy, flwr.supernode.runtime"}


def resolve(machine: str, python: str, extra: list[str]) -> list[str]:
    """`name==version` lines of the project's dependencies for that platform."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "req.txt"
        subprocess.run(["uv", "pip", "compile", "pyproject.toml", "--no-config", "--python-platform",
                        PLATFORM[machine], "--python-version", python, "--no-header",
                        "--no-annotate", "-q", "-o", str(out), *extra], cwd=ROOT, check=True)
        return [ln.strip() for ln in out.read_text().splitlines() if "==" in ln]


def installed_mb(machine: str, python: str, lines: list[str], extra: list[str]) -> dict:
    """Install `lines` for the platform into a temporary folder; sizes in MB."""
    with tempfile.TemporaryDirectory() as tmp:
        req, target = Path(tmp) / "req.txt", Path(tmp) / "site"
        req.write_text("\n".join(lines) + "\n")
        subprocess.run(["uv", "pip", "install", "-q", "--no-config", "--no-deps",  # resolved
                        "--target", str(target),
                        "--python-platform", PLATFORM[machine], "--python-version", python,
                        "-r", str(req), *extra], check=True,
                       env={**os.environ, "UV_CACHE_DIR": os.environ.get(
                           "UV_CACHE_DIR", "/var/cache/edge-lam-arm64/uv-cache")})
        sizes = {}
        for entry in target.iterdir():
            if entry.is_dir() and not entry.name.endswith((".dist-info", "__pycache__")):
                sizes[entry.name] = sum(f.stat().st_size for f in entry.rglob("*")
                                        if f.is_file()) / 1e6
        total = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 1e6
    top = dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:6])
    return {"installed_mb": round(total), "largest_mb": {k: round(v) for k, v in top.items()}}


def platform_rows(python: str, cpu_torch: list[str]) -> list[dict]:
    rows = []
    x86 = resolve("x86_64", python, ["--override", str(_override("torch==2.13.0+cpu")),
                                     *cpu_torch])
    rows.append({"platform": "x86-64 laptop/server (CPU torch)", "packages": len(x86),
                 "torch": _pin(x86, "torch"), "cuda_packages": _cuda(x86),
                 **installed_mb("x86_64", python, x86, cpu_torch)})
    pypi = resolve("x86_64", python, [])
    rows.append({"platform": "x86-64, PyPI's default torch (what the CPU index avoids)",
                 "packages": len(pypi), "torch": _pin(pypi, "torch"), "cuda_packages": _cuda(pypi)})
    pi = resolve("aarch64", python, [])
    rows.append({"platform": "Raspberry Pi OS 64-bit (aarch64)", "packages": len(pi),
                 "torch": _pin(pi, "torch"), "cuda_packages": _cuda(pi),
                 **installed_mb("aarch64", python, pi, [])})
    new = resolve("aarch64", python, ["--override", str(_override("torch==2.13.0"))])
    rows.append({"platform": "aarch64 with torch 2.13 (what the markers prevent)",
                 "packages": len(new), "torch": _pin(new, "torch"), "cuda_packages": _cuda(new)})
    jetson = [ln for ln in pi if not ln.lower().startswith("torch==")]
    rows.append({"platform": "Jetson (JetPack's torch, not counted)", "packages": len(jetson),
                 "torch": "JetPack's own", "cuda_packages": _cuda(jetson),
                 **installed_mb("aarch64", python, jetson, [])})
    return rows


def _override(line: str) -> Path:
    path = Path(tempfile.mkstemp(suffix=".txt")[1])
    path.write_text(line + "\n")
    return path


def _pin(lines: list[str], name: str) -> str:
    return next((ln.split("==", 1)[1] for ln in lines if ln.lower().startswith(name + "==")), "-")


def _cuda(lines: list[str]) -> int:
    return sum(bool(CUDA.match(ln)) for ln in lines)


def import_rows(arm64_env: Path | None, repeats: int) -> list[dict]:
    """Median seconds of each import in a fresh process, natively (`repeats` times) and
    emulated (once)."""
    runners = [("x86-64 (this machine)", [sys.executable], {})]
    if arm64_env is not None:
        env = read_env_file(arm64_env)
        for cpu, board in (("cortex-a72", "Pi 4"), ("cortex-a76", "Pi 5")):
            runners.append((f"emulated aarch64, {cpu} ({board} CPU)", [env["PY"]],
                            {"QEMU_CPU": cpu}))
    rows = []
    for where, python, env in runners:
        row = {"where": where, "repeats": repeats if not env else 1}
        for name, code in IMPORTS.items():
            times = []
            for _ in range(row["repeats"]):  # emulated imports take minutes: once
                start = time.perf_counter()
                done = subprocess.run([*python, "-c", code], env={**os.environ, **env},
                                      capture_output=True, text=True, cwd=tempfile.gettempdir())
                times.append(time.perf_counter() - start)
                if done.returncode != 0:
                    row[f"{name}_error"] = done.stderr.strip().splitlines()[-1:]
            row[f"{name}_s"] = round(sorted(times)[len(times) // 2], 1)
        rows.append(row)
    return rows


def torch_cpu_rows(arm64_env: Path, versions: list[str], python: str) -> list[dict]:
    """Does PyPI's aarch64 torch X import and multiply on a Pi 4's and a Pi 5's CPU (emulated)?"""
    env = read_env_file(arm64_env)
    rows = []
    for version in versions:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["uv", "pip", "install", "-q", "--no-config", "--no-deps", "--target",
                            tmp, "--python-platform", PLATFORM["aarch64"], "--python-version",
                            python, f"torch=={version}"], check=True)
            lines = resolve_one("aarch64", python, f"torch=={version}")
            row = {"torch": version, "cuda_packages": _cuda(lines)}
            for cpu in ("cortex-a72", "cortex-a76"):
                done = subprocess.run(
                    [env["PY"], "-c", "import torch; x = torch.randn(64, 64); print((x @ x).shape)"],
                    env={**os.environ, "QEMU_CPU": cpu, "PYTHONPATH": tmp},
                    capture_output=True, text=True, cwd=tempfile.gettempdir())
                row[cpu] = ("runs" if done.returncode == 0 else
                            f"fails (exit {done.returncode}: "
                            f"{(done.stderr.strip().splitlines() or ['?'])[-1][:80]})")
            rows.append(row)
    return rows


def resolve_one(machine: str, python: str, requirement: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        req, out = Path(tmp) / "in.txt", Path(tmp) / "out.txt"
        req.write_text(requirement + "\n")
        subprocess.run(["uv", "pip", "compile", str(req), "--no-config", "--python-platform",
                        PLATFORM[machine], "--python-version", python, "--no-header",
                        "--no-annotate", "-q", "-o", str(out)], check=True)
        return [ln.strip() for ln in out.read_text().splitlines() if "==" in ln]


def render_torch_cpus(data: dict) -> str:
    lines = ["# PyPI's aarch64 torch on a Raspberry Pi's CPU (emulated)", "",
             f"Machine: {machine_line(data['machine'])}. QEMU user mode, `QEMU_CPU` = a Pi 4's "
             "Cortex-A72 (ARMv8.0) or a Pi 5's Cortex-A76 (ARMv8.2); `import torch` and a 64 x 64 "
             "matrix product.", "",
             "| torch | CUDA packages it pulls on aarch64 | Cortex-A72 (Pi 4) | Cortex-A76 (Pi 5) |",
             "|---|---|---|---|"]
    for r in data["versions"]:
        lines.append(f"| {r['torch']} | {r['cuda_packages']} | {r['cortex-a72']} | "
                     f"{r['cortex-a76']} |")
    lines += ["", f"Command: `{data['command']}`."]
    return "\n".join(lines) + "\n"


def render(data: dict) -> str:
    lines = ["# Installing and starting edge-lam on each platform", "",
             f"Machine: {machine_line(data['machine'])}. Python {data['python']}.", "",
             "| platform | packages | torch | CUDA packages | installed MB | largest (MB) |",
             "|---|---|---|---|---|---|"]
    for r in data["platforms"]:
        largest = ", ".join(f"{k} {v}" for k, v in r.get("largest_mb", {}).items()) or "-"
        lines.append(f"| {r['platform']} | {r['packages']} | {r['torch']} | "
                     f"{r['cuda_packages']} | {r.get('installed_mb', 'not installed')} | "
                     f"{largest} |")
    lines += ["", "Import time (median of fresh processes, seconds; emulated rows are QEMU user "
              "mode on this x86 host: a relative hint, not a Pi's speed):", "",
              "| where | import torch | warm runtime's preload |", "|---|---|---|"]
    for r in data["imports"]:
        lines.append(f"| {r['where']} | {r['torch_s']} | {r['preload_s']} |")
    lines += ["", f"Command: `{data['command']}` (import times: "
              f"`{data.get('imports_command', data['command'])}`)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", default="3.11")
    p.add_argument("--cpu-torch", default="--find-links=/opt/wheels",
                   help="uv option that provides torch 2.13.0+cpu for x86-64, e.g. "
                        "--find-links=DIR or --index-url=<PyTorch's CPU index> (default %(default)s)")
    p.add_argument("--arm64-env", default="/var/cache/edge-lam-arm64/bookworm/env.sh",
                   help="deploy/emulate-arm64.sh's env.sh ('' to skip the emulated imports)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-cpus", metavar="V1,V2",
                   help="only check which aarch64 torch versions run on a Pi 4 / Pi 5 CPU "
                        "(devices/torch_cpus.json), e.g. 2.9.1,2.10.0")
    p.add_argument("--sizes-only", action="store_true",
                   help="measure the install sizes again, keep the JSON's import times")
    p.add_argument("--render", action="store_true")
    args = p.parse_args()
    if args.torch_cpus:
        started, out = time.perf_counter(), OUT / "torch_cpus.json"
        rows = torch_cpu_rows(Path(args.arm64_env), args.torch_cpus.split(","), args.python)
        write_json(out, {"versions": rows, **provenance(started)})
        (OUT / "torch_cpus.md").write_text(render_torch_cpus(read_json(out)))
        print((OUT / "torch_cpus.md").read_text())
        return
    path = OUT / "install.json"
    if not args.render:
        started = time.perf_counter()
        arm64 = Path(args.arm64_env) if args.arm64_env and Path(args.arm64_env).is_file() else None
        old = read_json(path) if args.sizes_only else {}
        imports = old["imports"] if old else import_rows(arm64, args.repeats)
        data = {"python": args.python, "platforms": platform_rows(args.python, [args.cpu_torch]),
                "imports": imports, **provenance(started)}
        data["imports_command"] = old.get("imports_command", old.get("command", data["command"]))
        write_json(path, data)
    (OUT / "install.md").write_text(render(read_json(path)))
    print((OUT / "install.md").read_text())
    if args.render and (OUT / "torch_cpus.json").is_file():
        (OUT / "torch_cpus.md").write_text(render_torch_cpus(read_json(OUT / "torch_cpus.json")))


if __name__ == "__main__":
    main()
