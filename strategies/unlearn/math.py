"""S4 federated unlearning by orthogonal gradient projection: pure numpy / torch math.

One unlearning round (S4 steps 1-4), over gradients flattened to p numbers:
- `flatten_state` / `unflatten`: {name: ndarray} <-> one float64 vector (p,) plus its spec.
- `retained_basis`: thin SVD of G_r = [g_1 ... g_m] (p x m) -> U (p x k), negligible
  directions dropped; the p x p projector is never formed.
- `project_orthogonal`: g_proj = (I - U U^T) g computed as g - U (U^T g).
- `unlearning_update`: theta <- theta - eta (mean_{K_r} g_k + mean_{K_o} g_k^proj).
- `pad_for_projection`: LoRA states of different ranks live in the r_max zero-padded space
  (S1 `pad_lora`) before they are flattened, so every vector has the same length p.

Losses (S4 "bounded loss"): `bounded_ce_loss` = -log(max(p_y, eps)) and FedOSD's
`fedosd_unlearning_loss` = -log(1 - p_y / 2) in [0, ln 2]. After unlearning, FedOSD removes
from each retained gradient its component along (theta - theta_before_unlearning):
`remove_drift_component`.

Privacy (S4): `gaussian_sigma` is the one-release Gaussian-mechanism bound (epsilon < 1 only);
over many steps use `edge_lam.training.privacy.noise_multiplier_for_budget` (Opacus's RDP accountant).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from edge_lam.training.lora import State, lora_layers, lora_rank, pad_lora

# (key, shape, dtype) per tensor, in the order they sit in the flat vector.
FlatSpec = list[tuple[str, tuple[int, ...], np.dtype]]


# ---------------------------------------------------------------------------------------
# State dict <-> flat vector
# ---------------------------------------------------------------------------------------


def flatten_state(state: Mapping[str, np.ndarray],
                  keys: Sequence[str] | None = None) -> tuple[np.ndarray, FlatSpec]:
    """Concatenate the tensors named by `keys` (default: sorted names) into one float64 (p,).

    The spec records order, shapes and dtypes so `unflatten` can rebuild the state.
    """
    keys = sorted(state) if keys is None else list(keys)
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"state has no tensor {missing[:3]}; pass keys the state actually holds")
    spec: FlatSpec = [(k, tuple(np.shape(state[k])), np.asarray(state[k]).dtype) for k in keys]
    parts = [np.asarray(state[k], dtype=np.float64).ravel() for k in keys]
    vector = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)  # (p,)
    return vector, spec


def unflatten(vector: np.ndarray, spec: FlatSpec) -> State:
    """Inverse of `flatten_state`: split (p,) back into named tensors of the recorded shapes."""
    vector = np.asarray(vector)
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape, _ in spec]
    if vector.ndim != 1 or vector.size != sum(sizes):
        raise ValueError(f"vector of shape {vector.shape} does not match the spec "
                         f"({sum(sizes)} numbers); flatten and unflatten with the same spec")
    out: State = {}
    offset = 0
    for (key, shape, dtype), size in zip(spec, sizes):
        out[key] = vector[offset:offset + size].reshape(shape).astype(dtype)
        offset += size
    return out


def pad_for_projection(states_at_ranks: Sequence[Mapping[str, np.ndarray]], r_max: int) -> list[State]:
    """Zero-pad every LoRA state to rank r_max (S1 step 4) so flattened vectors align (S4 step 1).

    Padding with zeros keeps each device's update B_k A_k unchanged while putting all of them
    in one parameter space of p numbers.
    """
    if not states_at_ranks:
        raise ValueError("no states to pad")
    key_set = set(states_at_ranks[0])
    padded = []
    for i, state in enumerate(states_at_ranks):
        if set(state) != key_set:
            raise ValueError(f"state {i} names different tensors than state 0; "
                             "every device must send the same adapted layers")
        if lora_layers(state):
            rank = lora_rank(state)
            if rank > r_max:
                raise ValueError(f"state {i} has LoRA rank {rank} > r_max={r_max}; raise r_max")
        padded.append(pad_lora(state, r_max))
    return padded


# ---------------------------------------------------------------------------------------
# S4 steps 2-4: retained subspace, projection, update
# ---------------------------------------------------------------------------------------


def _as_vectors(grads: Sequence[np.ndarray], name: str, p: int | None = None) -> np.ndarray:
    """Stack gradients (each (p,)) as columns of a float64 p x m matrix; check shapes/finiteness."""
    if len(grads) == 0:
        raise ValueError(f"{name}: need at least one gradient")
    cols = [np.asarray(g, dtype=np.float64) for g in grads]
    p = cols[0].size if p is None else p
    for i, g in enumerate(cols):
        if g.ndim != 1 or g.size != p:
            raise ValueError(f"{name}[{i}] has shape {g.shape}, expected ({p},); "
                             "flatten every gradient with the same spec")
        if not np.all(np.isfinite(g)):
            raise ValueError(f"{name}[{i}] has non-finite entries (exploding gradient?); "
                             "use the bounded loss of S4")
    return np.stack(cols, axis=1)  # p x m


def retained_basis(G_r: np.ndarray, rel_tol: float = 1e-6) -> np.ndarray:
    """S4 step 2: orthonormal basis U (p x k) of span(G_r), G_r = [g_1 ... g_m] is p x m.

    Thin SVD G_r = U S V^T; keeps the left singular vectors with s > rel_tol * s_max
    (k <= m; k = 0 when G_r is zero). Never forms a p x p matrix.
    """
    G_r = np.asarray(G_r, dtype=np.float64)
    if G_r.ndim != 2:
        raise ValueError(f"G_r must be p x m (gradients as columns), got shape {G_r.shape}")
    if not 0.0 <= rel_tol < 1.0:
        raise ValueError(f"rel_tol must lie in [0, 1), got {rel_tol}")
    p, m = G_r.shape
    if m == 0 or not np.any(G_r):
        return np.zeros((p, 0))
    u, s, _ = np.linalg.svd(G_r, full_matrices=False)  # u: p x min(p,m), s sorted descending
    keep = s > rel_tol * s[0]
    return u[:, keep]  # p x k


def project_orthogonal(g: np.ndarray, U: np.ndarray) -> np.ndarray:
    """S4 step 3: g_proj = (I - U U^T) g = g - U (U^T g); g is (p,), U is p x k orthonormal."""
    g = np.asarray(g, dtype=np.float64)
    U = np.asarray(U, dtype=np.float64)
    if U.ndim != 2 or g.shape != (U.shape[0],):
        raise ValueError(f"gradient of shape {g.shape} does not fit basis of shape {U.shape}")
    return g - U @ (U.T @ g)  # (p,)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0.0 or nb == 0.0 else float(a @ b / (na * nb))


def unlearning_update(theta: np.ndarray, retained_grads: Sequence[np.ndarray],
                      forget_grads: Sequence[np.ndarray], lr: float,
                      rel_tol: float = 1e-6) -> tuple[np.ndarray, dict[str, float]]:
    """S4 step 4: theta - lr * (mean_{K_r} g_k + mean_{K_o} (I - U U^T) g_k).

    theta and every gradient are flat (p,) vectors (see `flatten_state`). Returns the new
    theta (float64, (p,)) and an info dict: kept rank, norms of the three means and of the
    step, and the largest |cos| between a projected forget gradient and a retained gradient
    (should be ~0: the step does not touch the retained knowledge to first order).
    """
    theta = np.asarray(theta, dtype=np.float64)
    if theta.ndim != 1:
        raise ValueError(f"theta must be a flat (p,) vector, got shape {theta.shape}")
    if not lr > 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    p = theta.size
    G_r = _as_vectors(retained_grads, "retained_grads", p)  # p x |K_r|
    G_o = _as_vectors(forget_grads, "forget_grads", p)  # p x |K_o|
    U = retained_basis(G_r, rel_tol)  # p x k
    G_proj = G_o - U @ (U.T @ G_o)  # p x |K_o|, column-wise project_orthogonal
    retained_mean = G_r.mean(axis=1)  # (p,)
    forget_mean = G_o.mean(axis=1)
    projected_mean = G_proj.mean(axis=1)
    step = retained_mean + projected_mean
    new_theta = theta - lr * step
    max_cos = max((abs(_cosine(G_proj[:, i], G_r[:, j]))
                   for i in range(G_proj.shape[1]) for j in range(G_r.shape[1])), default=0.0)
    info = {
        "rank_kept": int(U.shape[1]),
        "num_retained": int(G_r.shape[1]),
        "num_forget": int(G_o.shape[1]),
        "retained_mean_norm": float(np.linalg.norm(retained_mean)),
        "forget_mean_norm": float(np.linalg.norm(forget_mean)),
        "projected_mean_norm": float(np.linalg.norm(projected_mean)),
        "step_norm": float(lr * np.linalg.norm(step)),
        "max_abs_cos_projected_vs_retained": max_cos,
        "cos_forget_vs_projected": _cosine(forget_mean, projected_mean),
    }
    return new_theta, info


def remove_drift_component(g: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """FedOSD post-unlearning (S4): g - (<g, d> / <d, d>) d, d = theta - theta_before_unlearning.

    A zero direction (nothing unlearned yet) leaves g unchanged.
    """
    g = np.asarray(g, dtype=np.float64)
    d = np.asarray(direction, dtype=np.float64)
    if g.shape != d.shape:
        raise ValueError(f"gradient shape {g.shape} != direction shape {d.shape}")
    dd = float(d.ravel() @ d.ravel())
    if dd == 0.0:
        return g.copy()
    return g - (float(g.ravel() @ d.ravel()) / dd) * d


# ---------------------------------------------------------------------------------------
# S4 losses
# ---------------------------------------------------------------------------------------


def _true_class_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p_y per example; logits N x C, labels (N,) int64 -> (N,)."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits N x C and labels (N,), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return torch.log_softmax(logits, dim=-1).gather(1, labels.long().unsqueeze(1)).squeeze(1)


def bounded_ce_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """S4 bounded loss: mean_i -log(max(p_{y_i}, eps)) <= -log(eps); no exploding gradients."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps}")
    log_p = _true_class_log_prob(logits, labels)  # (N,)
    return -torch.clamp(log_p, min=math.log(eps)).mean()


