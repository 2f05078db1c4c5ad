"""S4 on LoRA adapter states: what the server does in an unlearning or a recovery round.

Plain functions over {name: ndarray} (the strategy and the benchmark both call them):
- `unlearning_step`: zero-pads every device's gradient to r_max (S1 `pad_lora`, so every
  rank lives in one p-dimensional space), flattens, applies the S4 update
  theta <- theta - eta (mean_{K_r} g_k + mean_{K_o} (I - U U^T) g_k) of
  `strategies.unlearn.math.unlearning_update`, and returns the new global state together with
  the projected update -eta mean_{K_o} g_k^proj that opting-out devices receive (S4 step 5).
- `remove_drift`: FedOSD recovery (S4): each remaining device's update x_k - theta loses its
  component along theta - theta_before_unlearning before the usual aggregation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.unlearn.math import (flatten_state, pad_for_projection, remove_drift_component,
                                   unflatten, unlearning_update)
from edge_lam.training.lora import State


def unlearning_step(global_state: State, retained_grads: Sequence[State],
                    forget_grads: Sequence[State], r_max: int, lr: float,
                    rel_tol: float = 1e-6) -> tuple[State, State, dict]:
    """One S4 server update (steps 2-4) on adapter states.

    `global_state` is at r_max; gradients come at each device's rank (same keys). Returns
    (new global state, projected update -lr * mean_{K_o} g_k^proj at r_max, info of
    `unlearning_update`).
    """
    if not retained_grads:
        raise ValueError("S4 needs at least one remaining device's gradient to protect")
    if not forget_grads:
        raise ValueError("S4 needs at least one opting-out device's unlearning gradient")
    keys = sorted(global_state)
    theta, spec = flatten_state(global_state, keys)  # (p,)
    padded = pad_for_projection(list(retained_grads) + list(forget_grads), r_max)
    vectors = [flatten_state(g, keys)[0] for g in padded]  # each (p,)
    retained, forget = vectors[:len(retained_grads)], vectors[len(retained_grads):]
    new_theta, info = unlearning_update(theta, retained, forget, lr, rel_tol)
    # new_theta - theta = -lr (retained mean + projected mean): keep the projected part
    projected_step = (new_theta - theta) + lr * np.mean(retained, axis=0)  # (p,)
    return unflatten(new_theta, spec), unflatten(projected_step, spec), info


def remove_drift(states: Sequence[State], global_state: State, before_unlearning: State,
                 r_max: int) -> list[State]:
    """FedOSD recovery (S4): x_k' = theta + R(pad(x_k) - theta), where R removes the
    component along d = theta - theta_before_unlearning; states come back at r_max.

    With hetlora/fedavg aggregation, the weighted mean of the x_k' is theta plus the weighted
    mean of the corrected updates, so the model cannot drift back along d.
    """
    keys = sorted(global_state)
    theta, spec = flatten_state(global_state, keys)
    before, _ = flatten_state(before_unlearning, keys)
    direction = theta - before  # (p,)
    out = []
    for state in pad_for_projection(states, r_max):
        update = flatten_state(state, keys)[0] - theta
        out.append(unflatten(theta + remove_drift_component(update, direction), spec))
    return out
