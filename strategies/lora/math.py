"""S1 aggregation of heterogeneous-rank LoRA adapters: pure math over state dicts.

- `hetlora_aggregate`: zero-pad each device's factors to r_max, weighted mean of B and of A
  (S1 steps 4-5). With equal ranks this is plain FedAvg.
- `flexlora_aggregate`: weighted mean of the products B_k A_k per layer, then the SVD
  factorisation at r_max, split as B = U_r S_r^{1/2}, A = S_r^{1/2} V_r^T. Because singular
  values are sorted, the S1 truncation of these factors to r_k *is* the best rank-r_k
  factorisation each device should receive (FlexLoRA).
- `aggregation_error`: ||Bbar Abar - sum_k w_k B_k A_k||_F / ||sum_k w_k B_k A_k||_F averaged over
  adapted layers: the number that separates the two.

Tensors that are not LoRA factors (the classification head) are averaged whole in both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from task.lora import State, factors, is_lora_key, lora_layers, lora_products, pad_lora


def example_weights(num_examples: Sequence[int]) -> np.ndarray:
    """w_k = n_k / sum_j n_j."""
    counts = np.asarray(num_examples, dtype=np.float64)
    if counts.ndim != 1 or len(counts) == 0 or np.any(counts <= 0):
        raise ValueError(f"example counts must be positive, got {list(num_examples)}")
    return counts / counts.sum()


def _weighted_mean(arrays: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    for w, x in zip(weights, arrays):
        acc += w * x
    return acc.astype(arrays[0].dtype)


def _mean_non_lora(states: Sequence[State], weights: np.ndarray) -> State:
    keys = [k for k in states[0] if not is_lora_key(k)]
    return {k: _weighted_mean([s[k] for s in states], weights) for k in keys}


def hetlora_aggregate(states: Sequence[State], num_examples: Sequence[int], r_max: int) -> State:
    """S1 steps 4-5: Bbar = sum_k w_k [B_k, 0], Abar = sum_k w_k [A_k; 0]."""
    weights = example_weights(num_examples)
    padded = [pad_lora(s, r_max) for s in states]
    out = _mean_non_lora(padded, weights)
    for key in padded[0]:
        if is_lora_key(key):
            out[key] = _weighted_mean([p[key] for p in padded], weights)
    return out


def weighted_products(states: Sequence[State], num_examples: Sequence[int]) -> dict[str, np.ndarray]:
    """sum_k w_k B_k A_k per adapted layer (float64, d_out x d_in)."""
    weights = example_weights(num_examples)
    total: dict[str, np.ndarray] = {}
    for w, state in zip(weights, states):
        for prefix, product in lora_products(state).items():
            total[prefix] = total.get(prefix, 0.0) + w * product
    return total


def factorize(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-`rank` factors of delta (Eckart-Young): B = U_r S_r^1/2, A = S_r^1/2 V_r^T."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    root = np.sqrt(s[:rank])
    b = u[:, :rank] * root  # d_out x r
    a = root[:, None] * vt[:rank, :]  # r x d_in
    if b.shape[1] < rank:  # delta smaller than the rank: pad with zero directions
        b = np.pad(b, ((0, 0), (0, rank - b.shape[1])))
        a = np.pad(a, ((0, rank - a.shape[0]), (0, 0)))
    return b, a


def flexlora_aggregate(states: Sequence[State], num_examples: Sequence[int], r_max: int) -> State:
    """FlexLoRA: SVD of sum_k w_k B_k A_k, factors at r_max (truncate them to serve rank r_k)."""
    weights = example_weights(num_examples)
    out = _mean_non_lora(states, weights)
    dtype = next(v.dtype for k, v in states[0].items() if is_lora_key(k))
    for prefix, delta in weighted_products(states, num_examples).items():
        b, a = factorize(delta, r_max)
        out[prefix + ".lora_B.weight"] = b.astype(dtype)
        out[prefix + ".lora_A.weight"] = a.astype(dtype)
    return out


def aggregation_error(global_state: State, states: Sequence[State],
                      num_examples: Sequence[int]) -> float | None:
    """S1: mean over layers of ||Bbar Abar - sum w_k B_k A_k||_F / ||sum w_k B_k A_k||_F.

    None when undefined (no replies, or every target product is zero).
    """
    if not states:
        return None
    target = weighted_products(states, num_examples)
    errors = []
    for prefix in lora_layers(global_state):
        norm = np.linalg.norm(target[prefix])
        if norm == 0.0:
            continue
        b, a = factors(global_state, prefix)
        got = b.astype(np.float64) @ a.astype(np.float64)
        errors.append(np.linalg.norm(got - target[prefix]) / norm)
    return float(np.mean(errors)) if errors else None


Aggregator = Callable[[Sequence[State], Sequence[int], int], State]

AGGREGATORS: dict[str, Aggregator] = {
    "fedavg": hetlora_aggregate,  # every device at one rank: zero-padding is a no-op
    "hetlora": hetlora_aggregate,
    "flexlora": flexlora_aggregate,
}


def check_reply(state: State, expected: State, rank: int, num_examples: object) -> str | None:
    """Why a device's reply must be rejected, or None if it is sound.

    `expected` is the truncated state that device was sent (keys and shapes at its rank).
    """
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
