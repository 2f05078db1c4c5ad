"""Placing chain-of-thought steps on devices (S8): a path graph, capacity constraints.

A chain of S steps runs in order; step s on device d costs (S8, with `fleet.ServeDevice`)

    node[s, d] = t_down(in_bytes_s, d) + compute_s / speed_d + t_up(out_bytes_s, d)
    edge[s, d', d] = seconds to hand the chain from step s on d' to step s + 1 on d

and is infeasible (inf) where the step's memory (the model's parameters plus the KV cache of
its context) exceeds the device's. With binary x[s, d] (step s on device d) the placement

    minimise   sum_s sum_d node[s, d] x[s, d] + sum_s sum_{d', d} edge[s, d', d] x[s, d'] x[s+1, d]
    subject to sum_d x[s, d] = 1 (each step placed once),  sum_s x[s, d] <= capacity_d

is solved by:
- `exact`: Viterbi dynamic programming DP[s][d] = min_d' DP[s-1][d'] + edge[s-1, d', d] +
  node[s, d] where no capacity binds; else an ILP (scipy.optimize.milp, HiGHS) with the
  hand-overs as flow variables y[s, d', d] (sum_d y = x[s, d'], sum_d' y = x[s+1, d]);
- `heuristic`: the DP ignoring capacities, steps moved off over-full devices at the least
  extra cost, then single moves and pairwise swaps while they help (O(S^2 D) per pass);
- `greedy`: step after step, the cheapest device with capacity left given the previous one;
- `random`: a uniformly drawn feasible device with capacity left for each step;
- `brute_force`: every one of D^S assignments (tests, tiny cases only).

In the Flower relay every hand-over goes through the server (the chain comes up with the
step and goes down with the next query), so `chain_problem(links='relay')` folds the
transfers into `node` and `edge` is zero; `links='direct'` models device-to-device links (a
device that runs consecutive steps keeps the chain), where hand-overs couple the steps.
Pure numpy/scipy: no model, no Flower.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from server_app.serve.fleet import ServeDevice
from edge_lam.config.options import ConfigError, RunAborted

METHODS = ("exact", "heuristic", "greedy", "random")


@dataclass(frozen=True)
class ChainSteps:
    """What each planned step of a chain needs, measured or predicted on this machine."""

    compute_s: np.ndarray  # (S,) seconds on the measuring machine
    in_bytes: np.ndarray  # (S,) server -> device: the question and the chain so far
    out_bytes: np.ndarray  # (S,) device -> server: the step's text
    memory_mib: np.ndarray  # (S,) parameters + KV cache of the step's context


@dataclass(frozen=True)
class Problem:
    node: np.ndarray  # (S, D) seconds of step s on device d (inf: does not fit)
    edge: np.ndarray  # (S-1, D, D) hand-over seconds, step s on d' -> step s+1 on d
    capacity: np.ndarray  # (D,) most steps per device

    @property
    def shape(self) -> tuple[int, int]:
        return self.node.shape


@dataclass(frozen=True)
class Placement:
    devices: tuple[int, ...]  # device index of each step
    seconds: float  # predicted chain latency (S8 objective)
    method: str
    solve_s: float  # wall seconds the solver took


def chain_problem(steps: ChainSteps, fleet: list[ServeDevice], device_steps: int,
                  links: str = "relay") -> Problem:
    """The placement problem of one chain on `fleet`. `relay` (what the Flower flow does):
    every step's input goes down from the server and its text comes up, edge = 0.
    `direct`: the question goes down to step 1's device, the chain passes device to device
    (up from d', down to d: seconds over the slower link, nothing when d' = d keeps it) and
    only the last step's text comes up."""
    s_count, d_count = len(steps.compute_s), len(fleet)
    node = np.empty((s_count, d_count))
    edge = np.zeros((max(s_count - 1, 0), d_count, d_count))
    relay = links == "relay"
    for d, dev in enumerate(fleet):
        node[:, d] = [dev.compute_s(c) for c in steps.compute_s]
        for s in range(s_count):
            if relay or s == 0:
                node[s, d] += dev.send_s(steps.in_bytes[s], up=False)
            if relay or s == s_count - 1:
                node[s, d] += dev.send_s(steps.out_bytes[s], up=True)
        node[np.asarray(steps.memory_mib) > dev.memory_mib, d] = np.inf
    if not relay:
        for s in range(s_count - 1):
            for a, src in enumerate(fleet):
                for b, dst in enumerate(fleet):
                    mbps = min(src.up_mbps, dst.down_mbps)
                    edge[s, a, b] = 0.0 if a == b else src.latency_s + dst.latency_s + \
                        8.0 * steps.in_bytes[s + 1] / (1e6 * mbps)
    return Problem(node, edge, np.full(d_count, device_steps))


