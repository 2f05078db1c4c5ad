"""S1 aggregation of heterogeneous-rank LoRA adapters: pure math over state dicts.

- `hetlora_aggregate`: zero-pad each device's factors to r_max, weighted mean of B and of A
  (S1 steps 4-5). With equal ranks this is plain FedAvg.
- `flexlora_aggregate`: weighted mean of the products B_k A_k per layer, then the SVD
  factorisation at r_max, split as B = U_r S_r^{1/2}, A = S_r^{1/2} V_r^T. Because singular
  values are sorted, the S1 truncation of these factors to r_k *is* the best rank-r_k
  factorisation each device should receive (FlexLoRA).
- `rankwise_aggregate`: zero-padding without the shrinkage: component j (column j of B, row j
  of A) is averaged only over the devices whose rank exceeds j, weights renormalised.
- `norm_weighted_aggregate`: HetLoRA's sparsity-weighted aggregation (Cho et al., EMNLP 2024):
  per layer, device k weighs n_k ||B_k A_k||_F instead of n_k, then zero-pad and average.
- `delta_aggregate` (`strategy='flexlora-delta'`): FlexLoRA on *updates*: the new global
  product is the old one plus sum_k w_k (B_k' A_k' - B_k A_k), with B_k A_k what device k
  received, refactorised at r_max. A rank-2 device then reports "no change" where it cannot
  see, instead of zeros that pull the high-rank components down (the shrinkage of hetlora
  and flexlora on models).
- `flora_aggregate` (FLoRA, Wang et al., NeurIPS 2024: exact stacking): the weighted sum of
  the devices' products B_k A_k is merged into the frozen weights (`<layer>.base_delta`) and
  every device restarts from the fresh adapter (B = 0) each round. Exact; the downlink carries
  the merged weights (dense, d_out x d_in per layer).
- `fedex_aggregate` (after FedEx-LoRA, Singhal et al., 2024, here for mixed ranks): the
  factors are averaged as hetlora does, and what that average misses of the exact update,
  old model + sum_k w_k (B_k' A_k' - B_k A_k), goes into the frozen base delta; truncation to
  r_k moves the dropped components there too (`edge_lam.training.lora.truncate_lora`), so every device
  trains from exactly the global model and nothing shrinks or is lost over rounds.
- `aggregation_error` (strategies/lora/diagnostics.py): how far an aggregate is from the
  exact mean product, the number that separates them.

FlexLoRA's SVD never forms the d_out x d_in product: sum_k w_k B_k A_k = B_cat A_cat with
B_cat = [w_1 B_1 ... w_K B_K], A_cat = [A_1; ...; A_K] of inner size R = sum_k r_k, so two
thin QR factorisations and the SVD of an R x R core give the same factors (`lowrank_svd`).

Tensors that are not LoRA factors (the classification head) are averaged whole in both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge_lam.training.lora import (BASE_DELTA, State, factors, is_base_delta_key, is_lora_key,
                                    lora_layers, lora_products, lora_rank, pad_lora, trainable_part)
from edge_lam.config.registry import Registry, registry


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
    """S1 steps 4-5: Bbar = sum_k w_k [B_k, 0], Abar = sum_k w_k [A_k; 0].

    Streamed: each device's factors are added into a float32 running sum in place (its first
    r_k rows of A / columns of B), never padded copies: memory is the inputs plus one
    adapter. One fused multi-tensor call per device (`torch._foreach_add_`) instead of one
    numpy operation per tensor (at 100 devices x 336 tensors the per-call overhead, not the
    bytes, was the cost), the tensors split over torch's threads."""
    import torch

    weights = [float(w) for w in example_weights(num_examples)]
    first = states[0]
    acc = {}
    for key, x in first.items():
        shape = list(x.shape)
        if is_lora_key(key):
            shape[_rank_axis(key)] = r_max
        acc[key] = torch.zeros(shape, dtype=torch.float32)

    def add(keys: list[str]) -> None:
        views: dict[tuple, list] = {}  # a device's shapes -> the sums' matching views
        for w, state in zip(weights, states):
            sources = [torch.from_numpy(np.asarray(state[k], dtype=np.float32)) for k in keys]
            shapes = tuple(tuple(t.shape) for t in sources)
            if shapes not in views:  # a factor fills the first r_k entries of its rank axis
                views[shapes] = [acc[k][tuple(slice(n) for n in t.shape)]
                                 for k, t in zip(keys, sources)]
            torch._foreach_add_(views[shapes], sources, alpha=w)

    keys = list(acc)
    threads = max(1, min(4, torch.get_num_threads(), len(keys)))
    if threads == 1:
        add(keys)
    else:  # torch releases the GIL inside the op: the threads add disjoint tensors
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(add, [keys[i::threads] for i in range(threads)]))
    return {k: acc[k].numpy().astype(first[k].dtype, copy=False) for k in keys}


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
    return _split(u[:, :rank], s[:rank], vt[:rank, :], rank)  # B: d_out x r, A: r x d_in


