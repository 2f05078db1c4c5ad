"""Which devices train this round, and how the uplink bandwidth is split (S2, S5), pure numpy.

Joint selection and bandwidth allocation (S2). For a deadline D every selected device k must
finish T_k^down + T_k^comp + T_k^up <= D, so it needs at least

    b_k(D) = S_k / ((D - T_k^down - T_k^comp) log2(1 + SNR_k))        (inf if D is too short)

of the total bandwidth B. Choosing the devices is then a knapsack: maximise the progress
sum_k v_k (v_k: the device's examples this round, or any progress weight) subject to
sum_k b_k(D) <= B. `allocate` solves it exactly (dynamic programme over integer progress,
for small fleets) or greedily by progress per Hz (large fleets; optimal up to one device
for the fractional relaxation), and gives the bandwidth left over to the selected devices in
proportion to their need. `schedule` tries candidate deadlines (each device's finish time
with the whole bandwidth and with an equal share), shrinks each candidate selection's
deadline to the shortest at which its needs still fit (bisection), and keeps the selection
of largest progress per second of round, sum v_k / D: the learning progress per unit of
simulated time.

Baselines: `random_subset` (FedAvg's sampling) and `oort_utility` (Oort, Lai et al. OSDI'21:
statistical utility |B_k| sqrt(mean loss^2), times (T / t_k)^alpha for devices slower than
the preferred round time T).

FedLaAvg (S5): `longest_absent` prefers, among the available devices, those that have gone
longest without taking part.

The selection policies (`fleet.selection`) that call these are objects registered in
`strategies.fleet.policy`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from strategies.fleet.wireless import bandwidth_for

EXACT_LIMIT = 40  # devices up to which `allocate` solves the knapsack exactly
MAX_CANDIDATES = 128  # deadlines `schedule` tries at most


@dataclass(frozen=True)
class Allocation:
    selected: np.ndarray  # (K,) bool
    bandwidth_hz: np.ndarray  # (K,) 0 for devices not selected
    deadline_s: float
    progress: float  # sum of v_k over the selected

    @property
    def progress_per_s(self) -> float:
        return self.progress / self.deadline_s if self.deadline_s > 0 else 0.0


def allocate(progress: np.ndarray, need_hz: np.ndarray, total_hz: float,
             exact: bool | None = None) -> np.ndarray:
    """(K,) bool: the devices of largest total progress whose needs fit `total_hz`.
    `progress` must be whole numbers for the exact solver (examples); `exact=None`: exact
    up to EXACT_LIMIT feasible devices."""
    progress = np.asarray(progress, dtype=np.float64)
    need = np.asarray(need_hz, dtype=np.float64)
    fits = np.isfinite(need) & (need <= total_hz) & (progress > 0)
    idx = np.flatnonzero(fits)
    if exact is None:
        exact = len(idx) <= EXACT_LIMIT
    chosen = _knapsack_exact(progress[idx], need[idx], total_hz) if exact else \
        _knapsack_greedy(progress[idx], need[idx], total_hz)
    out = np.zeros(len(progress), dtype=bool)
    out[idx[chosen]] = True
    return out


def _knapsack_exact(values: np.ndarray, weights: np.ndarray, capacity: float) -> np.ndarray:
    """Max sum of integer values with sum of weights <= capacity: least[v] = the least
    weight reaching value v, one item at a time (O(K V))."""
    v = np.rint(values).astype(np.int64)
    if np.any(np.abs(v - values) > 1e-9):
        raise ValueError("the exact allocation needs whole-number progress (examples); use "
                         "exact=False for fractional progress")
    total = int(v.sum())
    least = np.full(total + 1, np.inf)
    least[0] = 0.0
    took = np.zeros((len(v), total + 1), dtype=bool)
    for i, (value, weight) in enumerate(zip(v, weights)):
        shifted = np.full(total + 1, np.inf)
        shifted[value:] = least[:total + 1 - value] + weight
        took[i] = shifted < least
        least = np.minimum(least, shifted)
    best = int(np.flatnonzero(least <= capacity * (1 + 1e-12)).max())
    chosen = np.zeros(len(v), dtype=bool)
    for i in range(len(v) - 1, -1, -1):  # walk back the items that reached `best`
        if took[i, best]:
            chosen[i] = True
            best -= int(v[i])
    return chosen


def _knapsack_greedy(values: np.ndarray, weights: np.ndarray, capacity: float) -> np.ndarray:
    """Devices by progress per Hz, each taken while it fits."""
    chosen = np.zeros(len(values), dtype=bool)
    left = capacity
    for i in np.argsort(-values / np.maximum(weights, 1e-300), kind="stable"):
        if weights[i] <= left:
            chosen[i] = True
            left -= weights[i]
    return chosen


def schedule(progress: np.ndarray, bits_up: np.ndarray, down_s: np.ndarray,
             comp_s: np.ndarray, snr: np.ndarray, total_hz: float,
             max_deadline_s: float = np.inf, exact: bool | None = None) -> Allocation:
    """S2: over candidate deadlines, the selection and bandwidth split of largest progress
    per second of round. Candidates: for each device, the deadline at which it could finish
    with the whole bandwidth, and that with an equal 1/K share."""
    fixed = np.asarray(down_s, dtype=np.float64) + np.asarray(comp_s, dtype=np.float64)
    k = len(fixed)
    candidates = []
    for share in (total_hz, total_hz / max(k, 1)):
        t_up = bits_up / np.maximum(share * np.log2(1 + snr), 1e-300)
        candidates.append(fixed + t_up)
    deadlines = np.unique(np.concatenate(candidates))
    deadlines = deadlines[np.isfinite(deadlines) & (deadlines <= max_deadline_s)]
    if len(deadlines) > MAX_CANDIDATES:  # large fleets: quantiles of the candidates
        deadlines = np.unique(np.quantile(deadlines, np.linspace(0, 1, MAX_CANDIDATES)))
    best = Allocation(np.zeros(k, bool), np.zeros(k), 0.0, 0.0)
    for deadline in deadlines:
        need = bandwidth_for(bits_up, deadline - fixed, snr)
        need[deadline - fixed <= 0] = np.inf
        chosen = allocate(progress, need, total_hz, exact)
        gain = float(np.asarray(progress)[chosen].sum())
        if not chosen.any():
            continue
        tight = _tightest_deadline(bits_up[chosen], fixed[chosen], snr[chosen], total_hz,
                                   float(deadline))
        if gain / tight > best.progress_per_s + 1e-12:
            need = bandwidth_for(bits_up, tight - fixed, snr)
            best = Allocation(chosen, _share_leftover(need, chosen, total_hz), tight, gain)
    return best


def _tightest_deadline(bits: np.ndarray, fixed: np.ndarray, snr: np.ndarray, total_hz: float,
                       feasible: float, iterations: int = 60) -> float:
    """The shortest deadline at which these devices' needs still fit the bandwidth
    (sum_k b_k(D) decreases in D: bisection between their slowest fixed time and a
    deadline known to fit)."""
    lo, hi = float(fixed.max()), feasible
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if bandwidth_for(bits, mid - fixed, snr).sum() <= total_hz:
            hi = mid
        else:
            lo = mid
    return hi


def _share_leftover(need: np.ndarray, chosen: np.ndarray, total_hz: float) -> np.ndarray:
    """Each selected device's need, scaled up so the whole bandwidth is used."""
    out = np.where(chosen, need, 0.0)
    used = out.sum()
    return out * (total_hz / used) if used > 0 else out


