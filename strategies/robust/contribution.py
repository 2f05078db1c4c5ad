"""S6 leave-one-out (LOO) contribution of each device by a first-order influence approximation.

Setting (one round, flat vectors of P trainable parameters, K devices):

    theta_new  = theta + sum_k w_k Delta_k,         w_k = n_k / sum_j n_j   (sum_k w_k = 1)
    theta_-k   = theta + sum_{j != k} w_j' Delta_j, w_j' = w_j / (1 - w_k)  (renormalised)
    c_k        = L_val(theta_-k) - L_val(theta_new)      (positive: device k helps)

The LOO direction has a closed form (U = sum_j w_j Delta_j the aggregated update):

    d_k = theta_-k - theta_new = w_k / (1 - w_k) * (U - Delta_k)                       (P,)

Influence approximation (Koh & Liang, "Understanding Black-box Predictions via Influence
Functions", ICML 2017; in FL the same LOO-by-influence idea as FedInfluence / data-Shapley
style LOO valuation), a Taylor expansion of L_val around theta_new:

    first order:  c_k ~ g^T d_k,                          g = grad L_val(theta_new)    (P,)
    Fisher:       c_k ~ g^T d_k + 1/2 d_k^T F d_k,        F = diag(mean_i g_i * g_i)   (P,)

with g_i the per-example validation gradients (empirical Fisher, diagonal, as the Hessian
approximation named in S6). Cost: ONE pass over the validation set with per-example
gradients (g and F together), then O(K P) arithmetic, instead of K re-aggregations and K
validation passes for exact LOO (`exact_loo`, the reference). A training round costs each
device several passes over its own data, so the estimate is below one round.

Use as aggregation weights (S6: raise high contributors, lower or drop harmful ones):
`contribution_weights` ('drop-harmful': w_k -> 0 for c_k <= 0; 'softmax': w_k exp(c_k / T)),
and `compose_with_trust` for the trust-weighted vote w = alpha * q + beta * t, alpha + beta = 1.

All functions are pure over numpy arrays; no Flower, no torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _check_weights(weights: np.ndarray, k: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (k,):
        raise ValueError(f"weights must have shape ({k},), got {w.shape}; pass one per device")
    if np.any(w < 0) or not np.isclose(w.sum(), 1.0):
        raise ValueError(f"weights must be >= 0 and sum to 1 (got sum {w.sum():.6g}); "
                         "normalise n_k / sum n first")
    if np.any(w >= 1.0):
        raise ValueError("a device with weight 1 has no leave-one-out model; need K >= 2 "
                         "devices with non-zero weight")
    return w


def loo_directions(deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """S6: d_k = theta_-k - theta_new = w_k / (1 - w_k) (U - Delta_k), U = sum_j w_j Delta_j.

    deltas: (K, P) device updates Delta_k; weights: (K,) aggregation weights summing to 1.
    Returns (K, P). Exact (no approximation): the LOO aggregate with renormalised weights.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    if deltas.ndim != 2:
        raise ValueError(f"deltas must be (K, P) flat updates, got shape {deltas.shape}; "
                         "flatten each device's update into one row")
    w = _check_weights(weights, deltas.shape[0])
    u = w @ deltas                                  # (P,)  aggregated update U
    scale = w / (1.0 - w)                           # (K,)
    return scale[:, None] * (u[None, :] - deltas)   # (K, P)


def influence_contributions(grad: np.ndarray, fisher_diag: np.ndarray | None,
                            directions: np.ndarray) -> np.ndarray:
    """S6 / Koh & Liang 2017: c_k ~ g^T d_k [+ 1/2 d_k^T diag(F) d_k].

    grad: (P,) validation-loss gradient at theta_new; fisher_diag: (P,) diagonal Fisher (mean
    of squared per-example gradients) or None for first order only; directions: (K, P) from
    `loo_directions`. Returns (K,) estimated L_val(theta_-k) - L_val(theta_new).
    """
    g = np.asarray(grad, dtype=np.float64)
    d = np.asarray(directions, dtype=np.float64)
    if d.ndim != 2 or g.shape != (d.shape[1],):
        raise ValueError(f"grad must be (P,) and directions (K, P); got {g.shape} and {d.shape}")
    c = d @ g                                       # (K,) first order
    if fisher_diag is not None:
        f = np.asarray(fisher_diag, dtype=np.float64)
        if f.shape != g.shape or np.any(f < 0):
            raise ValueError(f"fisher_diag must be (P,)={g.shape} and >= 0, got {f.shape}")
        c = c + 0.5 * (d * d) @ f                   # (K,) + 1/2 sum_p F_p d_kp^2
    return c


