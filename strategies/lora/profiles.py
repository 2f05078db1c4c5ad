"""Who is who: each device's profile (asked once, QUERY), and the rank it trains at (S1).

`ProfileDirectory` keeps the profiles of the devices met so far (a checkpoint part,
`strategies.lora.resume`); the rank comes from the profile (`cfg.rank_for`) or, with
`fleet.rank-from='capability'`, from what the device measured (`capability_rank`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from strategies.fleet.model import FleetProfile
from strategies.lora.resume import Restored
from edge_lam.training.capability import (Measured, choose_rank, memory_needed_mib,
                                         planned_length)
from edge_lam.config.run_config import RunConfig
from edge_lam.messaging import query_profiles
from edge_lam.logs import get_logger
from edge_lam.training.lora import State
from edge_lam.config.options import ConfigError

log = get_logger()


@dataclass(frozen=True)
class NodeProfile:
    node_id: int
    device: str
    partition_id: int
    rank: int
    # what the device said it runs on (platform.machine(): aarch64, ...); keyword-only, so a
    # subclass's own fields keep their positions
    platform: str = field(default="", kw_only=True)


def device_budget(measured: Measured, profile: FleetProfile) -> tuple[float, float, str]:
    """(free MiB, seconds per step on the device, where they come from) for the rank rule:
    a real device's own measurement; a simulated one's fleet model (`memory_mib`, and the
    step time measured here / `speed`, as the simulated clock scales train-s). A profile
    without memory_mib keeps the measured memory."""
    if not measured.simulated:
        return measured.free_memory_mib, measured.step_s, "measured"
    memory = profile.memory_mib or measured.free_memory_mib
    return memory, measured.step_s / profile.speed, "fleet model"


def profile_query(cfg: RunConfig, label_names: tuple[str, ...]) -> dict:
    """The profile QUERY's config: with `fleet.rank-from='capability'`, ask devices to
    measure, with the run config and labels their measurement trains with."""
    if cfg.fleet.rank_from != "capability":
        return {}
    return {"measure": True, "run-config": json.dumps(cfg.to_dict()),
            "label-names": list(label_names)}


def capability_rank(cfg: RunConfig, node: int, device: str, fleet_profile: FleetProfile,
                    p: ConfigRecord) -> tuple[int, dict]:
    """S1's capability rank: the largest that fits the node's memory and the deadline
    (`edge_lam.training.capability.choose_rank`), from its measurement, or in simulation from its
    fleet profile (`device_budget`); and the record of it for metrics.jsonl."""
    measured = Measured.from_reply(p)
    free_mib, step_s, source = device_budget(measured, fleet_profile)
    t = cfg.train
    try:
        rank = choose_rank(measured.footprint, free_mib, step_s, measured.step_rank,
                           local_steps=t.local_steps, deadline_s=cfg.fleet.deadline_s,
                           batch=t.batch_size, max_length=planned_length(cfg), r_max=cfg.r_max)
    except ConfigError as err:
        raise ConfigError(f"'{device}' device, {source}: {err}") from err
    need = memory_needed_mib(measured.footprint, rank, t.batch_size, planned_length(cfg))
    log.info("node %d ('%s', %s): %.0f MiB free, %.4f s per step -> LoRA rank %d "
             "(needs %.0f MiB)", node, device, source, free_mib, step_s, rank, need)
    return rank, {**measured.as_dict(), "source": source, "memory_mib": free_mib,
                  "device_step_s": step_s, "rank": rank, "needs_mib": need}


class ProfileDirectory:
    """The profiles of the devices met so far (node -> NodeProfile), a checkpoint part:
    a device of an interrupted run keeps the device name and rank it trained at."""

    entry = "profiles"

    def __init__(self):
        self.profiles: dict[int, NodeProfile] = {}
        self.saved: dict[str, dict] = {}  # saved name -> profile, until met again
        self._waiting: dict[int, str] = {}  # placeholder node id -> saved name

    def learn(self, grid: Grid, node_ids: Iterable[int], timeout: float,
              make: Callable[[int, ConfigRecord], NodeProfile], ask: dict) -> None:
        """Ask devices we have not met yet for their profile (one QUERY each)."""
        unknown = [n for n in node_ids if n not in self.profiles]
        for node, profile in query_profiles(grid, unknown, timeout, make, ask).items():
            self.profiles[node] = profile
            log.info("node %d is a '%s' device (partition %d): LoRA rank %d",
                     node, profile.device, profile.partition_id, profile.rank)

    def checkpoint_state(self, name_of: Callable[[int], str]) -> tuple[dict, State]:
        out = {k: dict(v) for k, v in self.saved.items()}  # not met again yet
        out.update({name_of(n): {"device": p.device, "rank": p.rank,
                                 "partition_id": p.partition_id}
                    for n, p in self.profiles.items()})
        return out, {}

    def restore(self, saved: dict, restored: Restored) -> None:
        self.saved = {k: dict(v) for k, v in saved.items()}
        self._waiting = {restored.node_of[k]: k for k in self.saved}

    def move(self, old: int, new: int) -> None:
        """Met again: the device keeps the device name and rank it trained at."""
        name = self._waiting.pop(old, None)
        if name is None:
            return
        saved, profile = self.saved.pop(name), self.profiles[new]
        if saved["rank"] != profile.rank or saved["device"] != profile.device:
            log.warning("node %d (%s) trained as '%s' at rank %d before the interruption "
                        "and stays so (it says '%s', rank %d now)", new, name,
                        saved["device"], saved["rank"], profile.device, profile.rank)
            self.profiles[new] = replace(profile, device=saved["device"],
                                         rank=int(saved["rank"]))
