"""The devices a micro-service runs on, as the planners see them (S8): speed, memory, link.

A `ServeDevice` says how fast a device computes relative to the machine where per-module
times were measured (`speed`: 0.25 = four times slower), how much memory it has for the
model's modules, and its link to the edge server (bandwidth in both directions and a
one-way latency). Planners (CoT placement, MoE scheduling, layer splitting) turn measured
seconds on this machine and real payload sizes into predicted seconds per device:

    t_comp(module, d) = measured_seconds(module) / speed_d
    t_comm(bytes, d)  = latency_d + 8 * bytes / (1e6 * mbps_d)

`PROFILES` (from `edge_lam.config.hardware`, the one profile table) are coarse defaults for the
simulated fleet (`serve.fleet='rpi4,rpi5,laptop'`),
relative to a 2-core x86 server vCPU running PyTorch on CPU; sources in each line. They are
meant to be replaced by measurements (a JSON fleet file) when real devices are at hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from edge_lam.config.hardware import HARDWARE
from edge_lam.config.options import ConfigError


@dataclass(frozen=True)
class ServeDevice:
    name: str
    speed: float  # compute speed relative to the measuring machine (1.0 = the same)
    memory_mib: float  # memory available to the model's modules
    up_mbps: float  # device -> server
    down_mbps: float  # server -> device
    latency_s: float = 0.002  # one way, per message

    def compute_s(self, measured_s: float) -> float:
        """Seconds this device needs for work measured at `measured_s` on this machine."""
        return measured_s / self.speed

    def send_s(self, nbytes: float, up: bool = True) -> float:
        """Seconds to move `nbytes` over this device's link (up: to the server)."""
        mbps = self.up_mbps if up else self.down_mbps
        return self.latency_s + 8.0 * nbytes / (1e6 * mbps)

    def __post_init__(self) -> None:
        for field in ("speed", "memory_mib", "up_mbps", "down_mbps"):
            if not getattr(self, field) > 0:
                raise ConfigError(f"device '{self.name}': {field} must be > 0, got "
                                  f"{getattr(self, field)}")
        if self.latency_s < 0:
            raise ConfigError(f"device '{self.name}': latency_s must be >= 0")


# speed, memory and links: `edge_lam.config.hardware`, the one profile table (sources there)
PROFILES: dict[str, ServeDevice] = {
    name: ServeDevice(name, speed=hw.speed, memory_mib=hw.memory_mib, up_mbps=hw.up_mbps,
                      down_mbps=hw.down_mbps, latency_s=hw.latency_s)
    for name, hw in HARDWARE.items()}


def fleet(spec: tuple[str, ...] | list[str] | str) -> list[ServeDevice]:
    """The fleet from profile names (`('rpi4', 'rpi5')`: one device each, named
    `rpi4-0`, `rpi5-1`) or a JSON file: a list of objects with the ServeDevice fields."""
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    if len(spec) == 1 and (spec[0].endswith(".json") or Path(spec[0]).expanduser().is_file()):
        return _from_file(Path(spec[0]).expanduser())
    out = []
    for i, name in enumerate(spec):
        if name not in PROFILES:
            raise ConfigError(f"fleet profile '{name}' is not known: use one of "
                              f"{', '.join(PROFILES)} or a JSON fleet file")
        out.append(replace(PROFILES[name], name=f"{name}-{i}"))
    if not out:
        raise ConfigError("the fleet is empty: name at least one device profile")
    return out


def _from_file(path: Path) -> list[ServeDevice]:
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"fleet file {path}: {err}") from err
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"fleet file {path}: expected a non-empty JSON list of devices")
    need = ("name", "speed", "memory_mib", "up_mbps", "down_mbps")
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in need if k not in row]
        if missing:
            raise ConfigError(f"fleet file {path}: device {i} lacks {', '.join(missing)}")
        unknown = set(row) - set(need) - {"latency_s"}
        if unknown:
            raise ConfigError(f"fleet file {path}: device {i} has unknown field(s) "
                              f"{', '.join(sorted(unknown))}")
        out.append(ServeDevice(str(row["name"]), *(float(row[k]) for k in need[1:]),
                               latency_s=float(row.get("latency_s", 0.002))))
    return out