def chain_seconds(problem: Problem, devices: tuple[int, ...] | list[int]) -> float:
    """The objective of one assignment (inf where a step does not fit or capacity is broken)."""
    if (np.bincount(np.asarray(devices, dtype=int), minlength=problem.shape[1])
            > problem.capacity).any():
        return float("inf")
    return _path_seconds(problem, list(devices))


def check_feasible(problem: Problem) -> None:
    """ConfigError saying why no placement exists (a step fits nowhere, too few slots)."""
    s_count, _ = problem.shape
    for s in range(s_count):
        if not np.isfinite(problem.node[s]).any():
            raise RunAborted(f"CoT step {s + 1} fits on no device of serve.fleet (too little "
                             "memory for the model and its context): add a larger device or "
                             "lower serve.cot-max-steps / serve.cot-step-tokens")
    if problem.capacity.sum() < s_count:
        raise ConfigError(f"{s_count} steps but the fleet's {len(problem.capacity)} devices "
                          f"take only {int(problem.capacity.sum())} (serve.cot-device-steps): "
                          "lower serve.cot-max-steps or raise serve.cot-device-steps")


def solve(problem: Problem, method: str, seed: int = 0) -> Placement:
    """The placement of `method` (METHODS), timed."""
    if method not in METHODS:
        raise ValueError(f"serve.cot-placement='{method}' is not known: use one of "
                         f"{', '.join(METHODS)}")
    check_feasible(problem)
    start = time.perf_counter()
    if method == "exact":
        devices = exact(problem)
    elif method == "heuristic":
        devices = heuristic(problem)
    elif method == "greedy":
        devices = greedy(problem)
    else:
        devices = random_placement(problem, np.random.default_rng(seed))
    took = time.perf_counter() - start
    return Placement(tuple(int(d) for d in devices), chain_seconds(problem, devices), method,
                     took)


def viterbi(node: np.ndarray, edge: np.ndarray) -> list[int]:
    """argmin over all paths of sum node + sum edge, capacities ignored (S8's DP)."""
    s_count, d_count = node.shape
    best = node[0].copy()  # (D,) DP[0][d]
    back = np.zeros((s_count, d_count), dtype=int)
    for s in range(1, s_count):
        via = best[:, None] + edge[s - 1]  # (D', D)
        back[s] = via.argmin(axis=0)
        best = via[back[s], np.arange(d_count)] + node[s]
    path = [int(best.argmin())]
    for s in range(s_count - 1, 0, -1):
        path.append(int(back[s, path[-1]]))
    return path[::-1]


def exact(problem: Problem) -> list[int]:
    """The optimum: the DP where no device could be asked for more than its capacity, else
    the ILP."""
    s_count, _ = problem.shape
    if (problem.capacity >= s_count).all():
        return viterbi(problem.node, problem.edge)
    return _milp(problem)


