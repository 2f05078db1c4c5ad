"""What a device puts into the secure sum for a LoRA aggregation that is a weighted sum of
the uploads, and how the server reads the sum back (`secure.enabled`).

A device of rank r_k with n_k examples adds, as one int64 vector (fixed point,
`protocol.quantize`; clipped to +-`secure.clip`):
- `padded` (fedavg, hetlora): n_k * pad(X_k, r_max) for every tensor, then n_k;
- `rankwise`: the same, then n_k * [j < r_k] for j < r_max (the weight of component j);
and last the count of its entries that were clipped. The server divides by the summed
weights: sum_k n_k pad(X_k) / sum_k n_k is `hetlora_aggregate`, and component j over
sum_{k: r_k > j} n_k is `rankwise_aggregate`, computed without seeing any X_k.
"""

from __future__ import annotations

import numpy as np

from edge_lam.training.lora import State, is_lora_key, lora_rank, pad_lora
from strategies.lora.math import _rank_axis
from strategies.secure.protocol import MAX_WEIGHT_SUM, dequantize, quantize

LAYOUTS = ("padded", "rankwise")


def encode(state: State, n: int, r_max: int, layout: str, clip: float
           ) -> tuple[np.ndarray, int]:
    """(int64 vector, entries clipped) of one device's upload."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown secure layout '{layout}' (one of {', '.join(LAYOUTS)})")
    n = int(n)
    if not 0 < n <= MAX_WEIGHT_SUM:
        raise ValueError(f"{n} examples: secure aggregation weighs by 1..{MAX_WEIGHT_SUM}")
    padded = pad_lora(state, r_max)
    parts, clipped = [], 0
    for key in sorted(padded):
        q, c = quantize(np.asarray(padded[key]).ravel(), clip)
        parts.append(q * n)
        clipped += c
    parts.append(np.array([n], np.int64))
    if layout == "rankwise":
        parts.append(np.where(np.arange(r_max) < lora_rank(state), n, 0).astype(np.int64))
    parts.append(np.array([clipped], np.int64))
    return np.concatenate(parts), clipped


def size(template: State, layout: str, r_max: int) -> int:
    """Entries of an encoded vector for a global state `template` at r_max."""
    return (sum(int(np.prod(np.shape(v))) for v in template.values()) + 1
            + (r_max if layout == "rankwise" else 0) + 1)


def decode(total: np.ndarray, template: State, layout: str, r_max: int, clip: float
           ) -> tuple[State, int, int]:
    """(the aggregate, sum of n_k, entries clipped over all devices) from the unmasked sum
    (int64) of the devices' `encode`d vectors; `template`: the global state at r_max."""
    total = np.asarray(total, dtype=np.int64)
    if total.size != size(template, layout, r_max):
        raise ValueError(f"the secure sum has {total.size} entries, the global adapter "
                         f"needs {size(template, layout, r_max)}")
    keys = sorted(template)
    offset = sum(int(np.prod(np.shape(template[k]))) for k in keys)
    weight = int(total[offset])
    clipped = int(total[-1])
    if not 0 < weight <= MAX_WEIGHT_SUM or clipped < 0:
        raise ValueError(f"the summed weight {weight} is not a sum of example counts: the "
                         "masks did not cancel (a device sent a bad input or share)")
    per_j = total[offset + 1:offset + 1 + r_max].astype(np.float64) if layout == "rankwise" \
        else None
    out: State = {}
    pos = 0
    for key in keys:
        shape, dtype = np.shape(template[key]), np.asarray(template[key]).dtype
        count = int(np.prod(shape))
        sums = dequantize(total[pos:pos + count], clip).reshape(shape)
        pos += count
        if per_j is not None and is_lora_key(key):
            w = np.where(per_j > 0, per_j, 1.0)
            if _rank_axis(key) == 0:
                mean = sums / w[:, None]
            else:
                mean = sums / w[None, :]
        else:  # a component nobody trained: its sums are 0, so it stays 0
            mean = sums / weight
        out[key] = mean.astype(dtype)
    return {k: out[k] for k in template}, weight, clipped  # the template's key order
