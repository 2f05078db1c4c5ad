"""S6 robust aggregation of heterogeneous-rank LoRA replies, taken on the products B A.

Devices train different ranks r_k, so their factors live in different spaces (and even at
one rank, B R, R^-1 A is the same model as B, A): a robust statistic on B and A separately
compares nothing meaningful. Every method here works on device k's *update*

    Delta_k[layer] = B_k' A_k' - B_k A_k        (d_out x d_in, float64)
    Delta_k[dense] = x_k' - x_k                 (a head, say: its own update entries)

with (B_k, A_k) what device k was sent and (B_k', A_k') what it returned. The per-device
vector is every layer's Delta (sorted prefixes) then the dense keys, concatenated (`stack`):
distances, norms and cosines are over the whole model, as Krum (Blanchard et al., NeurIPS
2017) and FLTrust (Cao et al., NDSS 2021) define them; a device poisoning one layer is judged
on its whole update. The coordinate-wise methods (median, trimmed mean; Yin et al., ICML 2018)
are per coordinate, so concatenating changes nothing for them.

The robust aggregate update G (per layer d_out x d_in) gives the new global product
W = Bbar Abar + G, refactorised to rank r_max by truncated SVD (`strategies.lora.math.
factorize`, Eckart-Young): exact when rank(W) <= r_max, otherwise the best rank-r_max
approximation; the relative error ||B' A' - W||_F / ||W||_F is returned per layer
(`RobustResult.svd_error`). Dense keys move by their aggregate directly.

Memory: products are dense. The stacked updates are K x D float64 with D = sum over layers of
d_out d_in (+ dense entries): 8 K D bytes, e.g. 10 devices x 1 layer 4096 x 4096 = 1.3 GiB.
Fine for the tiny test/benchmark models; large models need a sketch (not implemented: Krum,
clipping and FLTrust only need inner products, <B_1 A_1, B_2 A_2> = sum((B_1^T B_2) *
(A_1 A_2^T)), computable from the factors in O((d_out + d_in) r^2) without forming products).

Every method returns `RobustResult`: per device its weight in the aggregate, an accepted
flag and a reason (None when untouched), so that every refusal is logged with its node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from strategies.lora.math import example_weights, factorize
from task.lora import State, factors, is_base_delta_key, is_lora_key, lora_layers
from task.options import ConfigError

Update = dict[str, np.ndarray]  # layer prefix -> d_out x d_in, dense key -> its shape


@dataclass(frozen=True)
class RobustResult:
    """What a robust aggregation produced, and how it treated each device."""
    state: State                    # the new global state, factors at rank r_max
    update: Update                  # aggregate update per layer (d_out x d_in) / dense key
    weights: np.ndarray             # (K,) share of each device in the aggregate
    accepted: np.ndarray            # (K,) bool: False = refused (log node and reason)
    reasons: list[str | None]       # why refused or altered (clipped, trimmed); None if not
    svd_error: dict[str, float]     # per layer ||B'A' - W||_F / ||W||_F of the refactorisation


# ---------------------------------------------------------------- updates as vectors

def update_of(sent: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray]) -> Update:
    """Delta per layer B'A' - BA (d_out x d_in) and per dense key x' - x, float64."""
    out: Update = {}
    for prefix in lora_layers(sent):
        (b0, a0), (b1, a1) = factors(sent, prefix), factors(trained, prefix)
        out[prefix] = (b1.astype(np.float64) @ a1.astype(np.float64)
                       - b0.astype(np.float64) @ a0.astype(np.float64))
    for key, value in sent.items():
        if not is_lora_key(key) and not is_base_delta_key(key):
            out[key] = trained[key].astype(np.float64) - value.astype(np.float64)
    return out