def _milp(problem: Problem) -> list[int]:
    """The ILP of the module docstring: x (S*D) then y (S-1)*D*D, all binary."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    s_count, d_count = problem.shape
    pairs = s_count - 1 if problem.edge.any() else 0  # no hand-over costs: x alone
    nx, ny = s_count * d_count, pairs * d_count * d_count
    fits = np.isfinite(problem.node)
    cost = np.concatenate([np.where(fits, problem.node, 0.0).ravel(),
                           problem.edge[:pairs].ravel()])
    cost *= 1e6 / max(cost.max(initial=0.0), 1e-300)  # HiGHS' absolute MIP gap is 1e-6
    rows = s_count + d_count + 2 * pairs * d_count
    a = lil_matrix((rows, nx + ny))
    lo, hi = np.zeros(rows), np.zeros(rows)

    def xi(s: int, d: int) -> int:  # column of x[s, d]
        return s * d_count + d

    def yi(s: int, dp: int, d: int) -> int:  # column of y[s, dp, d]
        return nx + (s * d_count + dp) * d_count + d

    for s in range(s_count):  # each step placed once
        a[s, [xi(s, d) for d in range(d_count)]] = 1
        lo[s] = hi[s] = 1
    for d in range(d_count):  # capacity
        a[s_count + d, [xi(s, d) for s in range(s_count)]] = 1
        hi[s_count + d] = problem.capacity[d]
    r = s_count + d_count
    for s in range(pairs):  # hand-over flow: sum_d y = x[s, d'], sum_d' y = x[s+1, d]
        for d in range(d_count):
            a[r, [yi(s, d, e) for e in range(d_count)]] = 1
            a[r, xi(s, d)] = -1
            a[r + 1, [yi(s, e, d) for e in range(d_count)]] = 1
            a[r + 1, xi(s + 1, d)] = -1
            r += 2
    upper = np.concatenate([fits.ravel().astype(float), np.ones(ny)])
    res = milp(cost, constraints=LinearConstraint(a.tocsr(), lo, hi),
               integrality=np.ones(nx + ny), bounds=Bounds(np.zeros(nx + ny), upper),
               options={"mip_rel_gap": 0.0})  # HiGHS stops at a 1e-4 gap by default
    if res.x is None:
        raise RunAborted(f"the placement ILP found no solution ({res.message}): check "
                         "serve.fleet memory and serve.cot-device-steps")
    return [int(v) for v in res.x[:nx].reshape(s_count, d_count).argmax(axis=1)]


def brute_force(problem: Problem) -> tuple[tuple[int, ...], float]:
    """(assignment, seconds) of the best of all D^S assignments."""
    s_count, d_count = problem.shape
    best, best_s = (), float("inf")
    for devices in itertools.product(range(d_count), repeat=s_count):
        secs = chain_seconds(problem, devices)
        if secs < best_s:
            best, best_s = devices, secs
    return best, best_s


def greedy(problem: Problem) -> list[int]:
    """Step after step, the cheapest device (node + hand-over) that fits and has room."""
    s_count = problem.shape[0]
    left = problem.capacity.astype(int).copy()
    out: list[int] = []
    for s in range(s_count):
        cost = problem.node[s] + (problem.edge[s - 1, out[-1]] if out else 0.0)
        cost = np.where(left > 0, cost, np.inf)
        if not np.isfinite(cost).any():
            raise RunAborted(f"greedy placement ran out of devices at step {s + 1}: use "
                             "serve.cot-placement='exact'")
        out.append(int(cost.argmin()))
        left[out[-1]] -= 1
    return out


def random_placement(problem: Problem, rng: np.random.Generator, tries: int = 100
                     ) -> list[int]:
    """A uniformly drawn feasible device with room for each step (retried on a dead end)."""
    s_count, _ = problem.shape
    for _ in range(tries):
        left = problem.capacity.astype(int).copy()
        out: list[int] = []
        for s in range(s_count):
            ok = np.flatnonzero(np.isfinite(problem.node[s]) & (left > 0))
            if not len(ok):
                break
            out.append(int(rng.choice(ok)))
            left[out[-1]] -= 1
        if len(out) == s_count:
            return out
    raise RunAborted("random placement found no feasible assignment: use "
                     "serve.cot-placement='exact'")


def heuristic(problem: Problem, max_passes: int = 50) -> list[int]:
    """DP without capacities, repaired, then improved by moves and swaps (local optimum)."""
    place = viterbi(problem.node, problem.edge)
    place = _repair(problem, place)
    current = chain_seconds(problem, place)
    for _ in range(max_passes):
        best, best_s = place, current
        for cand in _neighbours(problem, place):
            secs = chain_seconds(problem, cand)
            if secs < best_s - 1e-12:
                best, best_s = cand, secs
        if best is place:
            break
        place, current = best, best_s
    return place


def _repair(problem: Problem, place: list[int]) -> list[int]:
    """Move steps off over-full devices, each time the move that costs least."""
    place = list(place)
    _, d_count = problem.shape
    while True:
        count = np.bincount(place, minlength=d_count)
        over = np.flatnonzero(count > problem.capacity)
        if not len(over):
            return place
        room = np.flatnonzero(count < problem.capacity)
        best, best_s = None, float("inf")
        for s in (s for s in range(len(place)) if place[s] in over):
            for d in room:
                cand = place[:s] + [int(d)] + place[s + 1:]
                secs = _path_seconds(problem, cand)
                if secs < best_s:
                    best, best_s = cand, secs
        if best is None:
            raise RunAborted("heuristic placement could not meet the capacities: use "
                             "serve.cot-placement='exact'")
        place = best


def _path_seconds(problem: Problem, devices: list[int]) -> float:
    """The objective without the capacity check (for moves during repair)."""
    idx = np.asarray(devices)
    total = problem.node[np.arange(len(idx)), idx].sum()
    return float(total + sum(problem.edge[s, idx[s], idx[s + 1]] for s in range(len(idx) - 1)))


def _neighbours(problem: Problem, place: list[int]):
    """Every single-step move to a device with room, and every swap of two steps' devices."""
    _, d_count = problem.shape
    count = np.bincount(place, minlength=d_count)
    for s in range(len(place)):
        for d in np.flatnonzero(count < problem.capacity):
            if d != place[s]:
                yield place[:s] + [int(d)] + place[s + 1:]
    for s, t in itertools.combinations(range(len(place)), 2):
        if place[s] != place[t]:
            cand = list(place)
            cand[s], cand[t] = cand[t], cand[s]
            yield cand