def empirical_fisher_diag(per_example_grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean gradient g (P,) and diagonal empirical Fisher F_p = mean_i g_ip^2 (P,).

    per_example_grads: (N, P) gradients of each validation example's loss at theta_new.
    """
    gi = np.asarray(per_example_grads, dtype=np.float64)
    if gi.ndim != 2 or gi.shape[0] == 0:
        raise ValueError(f"per_example_grads must be (N, P) with N >= 1, got {gi.shape}")
    return gi.mean(axis=0), (gi * gi).mean(axis=0)


def exact_loo(loss_fn: Callable[[np.ndarray], float], theta: np.ndarray,
              deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Reference: true LOO by K re-aggregations and K + 1 validation evaluations.

    loss_fn: flat params (P,) -> validation loss; theta: (P,) round start; deltas: (K, P).
    Returns (K,) c_k = L_val(theta_-k) - L_val(theta_new).
    """
    theta = np.asarray(theta, dtype=np.float64)
    deltas = np.asarray(deltas, dtype=np.float64)
    w = _check_weights(weights, deltas.shape[0])
    base = float(loss_fn(theta + w @ deltas))
    out = np.empty(len(w))
    for k in range(len(w)):
        wk = np.delete(w, k) / (1.0 - w[k])                 # renormalised (K-1,)
        out[k] = float(loss_fn(theta + wk @ np.delete(deltas, k, axis=0))) - base
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 1-based."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (handles ties)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"need two vectors of the same length >= 2, got {a.shape}, {b.shape}")
    ra, rb = _ranks(a) - (a.size + 1) / 2, _ranks(b) - (b.size + 1) / 2
    denom = np.sqrt((ra @ ra) * (rb @ rb))
    if denom == 0:
        raise ValueError("spearman is undefined when one input is constant")
    return float(ra @ rb / denom)


def contribution_weights(contrib: np.ndarray, weights: np.ndarray,
                         mode: str = "drop-harmful", temperature: float = 1.0) -> np.ndarray:
    """S6: new aggregation weights from contributions c_k (K,) and base weights w_k (K,).

    'drop-harmful': w_k' ∝ w_k [c_k > 0]  (harmful or useless devices get exactly 0);
    'softmax':      w_k' ∝ w_k exp(c_k / T) (raises helpers smoothly, T = temperature).
    Returns (K,) summing to 1.
    """
    c = np.asarray(contrib, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if c.shape != w.shape or c.ndim != 1:
        raise ValueError(f"contrib and weights must both be (K,), got {c.shape}, {w.shape}")
    if mode == "drop-harmful":
        new = w * (c > 0)
        if new.sum() <= 0:
            raise ValueError("every device has c_k <= 0: nothing left to aggregate; skip the "
                             "round or use mode='softmax'")
    elif mode == "softmax":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        z = c / temperature
        new = w * np.exp(z - z.max())               # shift for stability; cancels on normalise
    else:
        raise ValueError(f"mode must be 'drop-harmful' or 'softmax', got {mode!r}")
    return new / new.sum()


def compose_with_trust(contrib_weights: np.ndarray, trust: np.ndarray,
                       alpha: float, beta: float) -> np.ndarray:
    """S6 trust-weighted vote: w = alpha * q + beta * t, alpha + beta = 1.

    q = contrib_weights (K,) (normalised contribution), t = trust (K,) >= 0, normalised here.
    Returns (K,) summing to 1.
    """
    q = np.asarray(contrib_weights, dtype=np.float64)
    t = np.asarray(trust, dtype=np.float64)
    if q.shape != t.shape or q.ndim != 1:
        raise ValueError(f"contrib_weights and trust must both be (K,), got {q.shape}, {t.shape}")
    if alpha < 0 or beta < 0 or not np.isclose(alpha + beta, 1.0):
        raise ValueError(f"need alpha, beta >= 0 with alpha + beta = 1, got {alpha}, {beta}")
    if np.any(q < 0) or np.any(t < 0) or q.sum() <= 0 or t.sum() <= 0:
        raise ValueError("contrib_weights and trust must be >= 0 with a positive sum")
    return alpha * q / q.sum() + beta * t / t.sum()
