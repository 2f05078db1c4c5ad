"""Online scheduling of MoE experts over edge devices by Lyapunov drift-plus-penalty (S8).

S8 serves a mixture-of-experts layer as micro-services: the server runs attention and the
router, devices compute experts. Each time slot t this module decides which device computes
which expert's tokens, following Neely's drift-plus-penalty method (M. J. Neely, *Stochastic
Network Optimization with Application to Communication and Queueing Systems*, 2010, ch. 3-4).

Model (S8). D devices, E experts.
- a_e(t): tokens the router sent to expert e in slot t (demand).
- hosts[e, d]: device d holds expert e's weights (each device at most M experts: memory).
- x_{e,d}(t) in {0, 1}: expert e's tokens of slot t go to device d; sum_d x_{e,d} = 1 over the
  ALIVE hosts of e. One device per expert and slot (no splitting: an expert's tokens are one
  batch, one message); over many slots the choice time-shares, so average rates split anyway.
- A_d(t) = sum_e x_{e,d}(t) a_e(t)                            arrivals at device d  (S8)
- S_d(t) = mu_d(t): tokens device d can compute in slot t (time-varying; 0 when it failed)
- Q_d(t+1) = max(Q_d(t) - S_d(t), 0) + A_d(t)                 its backlog           (S8)
- C(t) = sum_d c_d A_d(t), c_d the cost of one token on d (energy: watts x seconds/token).
A failed device (alive[d] = False) is never assigned; tokens already queued on it wait there
until it returns (they are counted late). An expert with no alive host has its tokens dropped.

Drift-plus-penalty. With L(t) = 1/2 sum_d Q_d(t)^2 and Delta(t) = L(t+1) - L(t),
    Delta(t) = sum_d [ A_d (Q_d - S_d)^+ + A_d^2 / 2 ] + (terms without A)      exactly,
    Delta(t) <= B + sum_d Q_d (A_d - S_d),  B = 1/2 sum_d E[A_d^2 + S_d^2]      (S8)
and each slot minimises Delta(t) + V C(t) over x. Two per-slot objectives (`objective`):
- `linear`: sum_d Q_d A_d + V c_d A_d, the textbook bound. It separates per expert: expert e
  goes to the alive host minimising Q_d + V c_d (exact, O(E D)). All experts that share hosts
  land on the same device in a slot, so backlogs move in bursts.
- `quadratic`: sum_d A_d (Q_d - S_d)^+ + A_d^2 / 2 + V c_d A_d, the one-slot drift itself. The
  A_d^2 term couples experts (two popular experts on one device cost more than apart): solved
  exactly by enumerating every assignment when there are at most `brute_limit` of them, else
  greedily (experts by decreasing demand, each to its cheapest marginal device) followed by
  single-expert moves until none lowers the objective. S_d here is the NOMINAL capacity
  slot_s / seconds_per_token_d (the scheduler does not know this slot's speed).
Both minimise the bound within a constant C (the A_d^2 terms are at most (sum_e a_e)^2 / 2;
a greedy result no single move improves puts each expert within sum_e a_e of its best
weight), so both keep Neely's guarantees with B + C for B: for demand and speeds
stationary (i.i.d. or ergodic) within the capacity region,
    time-average cost <= C* + B / V,     time-average backlog <= (B + V C_max) / eps  = O(V),
with C* the least average cost of any stable policy: the LP over mean rates r_{e,d}
    C* = min sum_{e,d} c_d r_{e,d}  s.t.  sum_d r_{e,d} = abar_e,  sum_e r_{e,d} <= mubar_d,
         r_{e,d} >= 0,  r_{e,d} = 0 where hosts[e, d] is False                  (S8)
(`optimal_average_cost`; with failures, rates per pattern of alive devices), and eps the
LP's capacity slack (`capacity_margin`: the largest theta with theta * abar feasible;
theta < 1: no scheduler can keep the queues bounded).
"""

from __future__ import annotations

from itertools import product

import numpy as np
from scipy.optimize import linprog

from server_app.serve.fleet import ServeDevice
from edge_lam.config.hardware import HARDWARE

OBJECTIVES = ("linear", "quadratic")
# Typical power under load (W) of each profile, for energy per token = watts x seconds per
# token: `edge_lam.config.hardware`, the one profile table (sources there).
WATTS = {name: hw.watts for name, hw in HARDWARE.items()}


def queue_update(backlog: np.ndarray, service: np.ndarray, arrivals: np.ndarray) -> np.ndarray:
    """Q_d(t+1) = max(Q_d(t) - S_d(t), 0) + A_d(t) (S8). All (D,)."""
    return np.maximum(backlog - service, 0.0) + arrivals