def stack(updates: Sequence[Update]) -> tuple[np.ndarray, list[str], list[tuple]]:
    """(K, D) matrix of flattened updates, with the key order and shapes to undo it."""
    keys = list(updates[0])
    for k, u in enumerate(updates):
        if list(u) != keys or any(u[x].shape != updates[0][x].shape for x in keys):
            raise ValueError(f"device {k}'s update has other layers or shapes than device 0's:"
                             f" check that every reply was validated (check_reply) first")
    shapes = [updates[0][x].shape for x in keys]
    matrix = np.stack([np.concatenate([u[x].ravel() for x in keys]) for u in updates])
    return matrix, keys, shapes


def unstack(vector: np.ndarray, keys: list[str], shapes: list[tuple]) -> Update:
    """The (D,) vector back to {key: array of its shape}."""
    out, start = {}, 0
    for key, shape in zip(keys, shapes):
        size = int(np.prod(shape))
        out[key] = vector[start:start + size].reshape(shape)
        start += size
    return out


def apply_update(previous: State, update: Update, r_max: int) -> tuple[State, dict[str, float]]:
    """W = Bbar Abar + G per layer, refactorised at r_max (truncated SVD); dense keys + G.

    Returns the new state (dtypes of `previous`) and per layer the relative SVD error
    ||B'A' - W||_F / ||W||_F (0 when rank(W) <= r_max)."""
    out: State = {}
    errors: dict[str, float] = {}
    for key, value in previous.items():
        if not is_lora_key(key):
            shift = update.get(key, 0.0)
            out[key] = (value.astype(np.float64) + shift).astype(value.dtype)
    for prefix in lora_layers(previous):
        b0, a0 = factors(previous, prefix)
        target = b0.astype(np.float64) @ a0.astype(np.float64) + update[prefix]  # d_out x d_in
        b, a = factorize(target, r_max)  # (d_out x r_max), (r_max x d_in)
        norm = np.linalg.norm(target)
        errors[prefix] = float(np.linalg.norm(b @ a - target) / norm) if norm > 0 else 0.0
        out[prefix + ".lora_B.weight"] = b.astype(b0.dtype)
        out[prefix + ".lora_A.weight"] = a.astype(a0.dtype)
    return out, errors


def _finish(previous: State, aggregate: np.ndarray, keys: list[str], shapes: list[tuple],
            weights: np.ndarray, accepted: np.ndarray, reasons: list[str | None],
            r_max: int) -> RobustResult:
    update = unstack(aggregate, keys, shapes)
    state, errors = apply_update(previous, update, r_max)
    return RobustResult(state, update, weights, accepted, reasons, errors)


def _prepare(sent: Sequence[State], states: Sequence[State]) -> tuple[np.ndarray, list, list]:
    if len(sent) != len(states) or not states:
        raise ValueError(f"got {len(states)} replies for {len(sent)} sent states: pass one "
                         f"sent state per reply, in the same order")
    return stack([update_of(s, t) for s, t in zip(sent, states)])


# ---------------------------------------------------------------- the statistics

