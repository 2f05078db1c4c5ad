"""An optimiser on the aggregate (`lora.server-optimizer`), with the equations of Flower's own
strategies (`flwr.serverapp.strategy.FedAvgM` and `FedAdam`, Reddi et al. 2021, "Adaptive
Federated Optimization"), applied after any LoRA aggregation to the tensors the devices train
(LoRA factors and a classification head; base deltas pass through as aggregated).

With x the global state at the round's start and x_agg the aggregate:
- fedavgm: g = x - x_agg (the pseudo-gradient); v = g in the first round, else
  v = momentum v + g; x' = x - lr v.
- fedadam: d = x_agg - x; m = beta1 m + (1 - beta1) d; v = beta2 v + (1 - beta2) d^2;
  x' = x + lr_t m / (sqrt(v) + tau), lr_t = lr sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)) at
  round t (Flower's bias-corrected step).

Its moments are part of the exact resume (`strategies.lora.resume`, entry `server_opt`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edge_lam.config.run_config import RunConfig
from edge_lam.training.lora import State, is_base_delta_key
from strategies.lora.resume import Restored


class ServerOptimizer:
    """`lora.server-optimizer` over the rounds (a `CheckpointPart`)."""

    entry = "server_opt"

    def __init__(self, cfg: RunConfig):
        lora = cfg.lora
        self.kind = lora.server_optimizer
        self.lr, self.momentum = lora.server_lr, lora.server_momentum
        self.beta1, self.beta2, self.tau = lora.server_beta1, lora.server_beta2, lora.server_tau
        self.m: State = {}  # fedavgm: the momentum vector; fedadam: the first moment
        self.v: State = {}  # fedadam: the second moment

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def step(self, server_round: int, start: State, aggregate: State) -> State:
        """The new global state from the round's start and the aggregate."""
        if not self.active:
            return aggregate
        out = dict(aggregate)
        for key, new in aggregate.items():
            if is_base_delta_key(key) or key not in start:
                continue
            x = start[key].astype(np.float64)
            if x.shape != new.shape:  # a tensor whose shape changed is not a step
                continue
            out[key] = self._update(server_round, key, x, new.astype(np.float64)
                                    ).astype(new.dtype)
        return out

    def _update(self, server_round: int, key: str, x: np.ndarray, new: np.ndarray
                ) -> np.ndarray:
        if self.kind == "fedavgm":
            g = x - new
            self.m[key] = g if key not in self.m else self.momentum * self.m[key] + g
            return x - self.lr * self.m[key]
        d = new - x
        self.m[key] = self.beta1 * self.m.get(key, np.zeros_like(d)) + (1 - self.beta1) * d
        self.v[key] = self.beta2 * self.v.get(key, np.zeros_like(d)) + (1 - self.beta2) * d * d
        lr_t = self.lr * np.sqrt(1 - self.beta2 ** (server_round + 1.0)) / (
            1 - self.beta1 ** (server_round + 1.0))
        return x + lr_t * self.m[key] / (np.sqrt(self.v[key]) + self.tau)

    # ---------------------------------------------------------------- CheckpointPart
    def checkpoint_state(self, name_of: Callable[[int], str]) -> tuple[Any, State]:
        if not self.active:
            return None, {}
        arrays = {f"server_opt/m/{k}": v for k, v in self.m.items()}
        arrays |= {f"server_opt/v/{k}": v for k, v in self.v.items()}
        return {"kind": self.kind}, arrays

    def restore(self, saved: Any, restored: Restored) -> None:
        if not saved:
            return
        for key, value in restored.arrays.items():
            if key.startswith("server_opt/m/"):
                self.m[key.removeprefix("server_opt/m/")] = np.asarray(value, np.float64)
            elif key.startswith("server_opt/v/"):
                self.v[key.removeprefix("server_opt/v/")] = np.asarray(value, np.float64)

    def move(self, old: int, new: int) -> None:
        """Nothing per device."""