def lowrank_svd(bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], weights: np.ndarray,
                rank: int) -> tuple[np.ndarray, np.ndarray]:
    """`factorize(sum_k w_k B_k A_k, rank)` without forming the d_out x d_in sum: with
    B_cat = [w_k B_k]_k (d_out x R) = Q_b R_b and A_cat^T = [A_k]_k^T (d_in x R) = Q_a R_a,
    the sum is Q_b (R_b R_a^T) Q_a^T, so the SVD of the R x R core U S V^T gives
    B = Q_b U_r S_r^1/2 and A = S_r^1/2 V_r^T Q_a^T. O((d_out + d_in) R^2) instead of
    O(d_out d_in min(d_out, d_in)). When R is far above the rank (many devices), the
    randomized SVD (`_randomized_factors`) finds the top directions in O((d_out + d_in) R k)."""
    inner = sum(b.shape[1] for b in bs)
    if inner > RANDOMIZED_ABOVE * rank:
        # float32 stacks (one copy of the layer's replies), columns of B scaled in place
        b_cat = np.concatenate([np.asarray(b, np.float32) for b in bs], axis=1)
        b_cat *= np.repeat(np.asarray(weights, np.float32), [b.shape[1] for b in bs])
        a_cat = np.concatenate([np.asarray(a, np.float32) for a in as_], axis=0)
        return _randomized_factors(b_cat, a_cat, rank)
    b_cat = np.concatenate([w * b.astype(np.float64) for w, b in zip(weights, bs)], axis=1)
    a_cat = np.concatenate([a.astype(np.float64) for a in as_], axis=0)
    if inner >= min(b_cat.shape[0], a_cat.shape[1]):  # no saving: dense SVD
        return factorize(b_cat @ a_cat, rank)
    q_b, r_b = np.linalg.qr(b_cat)
    q_a, r_a = np.linalg.qr(a_cat.T)
    u, s, vt = np.linalg.svd(r_b @ r_a.T)
    return _split(q_b @ u[:, :rank], s[:rank], vt[:rank, :] @ q_a.T, rank)


RANDOMIZED_ABOVE = 8  # R = sum_k r_k above this many times the rank: randomized SVD