def random_subset(available: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """(K,) bool: `count` of the available devices, uniformly (FedAvg's sampling)."""
    idx = np.flatnonzero(available)
    out = np.zeros(len(available), dtype=bool)
    out[rng.choice(idx, size=min(count, len(idx)), replace=False)] = True
    return out


def oort_utility(examples: np.ndarray, loss_sq_mean: np.ndarray, round_s: np.ndarray,
                 preferred_s: float, alpha: float = 2.0) -> np.ndarray:
    """Oort: |B_k| sqrt(mean of squared losses) x (T / t_k)^alpha where t_k > T."""
    stat = np.asarray(examples) * np.sqrt(np.asarray(loss_sq_mean))
    slow = np.asarray(round_s) > preferred_s
    penalty = np.where(slow, (preferred_s / np.maximum(round_s, 1e-300)) ** alpha, 1.0)
    return stat * penalty


def longest_absent(available: np.ndarray, last_round: np.ndarray, count: int,
                   rng: np.random.Generator) -> np.ndarray:
    """FedLaAvg (S5): `count` available devices, those absent longest first (last_round -1:
    never took part), ties broken at random."""
    idx = np.flatnonzero(available)
    order = np.lexsort((rng.random(len(idx)), np.asarray(last_round)[idx]))
    out = np.zeros(len(available), dtype=bool)
    out[idx[order[:count]]] = True
    return out
