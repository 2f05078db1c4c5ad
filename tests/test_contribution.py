"""S6 contribution: influence (first-order / diagonal-Fisher) LOO vs exact LOO re-aggregation."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from strategies.robust.contribution import (
    compose_with_trust,
    contribution_weights,
    empirical_fisher_diag,
    exact_loo,
    influence_contributions,
    loo_directions,
    spearman,
)

D = 10  # features; logistic regression with bias: P = D + 1


def _loss(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = x @ theta[:D] + theta[D]
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, y)


def _make_data(rng: np.random.Generator, w_true: np.ndarray, n: int, shift: float, flip: bool):
    x = rng.normal(shift, 1.0, size=(n, D))
    y = (x @ w_true + 0.3 * rng.normal(size=n) > 0).astype(np.float64)
    if flip:
        y = 1.0 - y
    return torch.tensor(x), torch.tensor(y)


def _local_sgd(theta: np.ndarray, x, y, rng, lr=0.2, epochs=2, batch=16) -> np.ndarray:
    """One round of local SGD from theta; returns Delta_k = theta_k - theta (P,)."""
    t = torch.tensor(theta, requires_grad=True)
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(y)), max(1, len(y) // batch)):
            (g,) = torch.autograd.grad(_loss(t, x[idx], y[idx]), t)
            t = (t - lr * g).detach().requires_grad_(True)
    return t.detach().numpy() - theta


@pytest.fixture(scope="module")
def federation():
    """8 devices, different shifts and sizes; devices 0 and 1 have flipped labels (harmful)."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    w_true = rng.normal(size=D)
    sizes = [80, 60, 40, 120, 200, 60, 100, 160]
    shifts = [0.0, 0.2, -0.3, 0.1, 0.0, 0.4, -0.2, 0.3]
    devices = [_make_data(rng, w_true, n, s, flip=k < 2) for k, (n, s) in
               enumerate(zip(sizes, shifts))]
    xv, yv = _make_data(rng, w_true, 500, 0.0, flip=False)
    x0, y0 = _make_data(rng, w_true, 30, 0.0, flip=False)      # short warm start for theta
    theta = _local_sgd(np.zeros(D + 1), x0, y0, rng, epochs=1)
    deltas = np.stack([_local_sgd(theta, x, y, rng) for x, y in devices])   # (K, P)
    weights = np.array(sizes, dtype=np.float64) / sum(sizes)
    return theta, deltas, weights, xv, yv


def _val_loss_fn(xv, yv):
    return lambda th: float(_loss(torch.tensor(th), xv, yv))


def _grad_and_fisher(theta_new: np.ndarray, xv, yv):
    """Per-example validation gradients (N, P) by torch.func.vmap, then g and diag F."""
    from torch.func import grad, vmap

    per_ex = vmap(grad(lambda th, x, y: _loss(th, x[None], y[None])), in_dims=(None, 0, 0))
    gi = per_ex(torch.tensor(theta_new), xv, yv).numpy()          # (N, P)
    return empirical_fisher_diag(gi)


def test_influence_matches_exact_loo(federation):
    theta, deltas, weights, xv, yv = federation
    loss_fn = _val_loss_fn(xv, yv)
    theta_new = theta + weights @ deltas

    t0 = time.perf_counter()
    exact = exact_loo(loss_fn, theta, deltas, weights)
    t_exact = time.perf_counter() - t0

    t0 = time.perf_counter()
    g, fisher = _grad_and_fisher(theta_new, xv, yv)
    dirs = loo_directions(deltas, weights)
    first = influence_contributions(g, None, dirs)
    fish = influence_contributions(g, fisher, dirs)
    t_infl = time.perf_counter() - t0

    rho1, rho_f = spearman(first, exact), spearman(fish, exact)
    err1, err_f = np.abs(first - exact).mean(), np.abs(fish - exact).mean()
    print(f"\nexact   {np.round(exact, 5)}\nfirst   {np.round(first, 5)}\nfisher  {np.round(fish, 5)}"
          f"\nspearman first-order {rho1:.3f}  fisher-diag {rho_f:.3f}"
          f"\nmean |error| first-order {err1:.2e}  fisher-diag {err_f:.2e}"
          f"\ntime exact LOO {t_exact * 1e3:.1f} ms  influence {t_infl * 1e3:.1f} ms")
    assert rho_f >= 0.8
    assert err_f < err1, "the Fisher curvature term should bring the values closer"
    assert np.all(exact[:2] < 0) and np.all(fish[:2] < 0), "label-flipped devices must hurt"


