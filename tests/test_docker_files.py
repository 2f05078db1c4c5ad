"""The container files agree with the deploy scripts and the app (no Docker engine here)."""

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())
SCRIPTS = {p.name: p for p in (ROOT / "deploy").glob("*.sh")}


def script_flags(script: Path) -> set[str]:
    """The --flags a deploy script's argument loop accepts."""
    return set(re.findall(r"^\s+(--[a-z-]+)\)", script.read_text(), re.M))


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_deploy_scripts_are_valid_bash_and_executable(name):
    assert SCRIPTS[name].stat().st_mode & 0o111, f"{name} is not executable"
    subprocess.run(["bash", "-n", str(SCRIPTS[name])], check=True)


@pytest.mark.parametrize("dockerfile, image", [("superlink.Dockerfile", "flwr/superlink"),
                                               ("supernode.Dockerfile", "flwr/supernode")])
def test_dockerfiles_pin_flower_139_and_copy_existing_files(dockerfile, image):
    """Read as text (nothing is built): the base image is Flower 1.39.0 like pyproject's pin,
    every COPY source exists, and the entrypoint is one of the deploy scripts."""
    text = (ROOT / "docker" / dockerfile).read_text()
    from packaging.requirements import Requirement

    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    flwr = [Requirement(d).specifier for d in pinned if Requirement(d).name == "flwr"]
    assert flwr and all("1.39.0" in s and "1.40.0" not in s for s in flwr), flwr
    assert f"ARG FLWR_IMAGE={image}:1.39.0" in text
    for src in re.findall(r"^COPY (\S+) ", text, re.M) + ["README.md"]:
        assert (ROOT / src).exists(), f"{dockerfile} copies missing {src}"
    entry = re.search(r'ENTRYPOINT \["/app/deploy/(\S+)"\]', text).group(1)
    assert entry in SCRIPTS


TORCH_PIN = re.compile(r'TARGETARCH" = "amd64" ]; then \\\s+python -m pip install --no-cache-dir '
                       r'torch==(\S+) --index-url \S+/whl/cpu; \\\s+else python -m pip install '
                       r'--no-cache-dir torch==(\S+); fi')


@pytest.mark.parametrize("dockerfile", ["superlink.Dockerfile", "supernode.Dockerfile"])
def test_dockerfiles_install_the_torch_pyproject_allows(dockerfile):
    """amd64: the CPU build, in the x86_64 range; arm64: a version the aarch64 (non-Jetson)
    marker allows (< 2.10: 2.10 dies with SIGILL on a Pi 4, 2.11+ are CUDA builds)."""
    from packaging.requirements import Requirement

    amd64, arm64 = TORCH_PIN.search((ROOT / "docker" / dockerfile).read_text()).groups()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    for machine, version in (("x86_64", amd64), ("aarch64", arm64)):
        env = {"sys_platform": "linux", "platform_machine": machine,
               "platform_release": "6.6.31+rpt-rpi-v8"}
        specs = [r.specifier for r in torch if r.marker is None or r.marker.evaluate(env)]
        assert specs and all(version in s for s in specs), (dockerfile, machine, version, specs)


def _command_flags(service: dict) -> set[str]:
    return {a for a in service.get("command", []) if a.startswith("--")}


def test_compose_services_use_flags_their_scripts_accept():
    services = COMPOSE["services"]
    entry = {"superlink": "superlink.sh", "certs": "gen-certs.sh", "register": "connect.sh"}
    for name, script in entry.items():
        assert _command_flags(services[name]) <= script_flags(SCRIPTS[script]), name
    devices = [n for n, s in services.items() if "--node-config" in s.get("command", [])]
    assert len(devices) == 3
    for name in devices:
        assert _command_flags(services[name]) <= script_flags(SCRIPTS["supernode.sh"]), name


def test_compose_devices_are_registered_authenticated_and_known_profiles():
    services = COMPOSE["services"]
    ranks = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"][
        "devices"]["rank"]
    made = services["certs"]["command"]
    keys = {made[i + 1] for i, a in enumerate(made) if a == "--device"}
    registered = {Path(a).stem for a in services["register"]["command"] if a.endswith(".pub")}
    used = set()
    for name, s in services.items():
        cmd = s.get("command", [])
        if "--node-config" not in cmd:
            continue
        assert "fleet" in s["networks"] and "control" not in s["networks"]
        key = Path(cmd[cmd.index("--key") + 1]).name
        used.add(key)
        profile = re.search(r"device='([^']+)'", cmd[cmd.index("--node-config") + 1]).group(1)
        assert profile in ranks, f"{name}: unknown profile {profile}"
        assert cmd[cmd.index("--superlink") + 1] == "superlink:9092"
    assert used == keys == registered
    # the SuperLink certificate names the addresses devices and the laptop dial
    sans = {made[i + 1] for i, a in enumerate(made) if a == "--server-address"}
    control = services["superlink"]["command"]
    assert "superlink" in sans
    assert control[control.index("--control") + 1].split(":")[0] in sans
