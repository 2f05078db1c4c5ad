"""S4 unlearning math: projection, update rule, losses, drift removal, DP noise, padding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_lam.training.privacy import noise_multiplier_for_budget
from strategies.unlearn.math import (
    add_gaussian_noise,
    bounded_ce_loss,
    fedosd_unlearning_loss,
    flatten_state,
    gaussian_sigma,
    pad_for_projection,
    project_orthogonal,
    remove_drift_component,
    retained_basis,
    unflatten,
    unlearning_update,
)


def _orthogonal_to_all(g_proj, retained):
    for g in retained:
        bound = 1e-8 * np.linalg.norm(g_proj) * np.linalg.norm(g)
        assert abs(g_proj @ g) < max(bound, 1e-300), (g_proj @ g, bound)


# --- projection ------------------------------------------------------------------------


def test_projected_gradient_is_orthogonal_to_every_retained_gradient():
    rng = np.random.default_rng(0)
    retained = [rng.normal(size=50) for _ in range(5)]
    U = retained_basis(np.stack(retained, axis=1))
    assert U.shape == (50, 5)
    np.testing.assert_allclose(U.T @ U, np.eye(5), atol=1e-12)
    for _ in range(3):
        g = rng.normal(size=50)
        g_proj = project_orthogonal(g, U)
        assert np.linalg.norm(g_proj) > 0.1 * np.linalg.norm(g)  # not trivially zero
        _orthogonal_to_all(g_proj, retained)


def test_projection_is_idempotent_and_keeps_orthogonal_part():
    rng = np.random.default_rng(1)
    U = retained_basis(rng.normal(size=(30, 4)))
    g = rng.normal(size=30)
    once = project_orthogonal(g, U)
    np.testing.assert_allclose(project_orthogonal(once, U), once, atol=1e-12)
    # a vector in span(U) is removed entirely
    np.testing.assert_allclose(project_orthogonal(U @ np.array([1.0, -2.0, 3.0, 0.5]), U),
                               0.0, atol=1e-12)


def test_rank_deficient_retained_matrix_drops_negligible_directions():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=40), rng.normal(size=40)
    G_r = np.stack([a, a, b, 2.0 * a], axis=1)  # duplicate / parallel columns: rank 2
    U = retained_basis(G_r)
    assert U.shape == (40, 2)
    np.testing.assert_allclose(U.T @ U, np.eye(2), atol=1e-12)
    g_proj = project_orthogonal(rng.normal(size=40), U)
    _orthogonal_to_all(g_proj, [a, b])


def test_zero_retained_matrix_gives_empty_basis():
    U = retained_basis(np.zeros((7, 3)))
    assert U.shape == (7, 0)
    g = np.arange(7.0)
    np.testing.assert_array_equal(project_orthogonal(g, U), g)


def test_large_p_never_builds_p_by_p():
    # a p x p float64 matrix here would need 80 GB; the thin SVD needs a few MB
    rng = np.random.default_rng(3)
    p = 100_000
    retained = [rng.normal(size=p) for _ in range(3)]
    U = retained_basis(np.stack(retained, axis=1))
    assert U.shape == (p, 3)
    _orthogonal_to_all(project_orthogonal(rng.normal(size=p), U), retained)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        retained_basis(np.zeros(5))
    with pytest.raises(ValueError):
        project_orthogonal(np.zeros(4), np.zeros((5, 1)))
    with pytest.raises(ValueError):
        unlearning_update(np.zeros(3), [np.zeros(3)], [np.zeros(4)], lr=0.1)
    with pytest.raises(ValueError):
        unlearning_update(np.zeros(3), [], [np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError):
        unlearning_update(np.zeros(3), [np.zeros(3)], [np.array([np.nan, 0, 0])], lr=0.1)


# --- update rule -----------------------------------------------------------------------


def test_update_rule_matches_hand_computation():
    # retained gradients both along e1 -> U = +-e1 (rank 1);
    # forget gradients projected: [3,4,5] -> [0,4,5], [1,0,2] -> [0,0,2]; mean [0,2,3.5]
    # mean retained = [1.5,0,0]; step = [1.5,2,3.5]; theta = 1 - 0.1 * step
    theta = np.array([1.0, 1.0, 1.0])
    retained = [np.array([1.0, 0.0, 0.0]), np.array([2.0, 0.0, 0.0])]
    forget = [np.array([3.0, 4.0, 5.0]), np.array([1.0, 0.0, 2.0])]
    new_theta, info = unlearning_update(theta, retained, forget, lr=0.1, rel_tol=1e-6)
    np.testing.assert_allclose(new_theta, [0.85, 0.8, 0.65], atol=1e-12)
    assert info["rank_kept"] == 1
    assert info["max_abs_cos_projected_vs_retained"] < 1e-12
    assert info["retained_mean_norm"] == pytest.approx(1.5)
    assert info["projected_mean_norm"] == pytest.approx(math.hypot(2.0, 3.5))
    np.testing.assert_array_equal(theta, [1.0, 1.0, 1.0])  # input untouched


def test_update_rule_matches_literal_formula_on_random_data():
    rng = np.random.default_rng(4)
    p = 20
    theta = rng.normal(size=p)
    retained = [rng.normal(size=p) for _ in range(3)]
    forget = [rng.normal(size=p) for _ in range(2)]
    new_theta, info = unlearning_update(theta, retained, forget, lr=0.05)
    q, _ = np.linalg.qr(np.stack(retained, axis=1))  # independent basis of the same span
    P = np.eye(p) - q @ q.T  # fine at p = 20
    expected = theta - 0.05 * (np.mean(retained, axis=0) + np.mean([P @ g for g in forget], axis=0))
    np.testing.assert_allclose(new_theta, expected, atol=1e-12)
    assert info["rank_kept"] == 3


# --- losses ----------------------------------------------------------------------------


def test_losses_at_p_half():
    logits = torch.zeros(1, 2)  # p_y = 0.5
    labels = torch.tensor([0])
    assert fedosd_unlearning_loss(logits, labels).item() == pytest.approx(-math.log(0.75))
    assert bounded_ce_loss(logits, labels, eps=1e-6).item() == pytest.approx(math.log(2.0))


def test_bounded_ce_clamps_at_eps_and_has_no_gradient_there():
    logits = torch.tensor([[0.0, -200.0], [0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([1, 1])  # p_y ~ e^-200 (clamped), then 0.5
    loss = bounded_ce_loss(logits, labels, eps=1e-3)
    assert loss.item() == pytest.approx((-math.log(1e-3) + math.log(2.0)) / 2)
    loss.backward()
    assert torch.all(logits.grad[0] == 0)
    assert torch.all(torch.isfinite(logits.grad))


def test_fedosd_loss_bounds():
    torch.manual_seed(0)
    logits = 10 * torch.randn(64, 5)
    labels = torch.randint(0, 5, (64,))
    loss = fedosd_unlearning_loss(logits, labels).item()
    assert 0.0 <= loss <= math.log(2.0)
    sure = torch.tensor([[50.0, -50.0]])  # p_y -> 1: loss -> ln 2
    wrong = torch.tensor([[-50.0, 50.0]])  # p_y -> 0: loss -> 0
    assert fedosd_unlearning_loss(sure, torch.tensor([0])).item() == pytest.approx(math.log(2.0))
    assert fedosd_unlearning_loss(wrong, torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-12)


# --- FedOSD drift removal --------------------------------------------------------------


def test_drift_removal_is_orthogonal_to_direction():
    g = np.array([3.0, 4.0, 0.0])
    d = np.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(remove_drift_component(g, d), [0.0, 4.0, 0.0])
    rng = np.random.default_rng(5)
    g, d = rng.normal(size=25), rng.normal(size=25)
    out = remove_drift_component(g, d)
    assert abs(out @ d) < 1e-10 * np.linalg.norm(out) * np.linalg.norm(d)
    np.testing.assert_array_equal(remove_drift_component(g, np.zeros(25)), g)


# --- privacy ---------------------------------------------------------------------------


def test_gaussian_sigma_by_hand():
    # sqrt(2 ln(125000)) / 0.5 = sqrt(2 * 11.7360690) * 2 = 9.6896105
    assert gaussian_sigma(1.0, 0.5, 1e-5) == pytest.approx(9.6896105, rel=1e-6)
    assert gaussian_sigma(2.0, 0.5, 1e-5) == pytest.approx(2 * 9.6896105, rel=1e-6)
    with pytest.raises(ValueError, match="accountant"):
        gaussian_sigma(1.0, 1.0, 1e-5)


def test_add_gaussian_noise_has_requested_scale():
    rng = np.random.default_rng(6)
    g = np.zeros(200_000)
    noisy = add_gaussian_noise(g, 0.3, rng)
    assert noisy.shape == g.shape
    assert np.std(noisy) == pytest.approx(0.3, rel=0.01)
    np.testing.assert_array_equal(add_gaussian_noise(np.ones(3), 0.0, rng), np.ones(3))


# Opacus warns while its binary search probes sigma = 10 (where the best RDP order is the
# largest); the bracket point, not the answer.
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_noise_multiplier_from_opacus_decreases_with_epsilon():
    tight = noise_multiplier_for_budget(1.0, 1e-5, sample_rate=0.01, steps=100)
    loose = noise_multiplier_for_budget(8.0, 1e-5, sample_rate=0.01, steps=100)
    assert tight > loose > 0


# --- flattening and heterogeneous ranks ------------------------------------------------


def _lora_state(rank, rng):
    return {
        "layer.lora_A.weight": rng.normal(size=(rank, 3)).astype(np.float32),
        "layer.lora_B.weight": rng.normal(size=(5, rank)).astype(np.float32),
        "head.weight": rng.normal(size=(2, 5)).astype(np.float32),
    }


def test_padding_heterogeneous_ranks_then_flattening_gives_equal_lengths():
    rng = np.random.default_rng(7)
    states = [_lora_state(r, rng) for r in (1, 2, 4)]
    padded = pad_for_projection(states, r_max=4)
    flats = [flatten_state(s) for s in padded]
    assert {v.size for v, _ in flats} == {4 * 3 + 5 * 4 + 2 * 5}
    assert all(spec == flats[0][1] for _, spec in flats)
    for s, p in zip(states, padded):  # padding keeps the update B A
        np.testing.assert_allclose(p["layer.lora_B.weight"] @ p["layer.lora_A.weight"],
                                   s["layer.lora_B.weight"] @ s["layer.lora_A.weight"], rtol=1e-6)
    with pytest.raises(ValueError, match="r_max"):
        pad_for_projection(states, r_max=2)


def test_flatten_unflatten_round_trip():
    rng = np.random.default_rng(8)
    state = _lora_state(2, rng)
    vector, spec = flatten_state(state)
    back = unflatten(vector, spec)
    assert list(back) == sorted(state)
    for key in state:
        assert back[key].dtype == state[key].dtype
        np.testing.assert_array_equal(back[key], state[key])
    vector, spec = flatten_state(state, keys=["head.weight"])
    assert vector.shape == (10,)
    with pytest.raises(ValueError):
        unflatten(vector[:-1], spec)