def _trimmed(matrix: np.ndarray, trim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per coordinate: mean of the values ranked trim..K-trim-1; and per device the share
    of coordinates where its value was kept. matrix: (K, D)."""
    k = matrix.shape[0]
    order = np.argsort(matrix, axis=0, kind="stable")        # (K, D)
    kept_rows = order[trim:k - trim]                          # (K - 2 trim, D)
    aggregate = np.take_along_axis(matrix, kept_rows, axis=0).mean(axis=0)  # (D,)
    share = np.bincount(kept_rows.ravel(), minlength=k) / matrix.shape[1]   # (K,)
    return aggregate, share


def _coordinate_result(previous, sent, states, r_max, trim: int, name: str) -> RobustResult:
    matrix, keys, shapes = _prepare(sent, states)
    aggregate, share = _trimmed(matrix, trim)
    expected = (len(states) - 2 * trim) / len(states)  # a device's share if ranks were random
    accepted = share >= 0.5 * expected
    reasons = [None if ok else f"{name}: value used in {100 * s:.0f}% of coordinates, under "
               f"half the {100 * expected:.0f}% expected" for ok, s in zip(accepted, share)]
    return _finish(previous, aggregate, keys, shapes, share / share.sum(), accepted, reasons,
                   r_max)


def coordinate_median(previous: State, sent: Sequence[State], states: Sequence[State],
                      num_examples: Sequence[int], r_max: int) -> RobustResult:
    """Coordinate-wise median of the updates (Yin et al., ICML 2018), unweighted: the middle
    value (K odd) or the mean of the two middle values (K even) of every entry of every
    layer's Delta. Weight = share of coordinates where the device's value was used."""
    trim = (len(states) - 1) // 2
    return _coordinate_result(previous, sent, states, r_max, trim, "median")


def trimmed_mean(previous: State, sent: Sequence[State], states: Sequence[State],
                 num_examples: Sequence[int], r_max: int, beta: float = 0.1) -> RobustResult:
    """Coordinate-wise beta-trimmed mean (Yin et al., ICML 2018): per entry drop the
    floor(beta K) largest and smallest values, average the rest (unweighted)."""
    k = len(states)
    trim = int(np.floor(beta * k))
    if not 0.0 <= beta < 0.5 or k - 2 * trim < 1:
        raise ConfigError(f"robust trimmed-mean beta={beta} must be in [0, 0.5) and leave at "
                          f"least one of the {k} devices: lower beta")
    return _coordinate_result(previous, sent, states, r_max, trim, "trimmed mean")


def krum_scores(matrix: np.ndarray, f: int) -> np.ndarray:
    """Krum score per device (Blanchard et al., NeurIPS 2017): the sum of squared distances
    to its K - f - 2 nearest other updates. matrix: (K, D) -> (K,)."""
    k = matrix.shape[0]
    if f < 0 or k < 2 * f + 3:
        raise ConfigError(f"Krum with f={f} Byzantine devices needs K >= 2f + 3 replies, got "
                          f"{k}: lower robust f or wait for more replies")
    sq = np.sum(matrix ** 2, axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * matrix @ matrix.T, 0.0)  # (K, K)
    np.fill_diagonal(dist, np.inf)
    nearest = np.sort(dist, axis=1)[:, :k - f - 2]                               # (K, K-f-2)
    return nearest.sum(axis=1)


def multi_krum(previous: State, sent: Sequence[State], states: Sequence[State],
               num_examples: Sequence[int], r_max: int, f: int = 1,
               m: int | None = None) -> RobustResult:
    """Multi-Krum (El Mhamdi et al., ICML 2018): the m devices of lowest Krum score are kept
    and their updates averaged by example counts; the others are refused. m defaults to
    K - f; m = 1 is Krum."""
    matrix, keys, shapes = _prepare(sent, states)
    k = len(states)
    m = k - f if m is None else m
    if not 1 <= m <= k:
        raise ConfigError(f"multi-Krum m={m} must be between 1 and the {k} replies")
    scores = krum_scores(matrix, f)
    chosen = np.argsort(scores, kind="stable")[:m]
    accepted = np.zeros(k, dtype=bool)
    accepted[chosen] = True
    weights = np.where(accepted, example_weights(num_examples), 0.0)
    weights /= weights.sum()
    reasons = [None if ok else f"krum: score {s:.4g} not among the {m} lowest"
               for ok, s in zip(accepted, scores)]
    return _finish(previous, weights @ matrix, keys, shapes, weights, accepted, reasons, r_max)


def krum(previous: State, sent: Sequence[State], states: Sequence[State],
         num_examples: Sequence[int], r_max: int, f: int = 1) -> RobustResult:
    """Krum: the single update of lowest Krum score is the aggregate."""
    return multi_krum(previous, sent, states, num_examples, r_max, f=f, m=1)


def norm_clip(previous: State, sent: Sequence[State], states: Sequence[State],
              num_examples: Sequence[int], r_max: int, tau: float | None = None) -> RobustResult:
    """Norm clipping (Sun et al., 2019, "Can you really backdoor FL?"): each update is
    scaled by min(1, tau / ||Delta_k||), then averaged by example counts. tau defaults to the
    median of the update norms (whole-model norm, all layers and dense keys)."""
    matrix, keys, shapes = _prepare(sent, states)
    norms = np.linalg.norm(matrix, axis=1)                                  # (K,)
    tau = float(np.median(norms)) if tau is None else tau
    if not tau > 0:
        raise ConfigError(f"robust norm-clip tau={tau} must be > 0 (leave it unset for the "
                          f"median update norm)")
    scale = np.minimum(1.0, tau / np.maximum(norms, 1e-300))                # (K,)
    weights = example_weights(num_examples)
    aggregate = (weights * scale) @ matrix
    reasons = [None if c >= 1.0 else f"clipped: norm {n:.4g} > tau {tau:.4g}"
               for c, n in zip(scale, norms)]
    share = weights * scale
    return _finish(previous, aggregate, keys, shapes, share / share.sum(),
                   np.ones(len(states), dtype=bool), reasons, r_max)


def fltrust(previous: State, sent: Sequence[State], states: Sequence[State],
            num_examples: Sequence[int], r_max: int, root_update: Update) -> RobustResult:
    """FLTrust (Cao et al., NDSS 2021): with g0 the server's update on its small root set
    (`update_of(global, root-trained)`), TS_k = ReLU(cos(Delta_k, g0)); each Delta_k is
    rescaled to ||g0||, and G = sum_k TS_k (||g0|| / ||Delta_k||) Delta_k / sum_k TS_k.
    Example counts are not used (as in the paper). A device with TS_k = 0 is refused; if
    every device is, the global model does not move."""
    matrix, keys, shapes = _prepare(sent, states)
    root, root_keys, _ = stack([root_update])
    if root_keys != keys or root.shape[1] != matrix.shape[1]:
        raise ValueError("root_update must have the devices' layers and dense keys: build it "
                         "with update_of(global state, state trained on the root set)")
    g0 = root[0]
    g0_norm = np.linalg.norm(g0)
    if g0_norm == 0:
        raise ValueError("FLTrust root update is zero: train the server's root set first")
    norms = np.maximum(np.linalg.norm(matrix, axis=1), 1e-300)              # (K,)
    trust = np.maximum(0.0, matrix @ g0 / (norms * g0_norm))                 # (K,)
    total = trust.sum()
    weights = trust / total if total > 0 else np.zeros_like(trust)
    aggregate = (weights * g0_norm / norms) @ matrix if total > 0 else np.zeros_like(g0)
    accepted = trust > 0
    reasons = [None if ok else f"fltrust: cosine to root update {c:.3g} <= 0"
               for ok, c in zip(accepted, matrix @ g0 / (norms * g0_norm))]
    return _finish(previous, aggregate, keys, shapes, weights, accepted, reasons, r_max)


def weighted_mean(previous: State, sent: Sequence[State], states: Sequence[State],
                  num_examples: Sequence[int], r_max: int) -> RobustResult:
    """The plain (non-robust) example-weighted mean of the product updates: the baseline."""
    matrix, keys, shapes = _prepare(sent, states)
    weights = example_weights(num_examples)
    return _finish(previous, weights @ matrix, keys, shapes, weights,
                   np.ones(len(states), dtype=bool), [None] * len(states), r_max)


# name -> (previous, sent, states, num_examples, r_max, **params) -> RobustResult
ROBUST_AGGREGATORS: dict[str, Callable[..., RobustResult]] = {
    "mean": weighted_mean, "median": coordinate_median, "trimmed-mean": trimmed_mean,
    "krum": krum, "multi-krum": multi_krum, "norm-clip": norm_clip, "fltrust": fltrust,
}