def test_drop_harmful_lowers_validation_loss(federation):
    theta, deltas, weights, xv, yv = federation
    loss_fn = _val_loss_fn(xv, yv)
    theta_new = theta + weights @ deltas
    g, fisher = _grad_and_fisher(theta_new, xv, yv)
    contrib = influence_contributions(g, fisher, loo_directions(deltas, weights))

    dropped = contribution_weights(contrib, weights, mode="drop-harmful")
    assert dropped[0] == 0 and dropped[1] == 0 and np.isclose(dropped.sum(), 1)
    assert loss_fn(theta + dropped @ deltas) < loss_fn(theta_new)

    soft = contribution_weights(contrib, weights, mode="softmax",
                                temperature=float(np.abs(contrib).mean()))
    assert np.all(soft[:2] < weights[:2]) and np.isclose(soft.sum(), 1)
    assert loss_fn(theta + soft @ deltas) < loss_fn(theta_new)

    combined = compose_with_trust(dropped, np.ones(8), alpha=0.7, beta=0.3)
    assert np.isclose(combined.sum(), 1) and np.allclose(combined[:2], 0.3 / 8)


def test_loo_directions_hand_computed():
    deltas = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    w = np.array([0.5, 0.25, 0.25])
    # theta_new - theta = U = [1, 0.75]; leave 0 out: (0.25[0,1] + 0.25[2,2]) / 0.5 = [1, 1.5]
    d = loo_directions(deltas, w)
    np.testing.assert_allclose(d[0], [0.0, 0.75])
    # leave 2 out: (0.5[1,0] + 0.25[0,1]) / 0.75 = [2/3, 1/3]
    np.testing.assert_allclose(d[2], [2 / 3 - 1.0, 1 / 3 - 0.75])
    exact = exact_loo(lambda th: float(th.sum()), np.zeros(2), deltas, w)   # linear loss
    np.testing.assert_allclose(exact, influence_contributions(np.ones(2), None, d))


def test_spearman_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks a = [1.5, 1.5, 3, 4], b = [1, 2, 3, 4]; centred: [-1, -1, .5, 1.5], [-1.5, -.5, .5, 1.5]
    # Pearson = (1.5 + .5 + .25 + 2.25) / sqrt(4.5 * 5) = 4.5 / sqrt(22.5)
    assert spearman([5, 5, 7, 9], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    with pytest.raises(ValueError, match="constant"):
        spearman([1, 1, 1], [1, 2, 3])


def test_compose_with_trust_hand_computed():
    q = np.array([0.5, 0.5, 0.0])
    t = np.array([1.0, 2.0, 1.0])                     # normalised: [0.25, 0.5, 0.25]
    np.testing.assert_allclose(compose_with_trust(q, t, 0.6, 0.4), [0.4, 0.5, 0.1])
    with pytest.raises(ValueError, match="alpha"):
        compose_with_trust(q, t, 0.6, 0.6)


def test_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="sum to 1"):
        loo_directions(np.ones((2, 3)), np.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="skip the round"):
        contribution_weights(np.array([-1.0, -2.0]), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="mode"):
        contribution_weights(np.array([1.0, 2.0]), np.array([0.5, 0.5]), mode="x")