def arrivals_of(choice: np.ndarray, demand: np.ndarray, devices: int) -> np.ndarray:
    """A_d = sum_e x_{e,d} a_e (S8): choice (E,) device per expert (-1: dropped) -> (D,)."""
    kept = choice >= 0
    return np.bincount(choice[kept], weights=demand[kept], minlength=devices).astype(float)


def slot_objective(choices: np.ndarray, demand: np.ndarray, backlog: np.ndarray,
                   service: np.ndarray, cost: np.ndarray, V: float,
                   objective: str = "quadratic") -> np.ndarray:
    """The per-slot drift-plus-penalty value of each assignment (S8).

    choices (N, E) device per expert; demand (E,); backlog, service, cost (D,) -> (N,)."""
    n, devices = choices.shape[0], backlog.shape[0]
    load = np.zeros((n, devices))  # A_d per candidate, (N, D)
    rows = np.arange(n)
    for e in range(choices.shape[1]):
        load[rows, choices[:, e]] += demand[e]
    if objective == "linear":
        return load @ (backlog + V * cost)
    return load @ (np.maximum(backlog - service, 0.0) + V * cost) + 0.5 * (load ** 2).sum(1)


def brute_force_assignment(demand, backlog, service, cost, V, allowed: np.ndarray,
                           objective: str = "quadratic") -> np.ndarray:
    """The exact minimiser over every assignment (allowed (E, D) bool, each row non-empty);
    ties go to the first in lexicographic order of device indices."""
    options = [np.flatnonzero(row) for row in allowed]
    choices = np.array(list(product(*options)), dtype=int).reshape(-1, len(options))
    values = slot_objective(choices, demand, backlog, service, cost, V, objective)
    return choices[int(np.argmin(values))]


def greedy_assignment(demand, backlog, service, cost, V, allowed: np.ndarray) -> np.ndarray:
    """Quadratic objective, large cases: experts by decreasing demand to the device of least
    marginal value a_e ((Q_d - S_d)^+ + A_d + a_e / 2 + V c_d), then single-expert moves while
    one lowers the objective (each strictly lowers it, so this ends)."""
    base = np.maximum(backlog - service, 0.0) + V * cost  # (D,)
    load = np.zeros_like(backlog, dtype=float)
    choice = np.full(len(demand), -1)
    for e in np.argsort(-demand, kind="stable"):
        marginal = np.where(allowed[e], demand[e] * (base + load + demand[e] / 2), np.inf)
        choice[e] = int(np.argmin(marginal))
        load[choice[e]] += demand[e]
    for _ in range(4 * len(demand)):
        moved = False
        for e in np.flatnonzero(demand > 0):
            here = choice[e]
            leave = demand[e] * (base[here] + load[here] - demand[e] / 2)
            join = np.where(allowed[e], demand[e] * (base + load + demand[e] / 2), np.inf)
            join[here] = np.inf
            best = int(np.argmin(join))
            if join[best] < leave - 1e-9:
                load[here] -= demand[e]
                load[best] += demand[e]
                choice[e], moved = best, True
        if not moved:
            break
    return choice


