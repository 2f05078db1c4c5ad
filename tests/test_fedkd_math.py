"""S3 FedKD math against hand-computed values: distillation losses and SVD compression."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from strategies.fedkd.math import (compress_update, decompress_update, energy_threshold, kd_loss,
                              mutual_kd_losses, payload_nbytes, svd_compress, svd_decompress,
                              temperature_softmax)

LN3 = math.log(3.0)
# p = softmax([0, ln 3]) = (1/4, 3/4), q = softmax([0, 0]) = (1/2, 1/2)
KL_PQ = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # ~0.1308
KL_QP = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # ~0.1438


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def rel_error(x: np.ndarray, x_hat: np.ndarray) -> float:
    """||X - X_hat||_F^2 / ||X||_F^2 in float64."""
    x = x.astype(np.float64)
    return float(np.sum((x - x_hat.astype(np.float64)) ** 2) / np.sum(x**2))


# ---------------------------------------------------------------------------- distillation

def test_temperature_softmax_divides_logits_by_T():
    p = temperature_softmax(t([[0.0, 2 * LN3]]), T=2.0)
    assert torch.allclose(p, t([[0.25, 0.75]]))
    assert torch.allclose(temperature_softmax(t([[0.0, LN3]]), T=1.0), t([[0.25, 0.75]]))
    with pytest.raises(ValueError, match="temperature"):
        temperature_softmax(t([[0.0, 1.0]]), T=0.0)


def test_kd_loss_is_kl_teacher_to_student():
    assert kd_loss(t([[0.0, LN3]]), t([[0.0, 0.0]]), T=1.0).item() == pytest.approx(KL_PQ)
    assert kd_loss(t([[0.0, 0.0]]), t([[0.0, LN3]]), T=1.0).item() == pytest.approx(KL_QP)
    assert kd_loss(t([[1.0, -2.0, 0.5]]), t([[1.0, -2.0, 0.5]]), T=3.0).item() == \
        pytest.approx(0.0, abs=1e-12)


def test_kd_loss_T_squared_factor():
    # logits doubled and T = 2: same distributions as at T = 1, so loss = 2^2 * KL
    loss = kd_loss(t([[0.0, 2 * LN3]]), t([[0.0, 0.0]]), T=2.0)
    assert loss.item() == pytest.approx(4.0 * KL_PQ)


def test_kd_loss_batch_mean_and_leading_dims():
    teacher = t([[0.0, LN3], [5.0, 1.0]])
    student = t([[0.0, 0.0], [5.0, 1.0]])  # second row: KL = 0
    assert kd_loss(teacher, student, T=1.0).item() == pytest.approx(KL_PQ / 2)
    assert kd_loss(teacher[None], student[None], T=1.0).item() == pytest.approx(KL_PQ / 2)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(teacher, student[:1], T=1.0)


def test_kd_loss_gradient_reaches_student_only():
    # d(T^2 KL)/dz_student = T (q - p) / N
    teacher = t([[0.0, 2 * LN3]]).requires_grad_()
    student = t([[0.0, 0.0]]).requires_grad_()
    kd_loss(teacher, student, T=2.0).backward()
    assert teacher.grad is None
    assert torch.allclose(student.grad, 2.0 * (t([[0.5, 0.5]]) - t([[0.25, 0.75]])))


def test_mutual_losses_match_hand_values():
    local, shared, labels = t([[0.0, LN3]]), t([[0.0, 0.0]]), torch.tensor([1])
    ce_local, ce_shared = -math.log(0.75), math.log(2.0)
    out = mutual_kd_losses(local, shared, labels, T=1.0, lam=0.5)
    assert out["task_local"].item() == pytest.approx(ce_local)
    assert out["task_shared"].item() == pytest.approx(ce_shared)
    assert out["shared"].item() == pytest.approx(ce_shared + KL_PQ)
    assert out["local"].item() == pytest.approx(KL_QP + 0.5 * ce_local)


def test_mutual_losses_lambda_weighting_and_T():
    local, shared, labels = t([[0.0, 2 * LN3]]), t([[0.0, 0.0]]), torch.tensor([1])
    ce_local = -math.log(0.9)  # softmax([0, 2 ln 3]) = (1/10, 9/10) for the task loss
    a = mutual_kd_losses(local, shared, labels, T=2.0, lam=0.0)["local"].item()
    b = mutual_kd_losses(local, shared, labels, T=2.0, lam=3.0)["local"].item()
    assert a == pytest.approx(4.0 * KL_QP)
    assert b - a == pytest.approx(3.0 * ce_local)
    with pytest.raises(ValueError, match="lambda"):
        mutual_kd_losses(local, shared, labels, T=2.0, lam=-1.0)


def test_mutual_losses_adaptive_scaling():
    local, shared, labels = t([[0.0, LN3]]), t([[0.0, 0.0]]), torch.tensor([1])
    ce_local, ce_shared = -math.log(0.75), math.log(2.0)
    scale = 1.0 / (ce_local + ce_shared)
    out = mutual_kd_losses(local, shared, labels, T=1.0, lam=0.5, adaptive=True)
    assert out["scale"].item() == pytest.approx(scale)
    assert out["shared"].item() == pytest.approx(ce_shared + scale * KL_PQ)
    assert out["local"].item() == pytest.approx(0.5 * ce_local + scale * KL_QP)


def test_mutual_losses_hidden_mse_plain_and_adaptive():
    local, shared, labels = t([[0.0, LN3]]), t([[0.0, 0.0]]), torch.tensor([1])
    h_local = [t([[1.0, 2.0]]), t([[3.0, 3.0]])]
    h_shared = [t([[0.0, 0.0]]), t([[1.0, 3.0]])]
    hidden = (1 + 4) / 2 + (4 + 0) / 2  # 2.5 + 2.0, summed over layers
    ce_local, ce_shared = -math.log(0.75), math.log(2.0)
    out = mutual_kd_losses(local, shared, labels, T=1.0, lam=1.0,
                           hidden_local=h_local, hidden_shared=h_shared)
    assert out["hidden_mse"].item() == pytest.approx(hidden)
    assert out["shared"].item() == pytest.approx(ce_shared + KL_PQ + hidden)
    assert out["local"].item() == pytest.approx(ce_local + KL_QP + hidden)
    scale = 1.0 / (ce_local + ce_shared)
    out = mutual_kd_losses(local, shared, labels, T=1.0, lam=1.0, adaptive=True,
                           hidden_local=h_local, hidden_shared=h_shared)
    assert out["shared"].item() == pytest.approx(ce_shared + scale * (KL_PQ + hidden))
    with pytest.raises(ValueError, match="both modules"):
        mutual_kd_losses(local, shared, labels, T=1.0, lam=1.0, hidden_local=h_local)


def test_mutual_losses_each_loss_moves_its_own_module():
    local = t([[0.3, -1.0, 2.0]]).requires_grad_()
    shared = t([[1.0, 0.0, -0.5]]).requires_grad_()
    h_local, h_shared = t([[1.0, 2.0]]).requires_grad_(), t([[0.0, 0.5]]).requires_grad_()
    out = mutual_kd_losses(local, shared, torch.tensor([2]), T=2.0, lam=1.0, adaptive=True,
                           hidden_local=[h_local], hidden_shared=[h_shared])
    out["shared"].backward()
    assert local.grad is None and h_local.grad is None
    assert shared.grad is not None and h_shared.grad is not None
    shared.grad = h_shared.grad = None
    out["local"].backward()
    assert shared.grad is None and h_shared.grad is None
    assert local.grad is not None and h_local.grad is not None


def test_mutual_losses_skip_ignored_labels():
    local = t([[0.0, LN3], [9.0, -9.0]])
    shared = t([[0.0, 0.0], [-9.0, 9.0]])
    out = mutual_kd_losses(local, shared, torch.tensor([1, -100]), T=1.0, lam=1.0)
    assert out["shared"].item() == pytest.approx(math.log(2.0) + KL_PQ)
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        mutual_kd_losses(local, shared, torch.tensor([-100, -100]), T=1.0, lam=1.0)


# ---------------------------------------------------------------------------- compression

def test_energy_threshold_schedule():
    assert energy_threshold(1, 10) == pytest.approx(0.95)
    assert energy_threshold(10, 10) == pytest.approx(0.98)
    assert energy_threshold(2, 3) == pytest.approx(0.965)
    assert energy_threshold(1, 1) == pytest.approx(0.95)
    values = [energy_threshold(r, 7) for r in range(1, 8)]
    assert np.all(np.diff(values) > 0)
    with pytest.raises(ValueError, match="server_round"):
        energy_threshold(0, 5)
    with pytest.raises(ValueError, match="server_round"):
        energy_threshold(6, 5)


def test_svd_compress_keeps_smallest_k_by_energy():
    x = np.diag([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert svd_compress(x, 9 / 14)[1].tolist() == [3.0]
    assert svd_compress(x, 0.9)[1].tolist() == [3.0, 2.0]  # 13/14 = 0.929
    assert svd_compress(x, 0.95)[1].tolist() == [3.0, 2.0, 1.0]
    u, s, vt = svd_compress(x, 0.9)
    assert u.shape == (3, 2) and vt.shape == (2, 3)
    assert rel_error(x, svd_decompress(u, s, vt)) == pytest.approx(1 / 14)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.95, 0.98, 1.0])
def test_svd_error_bound_random_matrix(energy):
    x = np.random.default_rng(0).normal(size=(40, 30))
    u, s, vt = svd_compress(x, energy)
    assert rel_error(x, svd_decompress(u, s, vt)) <= 1 - energy + 1e-12
    full = np.linalg.svd(x, compute_uv=False) ** 2
    k = len(s)
    assert full[: k - 1].sum() < energy * full.sum()  # k - 1 values would not be enough


def test_svd_error_bound_low_rank_and_float32():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(64, 3)) @ rng.normal(size=(3, 48))).astype(np.float32)
    u, s, vt = svd_compress(x, 0.98)
    assert len(s) <= 3 and u.dtype == np.float32
    assert rel_error(x, svd_decompress(u, s, vt)) <= 1 - 0.98 + 1e-6
    z = np.zeros((5, 4))
    u, s, vt = svd_compress(z, 0.95)
    assert len(s) == 0 and np.array_equal(svd_decompress(u, s, vt), z)


def test_compress_update_round_trip_keys_shapes_dtypes():
    rng = np.random.default_rng(2)
    state = {
        "layer.lora_A.weight": (rng.normal(size=(4, 1)) @ rng.normal(size=(1, 64))).astype(
            np.float32),
        "layer.lora_B.weight": rng.normal(size=(64, 4)).astype(np.float32),
        "head.bias": rng.normal(size=(3,)).astype(np.float32),
        "steps": np.array([7, 8], dtype=np.int64),
    }
    payload = compress_update(state, energy=0.95)
    assert "layer.lora_A.weight::U" in payload and "layer.lora_A.weight::Vt" in payload
    assert "head.bias::full" in payload and "steps::full" in payload
    out = decompress_update(payload)
    assert list(out) == list(state)
    for key, value in state.items():
        assert out[key].shape == value.shape and out[key].dtype == value.dtype
        assert rel_error(value, out[key]) <= 1 - 0.95 + 1e-6
    assert np.array_equal(out["head.bias"], state["head.bias"])
    assert np.array_equal(out["steps"], state["steps"])


def test_compression_saves_bytes_only_when_it_can():
    rng = np.random.default_rng(3)
    low_rank = (rng.normal(size=(128, 2)) @ rng.normal(size=(2, 96))).astype(np.float32)
    payload = compress_update({"w": low_rank}, energy=0.98)
    assert set(payload) == {"w::U", "w::s", "w::Vt"}
    assert payload_nbytes(payload) == 2 * (128 + 1 + 96) * 4 < low_rank.nbytes
    dense = rng.normal(size=(8, 8)).astype(np.float32)  # full rank: SVD factors are larger
    payload = compress_update({"w": dense}, energy=0.98)
    assert set(payload) == {"w::full"} and payload_nbytes(payload) == dense.nbytes


def test_payload_errors_are_clear():
    with pytest.raises(ValueError, match="reserved"):
        compress_update({"a::b": np.ones((2, 2))}, energy=0.95)
    with pytest.raises(ValueError, match="expected either"):
        decompress_update({"w::U": np.ones((2, 1)), "w::s": np.ones(1)})
    with pytest.raises(ValueError, match="not '<key>"):
        decompress_update({"w": np.ones(2)})
    with pytest.raises(ValueError, match="energy"):
        compress_update({"w": np.ones((2, 2))}, energy=0.0)
