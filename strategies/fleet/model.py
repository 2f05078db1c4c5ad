"""The simulated fleet of a training run (S2, S5): each device's speed, link and availability,
and the simulated clock of every round.

A device of profile p computes at `speed` relative to the machine the run measures on: a
round's measured training seconds t (the device's `train-s`) become t / speed on the
device. Its uplink SNR has mean `snr_db` and fades (Rayleigh) every round. It is online in a
round according to its availability process:
- `always`;
- `markov`: an on/off chain with P(off -> on) = `p_on`, P(on -> off) = `p_off` (stationary
  share online p_on / (p_on + p_off));
- `diurnal`: online while sin(2 pi (round / period + phase)) > threshold, the phase drawn
  per device (so devices of one time zone come and go together);
- a trace: a JSON file {"<partition id>": [1, 0, 1, ...]} (round r uses item r - 1,
  repeating), e.g. recorded from real devices.

`FleetFile` rows may override any profile field per profile name (JSON: {"rpi4": {"speed":
0.3, ...}}); a missing or negative field fails before training, naming it.

Speeds, SNRs and memory come from `edge_lam.config.hardware`, the one profile table the serving fleet
reads too (sources there). Speed: compute relative to a 2-core x86 vCPU. SNRs: Wi-Fi links
of 10-25 dB mean, typical indoor ranges. Memory (`memory_mib`, what `fleet.rank-from='capability'` gives a
simulated device, S1): the board's RAM less what the OS keeps; 0 (a profile a fleet file
adds without it): not modelled, the device's own measurement counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from edge_lam.config.hardware import HARDWARE
from edge_lam.config.options import ConfigError


@dataclass(frozen=True)
class FleetProfile:
    speed: float  # compute speed relative to the measuring machine
    snr_db: float  # mean uplink SNR
    p_on: float = 1.0  # markov: P(off -> on) per round
    p_off: float = 0.0  # markov: P(on -> off) per round
    memory_mib: float = 0.0  # free memory for training (0: not modelled, the device's own)

    def check(self, name: str) -> None:
        if not self.speed > 0:
            raise ConfigError(f"fleet profile '{name}': speed must be > 0, got {self.speed}")
        for key in ("p_on", "p_off"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"fleet profile '{name}': {key} must be in [0, 1], got "
                                  f"{value}")
        if not self.memory_mib >= 0:
            raise ConfigError(f"fleet profile '{name}': memory_mib must be >= 0 (0: the "
                              f"device's own measurement), got {self.memory_mib}")


PROFILES = {name: FleetProfile(speed=hw.speed, snr_db=hw.snr_db, memory_mib=hw.memory_mib)
            for name, hw in HARDWARE.items()}


def load_profiles(path: str) -> dict[str, FleetProfile]:
    """PROFILES, with the fields a fleet file gives per profile name overriding them."""
    out = dict(PROFILES)
    if not path:
        return out
    try:
        rows = json.loads(Path(path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"fleet.file {path}: {err}") from err
    if not isinstance(rows, dict):
        raise ConfigError(f"fleet.file {path}: expected a JSON object of profile -> fields")
    known = {f.name for f in fields(FleetProfile)}
    for name, row in rows.items():
        if not isinstance(row, dict):
            raise ConfigError(f"fleet.file {path}: profile '{name}' must be an object")
        unknown = set(row) - known
        if unknown:
            raise ConfigError(f"fleet.file {path}: profile '{name}' has unknown field(s) "
                              f"{', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
        base = out.get(name)
        missing = [k for k in ("speed", "snr_db") if k not in row] if base is None else []
        if missing:
            raise ConfigError(f"fleet.file {path}: new profile '{name}' lacks "
                              f"{', '.join(missing)}")
        try:
            profile = replace(base, **row) if base else FleetProfile(**row)
        except TypeError as err:
            raise ConfigError(f"fleet.file {path}: profile '{name}': {err}") from err
        profile.check(name)
        out[name] = profile
    return out


class Availability:
    """Who is online in each round: one process per device (partition id)."""

    def __init__(self, kind: str, partitions: list[int], profiles: list[FleetProfile],
                 seed: int, period: float = 24.0, threshold: float = 0.0):
        self.kind, self.partitions = kind, list(partitions)
        self.rng = np.random.default_rng([seed, 5077])
        self.profiles = profiles
        self.period, self.threshold = period, threshold
        self.phase = self.rng.random(len(partitions))
        self.online = np.ones(len(partitions), dtype=bool)
        self.trace = _read_trace(kind, self.partitions) if kind not in (
            "always", "markov", "diurnal") else None

    def step(self, server_round: int) -> np.ndarray:
        """(K,) bool: who is online in `server_round` (rounds from 1)."""
        if self.kind == "always":
            return np.ones(len(self.partitions), dtype=bool)
        if self.kind == "markov":
            u = self.rng.random(len(self.partitions))
            p_on = np.array([p.p_on for p in self.profiles])
            p_off = np.array([p.p_off for p in self.profiles])
            self.online = np.where(self.online, u >= p_off, u < p_on)
            return self.online.copy()
        if self.kind == "diurnal":
            angle = 2 * np.pi * (server_round / self.period + self.phase)
            return np.sin(angle) > self.threshold
        return np.array([t[(server_round - 1) % len(t)] > 0 for t in self.trace])


def _read_trace(path: str, partitions: list[int]) -> list[list[int]]:
    try:
        raw = json.loads(Path(path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"fleet.availability: '{path}' is not always/markov/diurnal and not "
                          f"a readable JSON trace ({err})") from err
    out = []
    for p in partitions:
        trace = raw.get(str(p)) if isinstance(raw, dict) else None
        if not isinstance(trace, list) or not trace:
            raise ConfigError(f"fleet.availability trace {path}: no list of 0/1 for "
                              f"partition '{p}'")
        out.append([int(x) for x in trace])
    return out