def best_assignment(demand, backlog, service, cost, V, allowed: np.ndarray,
                    objective: str = "quadratic", brute_limit: int = 4096) -> np.ndarray:
    """x(t): the device of each expert minimising the slot's drift-plus-penalty (S8).

    demand (E,); backlog, service, cost (D,); allowed (E, D) bool: alive hosts. Returns (E,)
    device indices, -1 for an expert with no alive host (its tokens are dropped)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"Lyapunov objective '{objective}' is not known: use one of "
                         f"{', '.join(OBJECTIVES)}")
    choice = np.full(len(demand), -1)
    live = allowed.any(1)
    if not live.any():
        return choice
    sub = allowed[live]
    if objective == "linear":
        weight = np.where(sub, (backlog + V * cost)[None, :], np.inf)  # (E', D)
        choice[live] = np.argmin(weight, axis=1)
    elif np.prod(sub.sum(1).astype(float)) <= brute_limit:
        choice[live] = brute_force_assignment(demand[live], backlog, service, cost, V, sub)
    else:
        choice[live] = greedy_assignment(demand[live], backlog, service, cost, V, sub)
    return choice


def _rate_lp(mean_demand, mean_capacity, hosts):
    """Variables r_{e,d} for hosted pairs: equality rows per expert, capacity rows per device."""
    pairs = np.argwhere(hosts)  # (P, 2): (e, d)
    experts, devices = hosts.shape
    a_eq = np.zeros((experts, len(pairs)))
    a_eq[pairs[:, 0], np.arange(len(pairs))] = 1.0
    a_ub = np.zeros((devices, len(pairs)))
    a_ub[pairs[:, 1], np.arange(len(pairs))] = 1.0
    return pairs, a_eq, a_ub


def optimal_average_cost(mean_demand: np.ndarray, mean_capacity: np.ndarray,
                         hosts: np.ndarray, cost: np.ndarray,
                         alive_states: np.ndarray | None = None,
                         state_weights: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """C* and its average rates r (E, D) from the LP over mean rates (S8); (inf, zeros) if no
    stable policy exists (mean demand outside the capacity region).

    With failures, `alive_states` (K, D) bool are the patterns of alive devices and
    `state_weights` (K,) the share of slots in each: rates r^k_{e,d} per pattern (0 on dead
    devices, sum_d r^k_{e,d} = abar_e in each), the capacity holding on average,
    sum_k w_k sum_e r^k_{e,d} <= mubar_d, and C* = min sum_k w_k sum_{e,d} c_d r^k_{e,d}."""
    if alive_states is None:
        alive_states, state_weights = np.ones((1, hosts.shape[1]), bool), np.ones(1)
    blocks = [_rate_lp(mean_demand, mean_capacity, hosts & alive[None, :])
              for alive in np.asarray(alive_states, bool)]
    weights = np.asarray(state_weights, float)
    a_eq = np.zeros((sum(b[1].shape[0] for b in blocks), sum(len(b[0]) for b in blocks)))
    row = col = 0
    for pairs, eq, _ in blocks:
        a_eq[row:row + eq.shape[0], col:col + len(pairs)] = eq
        row, col = row + eq.shape[0], col + len(pairs)
    a_ub = np.hstack([w * ub for w, (_, _, ub) in zip(weights, blocks)])
    c = np.concatenate([w * cost[pairs[:, 1]] for w, (pairs, _, _) in zip(weights, blocks)])
    res = linprog(c, A_ub=a_ub, b_ub=mean_capacity, A_eq=a_eq,
                  b_eq=np.tile(mean_demand, len(blocks)), bounds=(0, None), method="highs")
    rates = np.zeros(hosts.shape)
    if res.status != 0:
        return float("inf"), rates
    col = 0
    for w, (pairs, _, _) in zip(weights, blocks):
        np.add.at(rates, (pairs[:, 0], pairs[:, 1]), w * res.x[col:col + len(pairs)])
        col += len(pairs)
    return float(res.fun), rates


def capacity_margin(mean_demand: np.ndarray, mean_capacity: np.ndarray,
                    hosts: np.ndarray) -> float:
    """The largest theta such that theta x mean demand can be served on average: theta > 1
    inside the capacity region (queues can be kept bounded), theta < 1 outside (they cannot)."""
    pairs, a_eq, a_ub = _rate_lp(mean_demand, mean_capacity, hosts)
    # variables [r, theta]: maximise theta s.t. sum_d r_ed - theta abar_e = 0, sum_e r_ed <= mu_d
    a_eq = np.hstack([a_eq, -mean_demand[:, None]])
    a_ub = np.hstack([a_ub, np.zeros((a_ub.shape[0], 1))])
    c = np.zeros(len(pairs) + 1)
    c[-1] = -1.0
    res = linprog(c, A_ub=a_ub, b_ub=mean_capacity, A_eq=a_eq, b_eq=np.zeros(len(mean_demand)),
                  bounds=(0, None), method="highs")
    return float(res.x[-1]) if res.status == 0 else float("inf")


def check_hosts(hosts: np.ndarray, max_experts: int | None = None) -> np.ndarray:
    """hosts (E, D) bool, every expert on at least one device, each device at most
    `max_experts` experts (its memory)."""
    hosts = np.asarray(hosts, dtype=bool)
    if hosts.ndim != 2 or not hosts.any(1).all():
        raise ValueError(f"hosts must be an (experts, devices) bool matrix with every expert on "
                         f"some device; experts without a device: "
                         f"{np.flatnonzero(~hosts.any(1)).tolist() if hosts.ndim == 2 else '?'}")
    if max_experts is not None and (hosts.sum(0) > max_experts).any():
        raise ValueError(f"devices {np.flatnonzero(hosts.sum(0) > max_experts).tolist()} hold "
                         f"more than {max_experts} experts: place fewer replicas")
    return hosts


def striped_hosts(experts: int, devices: int, replicas: int) -> np.ndarray:
    """Expert e on devices e, e + s, e + 2s, ... (mod D), s = max(1, D // replicas): replicas
    on devices far apart in the fleet list (so across device types); each device holds
    ceil(E x replicas / D) experts at most."""
    if not 1 <= replicas <= devices:
        raise ValueError(f"replicas must be in 1..{devices} (the devices), got {replicas}")
    hosts = np.zeros((experts, devices), bool)
    step = max(1, devices // replicas)
    for e in range(experts):
        for k in range(replicas):
            hosts[e, (e + k * step) % devices] = True
    return hosts


def energy_costs(devices: list[ServeDevice], base_seconds_per_token: float):
    """(cost (D,) joules per token, seconds_per_token (D,)) from the fleet profiles: a token
    takes base / speed seconds on d and watts_d x that many joules."""
    spt = np.array([base_seconds_per_token / d.speed for d in devices])
    watts = []
    for d in devices:
        profile = d.name.rsplit("-", 1)[0] if d.name not in WATTS else d.name
        if profile not in WATTS:
            raise ValueError(f"no power figure for device '{d.name}': pass cost_per_token "
                             f"yourself or name it after one of {', '.join(WATTS)}")
        watts.append(WATTS[profile])
    return np.array(watts) * spt, spt


class _Queues:
    """What every scheduler shares: hosts, the backlog it believes in, the pending arrivals."""

    def __init__(self, devices: list[ServeDevice], hosts: np.ndarray,
                 cost_per_token: np.ndarray, seconds_per_token: np.ndarray, slot_s: float):
        self.devices = list(devices)
        self.hosts = check_hosts(hosts)
        n = len(self.devices)
        if self.hosts.shape[1] != n:
            raise ValueError(f"hosts has {self.hosts.shape[1]} device columns for {n} devices")
        self.cost = np.asarray(cost_per_token, float).reshape(n)  # (D,)
        self.seconds_per_token = np.asarray(seconds_per_token, float).reshape(n)  # (D,)
        if (self.cost < 0).any() or not (self.seconds_per_token > 0).all() or slot_s <= 0:
            raise ValueError("cost_per_token must be >= 0, seconds_per_token and slot_s > 0")
        self.nominal_service = slot_s / self.seconds_per_token  # tokens per slot, (D,)
        self.backlog = np.zeros(n)  # Q(t), (D,)
        self.pending: np.ndarray | None = None  # A(t) awaiting observe, (D,)
        self.dropped = 0.0  # tokens of experts that had no alive host
        self.history: list[float] = []  # total backlog after each observe

    def allowed(self, alive: np.ndarray) -> np.ndarray:
        return self.hosts & np.asarray(alive, bool)[None, :]  # (E, D)

    def _record(self, choice: np.ndarray, demand: np.ndarray) -> np.ndarray:
        if self.pending is not None:
            raise RuntimeError("assign() called twice: call observe(slot, served) after each "
                               "assign() so the queues move on")
        demand = np.asarray(demand, float)
        self.dropped += float(demand[choice < 0].sum())
        self.pending = arrivals_of(choice, demand, len(self.devices))
        return choice

    def observe(self, slot: int, served: np.ndarray) -> None:
        """Tokens each device computed in the slot (D,): Q <- max(Q - served, 0) + A (S8)."""
        if self.pending is None:
            raise RuntimeError(f"observe(slot={slot}) without an assign() before it")
        self.backlog = queue_update(self.backlog, np.asarray(served, float), self.pending)
        self.pending = None
        self.history.append(float(self.backlog.sum()))

    def wait_s(self) -> np.ndarray:
        """Predicted seconds until each device's backlog is computed (D,)."""
        return self.backlog * self.seconds_per_token

    def backlog_growth(self, window: int = 1000) -> float:
        """Least-squares slope of the total backlog over the last `window` slots (tokens per
        slot): about 0 when stable, the excess of demand over capacity when overloaded."""
        h = np.asarray(self.history[-window:])
        return float(np.polyfit(np.arange(len(h)), h, 1)[0]) if len(h) >= 2 else 0.0


class LyapunovScheduler(_Queues):
    """Drift-plus-penalty each slot (S8): `assign` the experts, then `observe` what was served.

    V trades cost for backlog: V = 0 only balances queues, large V approaches the cheapest
    stable schedule C* (gap <= B / V) with backlogs growing as O(V)."""

    def __init__(self, devices: list[ServeDevice], hosts: np.ndarray, V: float,
                 cost_per_token: np.ndarray, seconds_per_token: np.ndarray, *,
                 slot_s: float = 1.0, objective: str = "quadratic", brute_limit: int = 4096):
        super().__init__(devices, hosts, cost_per_token, seconds_per_token, slot_s)
        if V < 0:
            raise ValueError(f"the Lyapunov V must be >= 0, got {V}")
        if objective not in OBJECTIVES:
            raise ValueError(f"Lyapunov objective '{objective}' is not known: use one of "
                             f"{', '.join(OBJECTIVES)}")
        self.V, self.objective, self.brute_limit = float(V), objective, int(brute_limit)

    def assign(self, slot: int, demand: np.ndarray, alive: np.ndarray) -> np.ndarray:
        """The device index of each expert for this slot (E,); -1: no alive host (dropped)."""
        demand = np.asarray(demand, float)
        service = self.nominal_service * np.asarray(alive, bool)
        choice = best_assignment(demand, self.backlog, service, self.cost, self.V,
                                 self.allowed(alive), self.objective, self.brute_limit)
        return self._record(choice, demand)


BASELINES = ("cheapest", "fastest", "random", "round-robin")


class BaselineScheduler(_Queues):
    """The queue-blind rules measured beside drift-plus-penalty: `cheapest` (least c_d),
    `fastest` (least seconds per token), `random` (uniform), `round-robin` (the next host in
    turn), each among the expert's alive hosts."""

    def __init__(self, rule: str, devices, hosts, cost_per_token, seconds_per_token, *,
                 slot_s: float = 1.0, seed: int = 0):
        super().__init__(devices, hosts, cost_per_token, seconds_per_token, slot_s)
        if rule not in BASELINES:
            raise ValueError(f"baseline '{rule}' is not known: use one of {', '.join(BASELINES)}")
        self.rule, self.rng = rule, np.random.default_rng(seed)
        self.turn = np.zeros(self.hosts.shape[0], int)

    def assign(self, slot: int, demand: np.ndarray, alive: np.ndarray) -> np.ndarray:
        allowed = self.allowed(alive)  # (E, D)
        choice = np.full(allowed.shape[0], -1)
        for e in np.flatnonzero(allowed.any(1)):
            options = np.flatnonzero(allowed[e])
            if self.rule == "cheapest":
                choice[e] = options[np.argmin(self.cost[options])]
            elif self.rule == "fastest":
                choice[e] = options[np.argmin(self.seconds_per_token[options])]
            elif self.rule == "random":
                choice[e] = self.rng.choice(options)
            else:
                choice[e] = options[self.turn[e] % len(options)]
                self.turn[e] += 1
        return self._record(choice, np.asarray(demand, float))


def simulate(scheduler: _Queues, demand: np.ndarray, capacity: np.ndarray,
             alive: np.ndarray) -> dict[str, np.ndarray]:
    """Run a scheduler over a trace: demand (T, E), capacity (T, D) tokens each device can
    compute per slot (0 where dead), alive (T, D). Returns arrivals, served (T, D), backlog
    (T + 1, D), cost (T,) = sum_d c_d A_d(t), dropped (T,)."""
    slots, devices = capacity.shape
    backlog = np.zeros((slots + 1, devices))
    arrivals, served = np.zeros((slots, devices)), np.zeros((slots, devices))
    dropped = np.zeros(slots)
    for t in range(slots):
        before = scheduler.dropped
        scheduler.assign(t, demand[t], alive[t])
        arrivals[t] = scheduler.pending
        dropped[t] = scheduler.dropped - before
        served[t] = np.minimum(backlog[t], capacity[t])  # work queued before this slot
        scheduler.observe(t, served[t])
        backlog[t + 1] = scheduler.backlog
    return {"arrivals": arrivals, "served": served, "backlog": backlog,
            "cost": arrivals @ scheduler.cost, "dropped": dropped}


def late_tokens(arrivals: np.ndarray, served: np.ndarray, deadline: int) -> tuple[float, float]:
    """(late, judged): tokens not computed within `deadline` slots after the slot they arrived
    in (FIFO per device), over the arrivals old enough to judge (T - deadline slots).
    arrivals, served (T, D); a token arriving in slot t can be served from slot t + 1 on."""
    slots = arrivals.shape[0]
    judged = max(slots - deadline - 1, 0)
    cum_in = np.cumsum(arrivals, axis=0)  # tokens arrived up to and including slot t
    cum_out = np.cumsum(served, axis=0)  # tokens served up to and including slot t
    before = np.vstack([np.zeros((1, arrivals.shape[1])), cum_in[:-1]])
    done_by = cum_out[np.minimum(np.arange(judged) + deadline, slots - 1)]  # (judged, D)
    late = np.clip(cum_in[:judged] - np.maximum(before[:judged], done_by), 0, None)
    return float(late.sum()), float(cum_in[judged - 1].sum()) if judged else 0.0
