"""Checks on what devices send, and how far an aggregate is from what they sent.

- `check_reply`: why a device's reply must be rejected (keys, ranks, shapes, non-finite
  values, example count), or None.
- `aggregation_error` (S1): ||Bbar Abar - sum_k w_k B_k A_k||_F / ||sum_k w_k B_k A_k||_F
  averaged over adapted layers: the number that separates the aggregations of
  `strategies.lora.math`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.lora.math import example_weights
from edge_lam.training.lora import (State, factors, is_base_delta_key, is_lora_key, lora_layers,
                                    trainable_part)


def check_reply(state: State, expected: State, rank: int, num_examples: object) -> str | None:
    """Why a device's reply must be rejected, or None if it is sound.

    `expected` is the truncated state that device was sent (keys and shapes at its rank;
    its frozen base deltas are not sent back).
    """
    expected = trainable_part(expected)
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)) \
            or num_examples <= 0 or num_examples != int(num_examples):
        return f"missing or invalid num-examples ({num_examples!r})"
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        return f"wrong keys: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, ref in expected.items():
        got = state[key]
        if got.shape != ref.shape:
            what = "rank" if is_lora_key(key) else "shape"
            return (f"wrong {what} for {key}: got {tuple(got.shape)}, expected "
                    f"{tuple(ref.shape)} (assigned rank {rank})")
        if not np.all(np.isfinite(got)):
            return f"non-finite values (NaN/Inf) in {key}"
    return None


ERROR_BUDGET = 4096  # (device, layer) products aggregation_error forms at most per round


def aggregation_error(global_state: State, states: Sequence[State],
                      num_examples: Sequence[int]) -> float | None:
    """S1: mean over layers of ||Bbar Abar - sum w_k B_k A_k||_F / ||sum w_k B_k A_k||_F.

    One layer at a time (one d_out x d_in product held, not all layers'); with more than
    ERROR_BUDGET (device, layer) pairs, over evenly spaced layers only, so the diagnostic
    stays cheap at 100 devices. None when undefined (no replies, every target product is
    zero, or a global state with base deltas: `flora`/`fedex` merge the exact update, tested
    in tests/test_lora_aggregators).
    """
    if not states or any(is_base_delta_key(k) for k in global_state):
        return None
    weights = example_weights(num_examples)
    layers = lora_layers(global_state)
    keep = max(1, min(len(layers), ERROR_BUDGET // len(states)))
    errors = []
    for prefix in [layers[i] for i in np.linspace(0, len(layers) - 1, keep).round().astype(int)]:
        target = 0.0
        for w, state in zip(weights, states):
            b, a = factors(state, prefix)
            target = target + w * (b.astype(np.float64) @ a.astype(np.float64))
        norm = np.linalg.norm(target)
        if norm == 0.0:
            continue
        b, a = factors(global_state, prefix)
        got = b.astype(np.float64) @ a.astype(np.float64)
        errors.append(np.linalg.norm(got - target) / norm)
    return float(np.mean(errors)) if errors else None
