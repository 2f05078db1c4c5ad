"""S4 on adapter states: mixed ranks projected in the padded r_max space; FedOSD recovery."""

import numpy as np

from strategies.unlearn.steps import remove_drift, unlearning_step
from edge_lam.training.lora import pad_lora, truncate_lora

L = "m.layer.0.query"
R_MAX = 4


def _state(rng, rank, d=5):
    return {f"{L}.lora_A.weight": rng.normal(size=(rank, d)).astype(np.float32),
            f"{L}.lora_B.weight": rng.normal(size=(d, rank)).astype(np.float32),
            "m.classifier.weight": rng.normal(size=(3, d)).astype(np.float32)}


def _flat(state):
    return np.concatenate([np.asarray(state[k], np.float64).ravel() for k in sorted(state)])


def test_unlearning_step_matches_literal_projection_in_padded_space():
    rng = np.random.default_rng(0)
    theta = _state(rng, R_MAX)
    retained = [_state(rng, 2), _state(rng, 4), _state(rng, 1)]  # HetLoRA ranks
    forget = [_state(rng, 2)]
    new, projected, info = unlearning_step(theta, retained, forget, R_MAX, lr=0.1)

    G_r = np.stack([_flat(pad_lora(g, R_MAX)) for g in retained], axis=1)  # p x 3
    g_o = _flat(pad_lora(forget[0], R_MAX))
    P = np.eye(G_r.shape[0]) - G_r @ np.linalg.pinv(G_r)  # literal I - U U^T (small p)
    expected = _flat(theta) - 0.1 * (G_r.mean(axis=1) + P @ g_o)
    np.testing.assert_allclose(_flat(new), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_flat(projected), -0.1 * P @ g_o, rtol=1e-5, atol=1e-6)
    for j in range(G_r.shape[1]):  # orthogonal to every remaining device's (padded) gradient
        assert abs(_flat(projected) @ G_r[:, j]) < 1e-5 * np.linalg.norm(G_r[:, j])
    assert info["rank_kept"] == 3 and info["max_abs_cos_projected_vs_retained"] < 1e-6
    assert new[f"{L}.lora_A.weight"].shape == (R_MAX, 5) and new[f"{L}.lora_A.weight"].dtype == np.float32
    # an opting-out device of rank 2 receives the truncation of the projected update
    assert truncate_lora(projected, 2)[f"{L}.lora_B.weight"].shape == (5, 2)


def test_recovery_removes_the_component_along_the_unlearning_direction():
    rng = np.random.default_rng(1)
    before, theta = _state(rng, R_MAX), _state(rng, R_MAX)
    states = [_state(rng, 2), _state(rng, 4)]
    corrected = remove_drift(states, theta, before, R_MAX)
    d = _flat(theta) - _flat(before)
    for original, fixed in zip(states, corrected):
        update = _flat(fixed) - _flat(theta)
        assert abs(update @ d) < 1e-4 * np.linalg.norm(d) * np.linalg.norm(update)
        # only the component along d went: the rest of the update is intact
        raw = _flat(pad_lora(original, R_MAX)) - _flat(theta)
        np.testing.assert_allclose(raw - update, (raw @ d / (d @ d)) * d, atol=1e-4)
    # no unlearning yet (theta == before): recovery is plain aggregation of the padded states
    same = remove_drift(states, theta, theta, R_MAX)
    np.testing.assert_allclose(_flat(same[0]), _flat(pad_lora(states[0], R_MAX)), atol=1e-6)
