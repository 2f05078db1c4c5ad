"""Device selection policies (`fleet.selection`) as objects the fleet clock asks each round:
`choose(fleet, nodes, online, snr, bits_up, rng) -> (chosen (K,) bool, bandwidth_hz (K,))`,
over the round's connected `nodes` (their `online` mask, fading `snr`, uplink `bits_up`).
The arithmetic is in `strategies.fleet.select` (pure numpy); a policy only gathers its
inputs from the fleet's members. `POLICIES`: name -> policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from strategies.fleet.select import longest_absent, oort_utility, random_subset, schedule
from strategies.fleet.wireless import comm_seconds

if TYPE_CHECKING:
    from strategies.fleet.scheduler import FleetClock


class SelectionPolicy(Protocol):
    def choose(self, fleet: FleetClock, nodes: list[int], online: np.ndarray, snr: np.ndarray,
               bits: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        ...


def even_split(fleet: FleetClock, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`chosen`, each with an equal share of the uplink bandwidth."""
    share = fleet.total_hz / max(int(chosen.sum()), 1)
    return chosen, np.where(chosen, share, 0.0)


class AllOnline:
    """`all`: every online device, the bandwidth split evenly."""

    def choose(self, fleet, nodes, online, snr, bits, rng):
        return even_split(fleet, online.copy())


class Random:
    """`random`: `fleet.per-round` online devices uniformly (FedAvg's sampling)."""

    def choose(self, fleet, nodes, online, snr, bits, rng):
        return even_split(fleet, random_subset(online, fleet.per_round or len(nodes), rng))


class LongestAbsent:
    """`fedlaavg`: the `fleet.per-round` online devices absent longest (S5)."""

    def choose(self, fleet, nodes, online, snr, bits, rng):
        last = np.array([fleet.members[n].last_round for n in nodes])
        return even_split(fleet, longest_absent(online, last, fleet.per_round or len(nodes),
                                                rng))


class Oort:
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


class JointS2:
    """`s2`: joint selection and bandwidth allocation, largest progress per simulated
    second (S2)."""

    def choose(self, fleet, nodes, online, snr, bits, rng):
        comp = fleet.predicted_comp(nodes)
        down = comm_seconds(bits, fleet.down_hz / max(int(online.sum()), 1), snr)
        progress = np.where(online, [fleet.members[n].examples for n in nodes], 0)
        alloc = schedule(progress.astype(float), bits, down, comp, snr, fleet.total_hz)
        return alloc.selected, alloc.bandwidth_hz


POLICIES: dict[str, SelectionPolicy] = {"all": AllOnline(), "random": Random(),
                                        "oort": Oort(), "s2": JointS2(),
                                        "fedlaavg": LongestAbsent()}