def _split(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """B = U S^1/2, A = S^1/2 V^T, zero-padded when there are fewer directions than `rank`."""
    root = np.sqrt(s)
    b, a = u * root, root[:, None] * vt
    if b.shape[1] < rank:
        b = np.pad(b, ((0, 0), (0, rank - b.shape[1])))
        a = np.pad(a, ((0, rank - a.shape[0]), (0, 0)))
    return b, a


def _randomized_factors(b_cat: np.ndarray, a_cat: np.ndarray, rank: int, oversample: int = 10,
                        power: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-`rank` factors of M = B_cat A_cat by the randomized range finder with power
    iterations (Halko, Martinsson & Tropp, SIAM Review 2011, Alg. 4.4 + 5.1), every product
    taken through the factors (M never formed). Seeded: the same replies give the same
    factors. Accurate to float precision when M's spectrum decays past the rank (as trained
    LoRA updates do); tests/test_lora_aggregators checks it against the exact SVD."""
    rng = np.random.default_rng(0)
    k = min(rank + oversample, b_cat.shape[1])
    omega = rng.standard_normal((a_cat.shape[1], k)).astype(b_cat.dtype)
    q, _ = np.linalg.qr(b_cat @ (a_cat @ omega))
    for _ in range(power):
        z, _ = np.linalg.qr(a_cat.T @ (b_cat.T @ q))
        q, _ = np.linalg.qr(b_cat @ (a_cat @ z))
    q, _ = np.linalg.qr(q.astype(np.float64))  # orthonormal to float64 precision
    small = ((q.T.astype(b_cat.dtype) @ b_cat) @ a_cat).astype(np.float64)  # k x d_in
    u, s, vt = np.linalg.svd(small, full_matrices=False)
    return _split(q @ u[:, :rank], s[:rank], vt[:rank, :], rank)


def flexlora_aggregate(states: Sequence[State], num_examples: Sequence[int], r_max: int) -> State:
    """FlexLoRA: SVD of sum_k w_k B_k A_k, factors at r_max (truncate them to serve rank r_k)."""
    weights = example_weights(num_examples)
    out = _mean_non_lora(states, weights)
    dtype = next(v.dtype for k, v in states[0].items() if is_lora_key(k))
    for prefix in lora_layers(states[0]):
        pairs = [factors(s, prefix) for s in states]
        b, a = lowrank_svd([b for b, _ in pairs], [a for _, a in pairs], weights, r_max)
        out[prefix + ".lora_B.weight"] = b.astype(dtype)
        out[prefix + ".lora_A.weight"] = a.astype(dtype)
    return out


def _rank_axis(key: str) -> int:
    return 0 if key.endswith(".lora_A.weight") else 1  # A: r x d_in, B: d_out x r


def rankwise_aggregate(states: Sequence[State], num_examples: Sequence[int],
                       r_max: int) -> State:
    """Component j of B and A = sum_{k: r_k > j} w_k X_k[j] / sum_{k: r_k > j} w_k.

    HetLoRA's zero-padding averages component j with zeros from every device of rank <= j,
    shrinking it by the share of those devices each round; renormalising over the devices that
    trained it removes that shrinkage. A component no device trained this round is zero (as
    zero-padding leaves it). With equal ranks this is FedAvg."""
    weights = example_weights(num_examples)
    ranks = np.array([lora_rank(s) for s in states])
    padded = [pad_lora(s, r_max) for s in states]
    out = _mean_non_lora(padded, weights)
    # per component j: the weights of the devices that have it, renormalised
    per_j = np.array([np.where(ranks > j, weights, 0.0) for j in range(r_max)])  # r_max x K
    totals = per_j.sum(axis=1, keepdims=True)
    per_j = np.divide(per_j, totals, out=np.zeros_like(per_j), where=totals > 0)
    for key in padded[0]:
        if not is_lora_key(key):
            continue
        stack = np.stack([p[key].astype(np.float64) for p in padded])  # K x ...
        if _rank_axis(key) == 0:  # A: K x r x d_in
            out[key] = np.einsum("jk,kjd->jd", per_j, stack).astype(padded[0][key].dtype)
        else:  # B: K x d_out x r
            out[key] = np.einsum("jk,kdj->dj", per_j, stack).astype(padded[0][key].dtype)
    return out


def norm_weighted_aggregate(states: Sequence[State], num_examples: Sequence[int],
                            r_max: int) -> State:
    """HetLoRA's sparsity-weighted aggregation (Cho et al., EMNLP 2024), per layer:
    w_k proportional to n_k ||B_k A_k||_F, then zero-pad and average as `hetlora_aggregate`.
    A device whose update is small (sparse, or pruned) counts less; a layer no device moved
    falls back to the example weights. Non-LoRA tensors are averaged by examples."""
    base = example_weights(num_examples)
    padded = [pad_lora(s, r_max) for s in states]
    out = _mean_non_lora(padded, base)
    for prefix in lora_layers(padded[0]):
        norms = np.array([np.linalg.norm(b.astype(np.float64) @ a.astype(np.float64))
                          for b, a in (factors(s, prefix) for s in states)])
        scores = base * norms
        weights = scores / scores.sum() if scores.sum() > 0 else base
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            out[prefix + suffix] = _weighted_mean([p[prefix + suffix] for p in padded], weights)
    return out


def delta_aggregate(previous: State, sent: Sequence[State], states: Sequence[State],
                    num_examples: Sequence[int], r_max: int) -> State:
    """W' = Bbar Abar + sum_k w_k (B_k' A_k' - B_k^0 A_k^0) per layer, as its best rank-r_max
    factors (`lowrank_svd` over the stacked factors: inner size r_max + 2 sum_k r_k); other
    tensors: previous + sum_k w_k (new_k - sent_k).

    `previous` is the global state at r_max this round started from, `sent[k]` what device
    k received (its truncation) and `states[k]` what it returned. With every device at r_max
    this is FlexLoRA (sum_k w_k = 1); a device that returns what it got changes nothing."""
    weights = example_weights(num_examples)
    out: State = {}
    for key, value in previous.items():
        if not is_lora_key(key):
            change = sum(w * (s[key].astype(np.float64) - r[key].astype(np.float64))
                         for w, s, r in zip(weights, states, sent))
            out[key] = (value.astype(np.float64) + change).astype(value.dtype)
    dtype = next(v.dtype for k, v in previous.items() if is_lora_key(k))
    for prefix in lora_layers(previous):
        bs, as_, ws = [], [], []
        b0, a0 = factors(previous, prefix)
        bs.append(b0)
        as_.append(a0)
        ws.append(1.0)
        for w, new, got in zip(weights, states, sent):
            for (b, a), sign in ((factors(new, prefix), 1.0), (factors(got, prefix), -1.0)):
                bs.append(b)
                as_.append(a)
                ws.append(sign * w)
        b, a = lowrank_svd(bs, as_, np.asarray(ws), r_max)
        out[prefix + ".lora_B.weight"] = b.astype(dtype)
        out[prefix + ".lora_A.weight"] = a.astype(dtype)
    return out


def _exact_update(previous: State, sent: Sequence[State], states: Sequence[State],
                  weights: np.ndarray, prefix: str) -> np.ndarray:
    """base_delta + Bbar Abar + sum_k w_k (B_k' A_k' - B_k A_k) of one layer (float64): the
    global model's new weight update, every device's change counted exactly. (Each device
    started from exactly the global model: its base delta holds what its truncation left.)"""
    b0, a0 = factors(previous, prefix)
    total = b0.astype(np.float64) @ a0.astype(np.float64)
    if prefix + BASE_DELTA in previous:
        total += previous[prefix + BASE_DELTA]
    for w, new, got in zip(weights, states, sent):
        (b1, a1), (b, a) = factors(new, prefix), factors(got, prefix)
        total += w * (b1.astype(np.float64) @ a1.astype(np.float64)
                      - b.astype(np.float64) @ a.astype(np.float64))
    return total


def _merged(previous: State, sent: Sequence[State], states: Sequence[State],
            num_examples: Sequence[int], factors_of: Callable[[str], tuple]) -> State:
    """The new global state: non-LoRA tensors moved by the weighted mean change, per layer the
    factors `factors_of(prefix)` and base_delta = exact update - B A."""
    weights = example_weights(num_examples)
    out: State = {}
    for key, value in previous.items():
        if not is_lora_key(key) and not is_base_delta_key(key):
            change = sum(w * (s[key].astype(np.float64) - r[key].astype(np.float64))
                         for w, s, r in zip(weights, states, sent))
            out[key] = (value.astype(np.float64) + change).astype(value.dtype)
    for prefix in lora_layers(previous):
        b, a = factors_of(prefix)
        exact = _exact_update(previous, sent, states, weights, prefix)
        exact -= b.astype(np.float64) @ a.astype(np.float64)
        out[prefix + ".lora_B.weight"], out[prefix + ".lora_A.weight"] = b, a
        out[prefix + BASE_DELTA] = exact.astype(np.float32)
    return out


def flora_aggregate(previous: State, sent: Sequence[State], states: Sequence[State],
                    num_examples: Sequence[int], r_max: int) -> State:
    """FLoRA's exact stacking: base_delta' = base_delta + sum_k w_k B_k' A_k' (each device
    started from B = 0), and the factors go back to the fresh adapter of `previous` (B = 0, A
    as initialised), so next round every device starts a new adapter on the merged weights."""
    return _merged(previous, sent, states, num_examples,
                   lambda prefix: factors(previous, prefix))


def fedex_aggregate(previous: State, sent: Sequence[State], states: Sequence[State],
                    num_examples: Sequence[int], r_max: int) -> State:
    """Factors: hetlora's zero-pad weighted mean of what devices returned; base delta: exact
    update - Bbar' Abar' (FedEx-LoRA's residual, here also holding the components beyond each
    device's rank). The global model is the exact weighted mean of the devices' models."""
    averaged = hetlora_aggregate([trainable_part(s) for s in states], num_examples, r_max)
    return _merged(previous, sent, states, num_examples,
                   lambda prefix: factors(averaged, prefix))


Aggregator = Callable[[Sequence[State], Sequence[int], int], State]
# (previous global, states sent, states returned, example counts, r_max) -> new global
DeltaAggregator = Callable[[State, Sequence[State], Sequence[State], Sequence[int], int], State]


@dataclass(frozen=True)
class AggregationRule:
    """One LoRA aggregation: `fn` of the devices' models (an Aggregator), or, `on_updates`,
    of what each device changed (a DeltaAggregator). `pads_factors`: it is the weighted
    mean of the factors zero-padded to r_max, which FedLaAvg's stored updates compute too
    (`fleet.selection='fedlaavg'` runs with it); `refactorises`: it re-factorises a mean
    product by SVD, so its aggregate is not linear in the devices' factors."""

    fn: Callable
    on_updates: bool = False
    pads_factors: bool = False
    refactorises: bool = False
    # secure aggregation (`secure.enabled`, `strategies.secure.encoding`): the layout of the
    # sum that computes it ("padded", "rankwise"), or "" and why it needs each device's own
    # upload
    secure: str = ""
    not_secure: str = ""


# The aggregation rules (`cfg.aggregation`): a `edge_lam.config.registry.Registry`, kind "aggregation
# rule" (a third-party rule registers through the `edge_lam.aggregation_rule` entry points).
AGGREGATION_RULES: Registry[AggregationRule] = registry("aggregation rule")
_PRODUCTS = "it needs each device's own product B_k A_k"
_SECURE = {"fedavg": ("padded", ""), "hetlora": ("padded", ""), "rankwise": ("rankwise", ""),
           "flexlora": ("", _PRODUCTS + " (the SVD of their weighted mean)"),
           "hetlora-sw": ("", "it weighs each device by the norm of its own B_k A_k"),
           "flexlora-delta": ("", _PRODUCTS + " and change"),
           "flora": ("", _PRODUCTS + " (merged into the frozen weights)"),
           "fedex": ("", _PRODUCTS + " (the exact remainder)")}
for _name, _fn in (("fedavg", hetlora_aggregate),  # one rank: zero-padding is a no-op
                   ("hetlora", hetlora_aggregate), ("flexlora", flexlora_aggregate),
                   ("rankwise", rankwise_aggregate), ("hetlora-sw", norm_weighted_aggregate)):
    AGGREGATION_RULES.register(_name, AggregationRule(
        _fn, pads_factors=_fn is hetlora_aggregate, refactorises=_fn is flexlora_aggregate,
        secure=_SECURE[_name][0], not_secure=_SECURE[_name][1]))
for _name, _fn in (("flexlora-delta", delta_aggregate), ("flora", flora_aggregate),
                   ("fedex", fedex_aggregate)):
    AGGREGATION_RULES.register(_name, AggregationRule(
        _fn, on_updates=True, refactorises=_fn is delta_aggregate,
        secure=_SECURE[_name][0], not_secure=_SECURE[_name][1]))

# name -> function, as mappings (live views of the registry; `.get` gives None when absent)
DELTA_AGGREGATORS: Mapping[str, DeltaAggregator] = AGGREGATION_RULES.view(
    lambda rule: rule.on_updates, lambda rule: rule.fn)
AGGREGATORS: Mapping[str, Aggregator] = AGGREGATION_RULES.view(
    lambda rule: not rule.on_updates, lambda rule: rule.fn)


def aggregate(name: str, previous: State, sent: Sequence[State], states: Sequence[State],
              num_examples: Sequence[int], r_max: int) -> State:
    """The aggregation `name` (a strategy or unlearn.aggregation value), of models or of
    updates alike: what the in-process benchmarks call."""
    rule = AGGREGATION_RULES.get(name)
    if rule.on_updates:
        return rule.fn(previous, sent, states, num_examples, r_max)
    return rule.fn(states, num_examples, r_max)
