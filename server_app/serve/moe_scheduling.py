"""Expert-to-device assignment for `serve.kind='moe'` (S8), one call per slot (one MoE layer's
expert round for one batch of tokens): `assign(slot, demand (E,) tokens per expert, alive (D,)
bool) -> (E,) device index`. `round-robin` is static, `greedy` places experts by predicted
time on `serve.fleet`, `lyapunov` runs S8's drift-plus-penalty (`server_app.serve.lyapunov`).
Predicted times follow `server_app.serve.fleet`: compute / speed, bytes over the link."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from server_app.serve.fleet import ServeDevice
from edge_lam.config.run_config import RunConfig

Assign = Callable[[int, np.ndarray, np.ndarray], np.ndarray]  # (slot, demand, alive) -> (E,)


def round_robin(slot: int, demand: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Static: expert e on the (e mod n)-th living device."""
    living = np.flatnonzero(alive)
    return living[np.arange(len(demand)) % len(living)]


class GreedyScheduler:
    """Cheapest predicted time: experts by falling demand, each to the living device whose
    finish time (its load so far + this expert's tokens: compute / speed, hidden states down
    and up its link) grows least (longest-processing-time list scheduling)."""

    def __init__(self, devices: list[ServeDevice], pair_seconds: float, token_bytes: int):
        self.devices, self.pair_seconds, self.token_bytes = devices, pair_seconds, token_bytes

    def cost(self, d: int, tokens: float) -> float:
        dev = self.devices[d]
        return (dev.compute_s(tokens * self.pair_seconds)
                + 8.0 * tokens * self.token_bytes * (1 / dev.down_mbps + 1 / dev.up_mbps) / 1e6)

    def __call__(self, slot: int, demand: np.ndarray, alive: np.ndarray) -> np.ndarray:
        load = np.where(alive, [dev.latency_s * 2 for dev in self.devices], np.inf)
        out = np.zeros(len(demand), dtype=np.int64)
        for e in np.argsort(-demand, kind="stable"):
            finish = [load[d] + self.cost(d, demand[e]) for d in range(len(self.devices))]
            out[e] = int(np.argmin(finish))
            load[out[e]] = finish[out[e]]
        return out


class LyapunovAssign:
    """`serve.moe-scheduler='lyapunov'`: S8's drift-plus-penalty (`server_app.serve.lyapunov`),
    each slot minimising Q(t) (A(t, d) - S(t, d)) + V C(t, d). Every device can compute every
    expert (hosts all True: it slices any expert from its checkpoint). C: energy of a
    token-expert pair on d (watts x measured seconds / speed). Serving is synchronous, so
    Q_d is a virtual queue: the work by which d lags a nominal slot of `slot_s` seconds, in
    which it serves S_d = slot_s / seconds-per-pair; slot_s = the first slot's pairs spread
    over the fleet at full speed (the fleet exactly loaded on average). A retry within a slot
    (a failed device's experts) counts as one more slot."""

    def __init__(self, cfg: RunConfig, devices: list[ServeDevice], pair_seconds: float):
        self.cfg, self.devices, self.pair_seconds = cfg, devices, pair_seconds
        self.scheduler = None
        self.alive: np.ndarray | None = None

    def __call__(self, slot: int, demand: np.ndarray, alive: np.ndarray) -> np.ndarray:
        from server_app.serve.lyapunov import LyapunovScheduler, energy_costs

        if self.scheduler is None:
            cost, seconds = energy_costs(self.devices, self.pair_seconds)
            speed = sum(dev.speed for dev in self.devices)
            slot_s = max(float(demand.sum()), 1.0) * self.pair_seconds / speed
            hosts = np.ones((len(demand), len(self.devices)), bool)
            self.scheduler = LyapunovScheduler(
                self.devices, hosts, self.cfg.serve.moe_lyapunov_v, cost, seconds,
                slot_s=slot_s, objective=self.cfg.serve.moe_lyapunov_objective,
                brute_limit=self.cfg.serve.moe_lyapunov_brute_limit)
        if self.scheduler.pending is not None:  # the previous slot's service
            self.scheduler.observe(slot, self.scheduler.nominal_service * self.alive)
        self.alive = np.asarray(alive, bool)
        return self.scheduler.assign(slot, np.asarray(demand, float), self.alive)


def make_scheduler(cfg: RunConfig, devices: list[ServeDevice], pair_seconds: float,
                   token_bytes: int) -> Assign:
    if cfg.serve.moe_scheduler == "greedy":
        return GreedyScheduler(devices, pair_seconds, token_bytes)
    if cfg.serve.moe_scheduler == "lyapunov":
        return LyapunovAssign(cfg, devices, pair_seconds)
    return round_robin


def predicted_seconds(devices: list[ServeDevice], tokens: np.ndarray, pairs: np.ndarray,
                      pair_seconds: float, token_bytes: int) -> float:
    """One layer's expert round on the fleet: the slowest device used (hidden states down,
    its token-expert pairs computed, partial sums up)."""
    times = [dev.send_s(n * token_bytes, up=False) + dev.compute_s(p * pair_seconds)
             + dev.send_s(n * token_bytes) for dev, n, p in zip(devices, tokens, pairs) if p]
    return max(times, default=0.0)
