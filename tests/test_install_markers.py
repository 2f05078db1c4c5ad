"""One install per platform, from pyproject.toml's environment markers (docs/devices.md).

The markers are evaluated for each platform's real environment values (an x86 laptop, a
Raspberry Pi OS kernel, a Jetson's L4T kernel, a Mac), and the install of this very
environment is dry-run: with the CPU torch already installed (as .ci/run and the x86 docs
do), pip must not want torch again nor any nvidia-* package. The aarch64 resolution itself
(no nvidia-*, torch < 2.10) is checked where it is made: deploy/emulate-arm64.sh, run by
tests/test_arm64_supernode.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
BASE = {"python_version": "3.11", "python_full_version": "3.11.2", "os_name": "posix",
        "implementation_name": "cpython", "platform_python_implementation": "CPython",
        "platform_version": "#1 SMP", "platform_system": "Linux", "extra": ""}
PLATFORMS = {  # values as each platform's Python reports them
    "x86 laptop": {"sys_platform": "linux", "platform_machine": "x86_64",
                   "platform_release": "6.1.0-28-amd64"},
    "Raspberry Pi 4/5": {"sys_platform": "linux", "platform_machine": "aarch64",
                         "platform_release": "6.6.51+rpt-rpi-v8"},
    "Jetson Orin Nano": {"sys_platform": "linux", "platform_machine": "aarch64",
                         "platform_release": "5.15.148-tegra"},
    "Mac (Apple silicon)": {"sys_platform": "darwin", "platform_machine": "arm64",
                            "platform_release": "24.1.0", "platform_system": "Darwin"},
}


def requirements(name: str, platform: str) -> list[Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = {**BASE, **PLATFORMS[platform]}
    return [r for r in map(Requirement, deps)
            if r.name == name and (r.marker is None or r.marker.evaluate(env))]


def torch_spec(platform: str) -> SpecifierSet:
    reqs = requirements("torch", platform)
    assert len(reqs) == 1, f"{platform}: exactly one torch requirement applies, got {reqs}"
    return reqs[0].specifier


def test_x86_accepts_the_tested_cpu_build_and_nothing_newer():
    spec = torch_spec("x86 laptop")
    assert spec.contains("2.13.0+cpu") and spec.contains("2.13.0")
    assert not spec.contains("2.14.0")  # an untested release would be a CUDA download


def test_pi_gets_a_cpu_only_torch_that_runs_on_a_cortex_a72():
    spec = torch_spec("Raspberry Pi 4/5")
    assert spec.contains("2.9.1")  # CPU-only aarch64 wheel, runs on Cortex-A72 (emulated)
    assert not spec.contains("2.10.0")  # SIGILL on ARMv8.0 (pytorch#176993)
    for cuda_build in ("2.11.0", "2.12.0", "2.13.0"):  # aarch64 wheels that pull nvidia-*
        assert not spec.contains(cuda_build)
    assert max(v for v in map(Version, ["2.8.0", "2.9.1", "2.10.0", "2.13.0"])
               if spec.contains(v)) == Version("2.9.1")


def test_jetson_keeps_jetpacks_torch_whatever_its_version():
    spec = torch_spec("Jetson Orin Nano")
    for jetpack in ("2.7.0", "2.8.0", "2.11.0a0+nv25.09"):  # NVIDIA builds, any version >= 2.6
        assert spec.contains(jetpack, prereleases=True)
    assert not spec.contains("2.5.0a0+872d972e41.nv24.08", prereleases=True)  # transformers 5


def test_a_mac_takes_pypis_torch():
    assert torch_spec("Mac (Apple silicon)").contains("2.13.0")


def test_devices_are_spared_ray_and_flwr_is_declared_once():
    assert requirements("ray", "Raspberry Pi 4/5") == []
    assert requirements("ray", "Jetson Orin Nano") == []
    assert [str(r.specifier) for r in requirements("ray", "x86 laptop")] == ["==2.55.1"]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sum(Requirement(d).name == "flwr" for d in deps) == 1  # Flower refuses two


def test_this_environment_installs_without_cuda_or_a_second_torch():
    """The documented x86 install (CPU torch first, then the project) as pip would do it."""
    try:
        from importlib.metadata import version

        installed = version("torch")
    except Exception:  # noqa: BLE001
        pytest.fail("torch is not installed: install the CPU build first (docs/devices.md)")
    full = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                           "--report", "-", "-e", str(ROOT)], capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    wanted = [item["metadata"]["name"].lower() for item in json.loads(full.stdout)["install"]]
    assert "torch" not in wanted, f"pip would replace torch {installed}: {wanted}"
    assert not [w for w in wanted if w.startswith(("nvidia-", "triton", "cuda-"))], wanted