def fedosd_unlearning_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """S4 FedOSD unlearning cross-entropy: mean_i -log(1 - p_{y_i} / 2), in [0, ln 2].

    Minimised by descent: it pushes p_y down, and stays bounded as p_y -> 0.
    """
    p_y = _true_class_log_prob(logits, labels).exp()  # (N,)
    return -torch.log1p(-p_y / 2).mean()


# ---------------------------------------------------------------------------------------
# S4 privacy
# ---------------------------------------------------------------------------------------


def gaussian_sigma(clip_norm: float, epsilon: float, delta: float) -> float:
    """S4 one-release Gaussian mechanism: sigma = C sqrt(2 ln(1.25 / delta)) / epsilon.

    Valid only for 0 < epsilon < 1 and a single release; otherwise use an accountant.
    """
    if clip_norm <= 0:
        raise ValueError(f"clip_norm (the sensitivity C) must be positive, got {clip_norm}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    if epsilon >= 1:
        raise ValueError(f"the classic Gaussian bound holds only for epsilon < 1 (got {epsilon}); "
                         "use an accountant: edge_lam.training.privacy.noise_multiplier_for_budget (Opacus RDP)")
    return clip_norm * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def add_gaussian_noise(g: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """S4: g~ = g + N(0, sigma^2 I), same shape as g (float64)."""
    if sigma < 0:
        raise ValueError(f"sigma must be non-negative, got {sigma}")
    g = np.asarray(g, dtype=np.float64)
    return g + rng.normal(0.0, sigma, size=g.shape)


def unlearning_objective(loss: str, eps: float):
    """The loss an opting-out device *descends* to forget (`unlearn.loss`): FedOSD's
    -log(1 - p_y / 2), or the bounded cross-entropy ascended, i.e. log(max(p_y, eps)) (no
    gradient once p_y < eps, so nothing explodes). A function of (logits, labels)."""
    if loss == "fedosd":
        return fedosd_unlearning_loss
    return lambda logits, labels: -bounded_ce_loss(logits, labels, eps=eps)
