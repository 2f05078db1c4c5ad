"""Device selection policies (`fleet.selection`) as objects the fleet clock asks each round:
`choose(fleet, nodes, online, snr, bits_up, rng) -> (chosen (K,) bool, bandwidth_hz (K,))`,
over the round's connected `nodes` (their `online` mask, fading `snr`, uplink `bits_up`).
The arithmetic is in `strategies.fleet.select` (pure numpy); a policy only gathers its
inputs from the fleet's members.

SELECTION is the policies' `edge_lam.config.registry.Registry` (kind "selection", declared here; the
config and `strategies.fleet.scheduler.FleetClock` find a policy through it, a third-party
one through the `edge_lam.selection` entry points). Besides `choose`, a policy says what
else it needs (`SelectionPolicy`'s defaults hold for one that does not):
- `keeps_latest_updates`: aggregation runs over every device's latest update, stale ones
  included (FedLaAvg, S5; the strategy keeps them, `scheduler.LatestUpdates`);
- `check(cfg)`: what it needs of the rest of the config (ConfigError), run at parse time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from strategies.fleet.select import longest_absent, oort_utility, random_subset, schedule
from strategies.fleet.wireless import comm_seconds
from edge_lam.config.options import ConfigError
from edge_lam.config.registry import registry

if TYPE_CHECKING:
    from strategies.fleet.scheduler import FleetClock
    from edge_lam.config.run_config import RunConfig


class SelectionPolicy:
    """The base of a policy: override `choose`, and what differs below."""

    keeps_latest_updates = False  # aggregate every device's latest update (FedLaAvg)

    def choose(self, fleet: FleetClock, nodes: list[int], online: np.ndarray, snr: np.ndarray,
               bits: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def check(self, cfg: RunConfig) -> None:
        """Raise ConfigError when the config does not suit this policy (at parse time)."""


def even_split(fleet: FleetClock, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`chosen`, each with an equal share of the uplink bandwidth."""
    share = fleet.total_hz / max(int(chosen.sum()), 1)
    return chosen, np.where(chosen, share, 0.0)


class AllOnline(SelectionPolicy):
    """`all`: every online device, the bandwidth split evenly."""

    def choose(self, fleet, nodes, online, snr, bits, rng):
        return even_split(fleet, online.copy())


class Random(SelectionPolicy):
    """`random`: `fleet.per-round` online devices uniformly (FedAvg's sampling)."""

    def choose(self, fleet, nodes, online, snr, bits, rng):
        return even_split(fleet, random_subset(online, fleet.per_round or len(nodes), rng))


class LongestAbsent(SelectionPolicy):
    """`fedlaavg`: the `fleet.per-round` online devices absent longest (S5); aggregation
    runs over every device's latest update, zero-padded to r_max and averaged (the LoRA
    aggregation rules whose `pads_factors` says they compute that mean)."""

    keeps_latest_updates = True

    def check(self, cfg: RunConfig) -> None:
        rules = registry("aggregation rule")
        padding = [n for n, rule in rules.items() if getattr(rule, "pads_factors", False)]
        if cfg.aggregation not in padding:
            names = " or ".join(f"'{n}'" for n in padding)
            raise ConfigError(f"fleet.selection='fedlaavg' averages updates of the LoRA "
                              f"factors: use strategy={names}, not '{cfg.strategy}'")

    def choose(self, fleet, nodes, online, snr, bits, rng):
        last = np.array([fleet.members[n].last_round for n in nodes])
        return even_split(fleet, longest_absent(online, last, fleet.per_round or len(nodes),
                                                rng))


class Oort(SelectionPolicy):
    """`oort`: the `fleet.per-round` online devices of largest Oort utility, from the last
    round's loss (never-seen devices first)."""

    def choose(self, fleet, nodes, online, snr, bits, rng):
        count = fleet.per_round or len(nodes)
        members = [fleet.members[n] for n in nodes]
        comp = fleet.predicted_comp(nodes)
        up = comm_seconds(bits, fleet.total_hz / max(count, 1), snr)
        t = comp + up
        loss = np.array([m.loss if np.isfinite(m.loss) else np.inf for m in members])
        util = oort_utility(np.array([m.examples for m in members]), loss ** 2, t,
                            preferred_s=float(np.median(t[online])) if online.any() else 1.0)
        util = np.where(online, np.nan_to_num(util, posinf=np.finfo(float).max), -np.inf)
        out = np.zeros(len(nodes), dtype=bool)
        order = np.argsort(-util, kind="stable")[:min(count, int(online.sum()))]
        out[order] = True
        return even_split(fleet, out)


class JointS2(SelectionPolicy):
    """`s2`: joint selection and bandwidth allocation, largest progress per simulated
    second (S2)."""

    def choose(self, fleet, nodes, online, snr, bits, rng):
        comp = fleet.predicted_comp(nodes)
        down = comm_seconds(bits, fleet.down_hz / max(int(online.sum()), 1), snr)
        progress = np.where(online, [fleet.members[n].examples for n in nodes], 0)
        alloc = schedule(progress.astype(float), bits, down, comp, snr, fleet.total_hz)
        return alloc.selected, alloc.bandwidth_hz


SELECTION = registry("selection", key="fleet.selection")
for _name, _policy in (("all", AllOnline()), ("random", Random()), ("oort", Oort()),
                       ("s2", JointS2()), ("fedlaavg", LongestAbsent())):
    SELECTION.register(_name, _policy)
