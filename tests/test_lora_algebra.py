"""S1 rank algebra and aggregation, against hand-computed and literal results."""

import numpy as np
import pytest

from strategies.lora.diagnostics import aggregation_error
from strategies.lora.math import (example_weights, factorize, flexlora_aggregate,
                                  hetlora_aggregate, weighted_products)
from edge_lam.training.lora import lora_products, lora_rank, pad_lora, truncate_lora

L = "base_model.model.layer.0.query"


def make_state(rank, d_out=6, d_in=5, seed=0, head=None):
    rng = np.random.default_rng(seed)
    state = {f"{L}.lora_A.weight": rng.normal(size=(rank, d_in)).astype(np.float32),
             f"{L}.lora_B.weight": rng.normal(size=(d_out, rank)).astype(np.float32)}
    state["base_model.model.classifier.weight"] = (
        np.full((2, 3), head, np.float32) if head is not None else rng.normal(size=(2, 3)).astype(np.float32))
    return state


def test_truncate_keeps_leading_factors_and_head():
    s = make_state(8)
    t = truncate_lora(s, 3)
    assert t[f"{L}.lora_A.weight"].shape == (3, 5)
    assert t[f"{L}.lora_B.weight"].shape == (6, 3)
    np.testing.assert_array_equal(t[f"{L}.lora_A.weight"], s[f"{L}.lora_A.weight"][:3])
    np.testing.assert_array_equal(t[f"{L}.lora_B.weight"], s[f"{L}.lora_B.weight"][:, :3])
    np.testing.assert_array_equal(t["base_model.model.classifier.weight"],
                                  s["base_model.model.classifier.weight"])
    assert lora_rank(t) == 3


def test_truncate_then_pad_restores_zeros():
    s = make_state(8)
    back = pad_lora(truncate_lora(s, 3), 8)
    a, b = back[f"{L}.lora_A.weight"], back[f"{L}.lora_B.weight"]
    np.testing.assert_array_equal(a[:3], s[f"{L}.lora_A.weight"][:3])
    assert not a[3:].any() and not b[:, 3:].any()
    # the padded product is the truncated product: zeros add nothing
    np.testing.assert_allclose(lora_products(back)[L], lora_products(truncate_lora(s, 3))[L])


def test_hetlora_matches_hand_computation():
    # device 1: rank 1, 1 example; device 2: rank 2, 3 examples -> w = (1/4, 3/4)
    s1 = {f"{L}.lora_A.weight": np.array([[1.0, 2.0]], np.float32),
          f"{L}.lora_B.weight": np.array([[4.0], [8.0]], np.float32),
          "head": np.array([0.0, 4.0], np.float32)}
    s2 = {f"{L}.lora_A.weight": np.array([[2.0, 2.0], [4.0, 0.0]], np.float32),
          f"{L}.lora_B.weight": np.array([[0.0, 4.0], [4.0, 0.0]], np.float32),
          "head": np.array([4.0, 0.0], np.float32)}
    out = hetlora_aggregate([s1, s2], [1, 3], r_max=2)
    np.testing.assert_allclose(out[f"{L}.lora_A.weight"], [[1.75, 2.0], [3.0, 0.0]])
    np.testing.assert_allclose(out[f"{L}.lora_B.weight"], [[1.0, 3.0], [5.0, 0.0]])
    np.testing.assert_allclose(out["head"], [3.0, 1.0])


def test_hetlora_matches_literal_loop():
    states = [make_state(r, seed=r) for r in (2, 4, 8)]
    counts = [10, 30, 60]
    out = hetlora_aggregate(states, counts, r_max=8)
    w = np.array(counts) / 100
    lit_a = np.zeros((8, 5))
    lit_b = np.zeros((6, 8))
    for wk, s in zip(w, states):
        r = lora_rank(s)
        lit_a[:r] += wk * s[f"{L}.lora_A.weight"]
        lit_b[:, :r] += wk * s[f"{L}.lora_B.weight"]
    # float32 running sums: exact to float32 rounding of the largest entries
    np.testing.assert_allclose(out[f"{L}.lora_A.weight"], lit_a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[f"{L}.lora_B.weight"], lit_b, rtol=1e-6, atol=1e-6)


def test_equal_ranks_is_plain_fedavg_and_error_reflects_cross_terms():
    states = [make_state(4, seed=s) for s in (1, 2)]
    out = hetlora_aggregate(states, [1, 1], r_max=4)
    for key in states[0]:
        np.testing.assert_allclose(out[key], (states[0][key] + states[1][key]) / 2, rtol=1e-6)
    err = aggregation_error(out, states, [1, 1])
    assert err is not None and err > 0.1  # averaging B and A separately != average of BA
    # one device: the mean is the device itself, no error
    assert aggregation_error(hetlora_aggregate(states[:1], [5], 4), states[:1], [5]) == pytest.approx(0, abs=1e-6)


def test_flexlora_product_equals_weighted_sum_when_rank_allows():
    states = [make_state(r, d_out=12, d_in=10, seed=r) for r in (1, 2, 3)]
    counts = [3, 1, 2]
    out = flexlora_aggregate(states, counts, r_max=6)  # rank of the sum <= 1 + 2 + 3 = 6
    target = weighted_products(states, counts)[L]
    np.testing.assert_allclose(lora_products(out)[L], target, rtol=1e-4, atol=1e-5)
    assert aggregation_error(out, states, counts) < 1e-5
    # and it beats HetLoRA's separate averaging on the same replies
    het = hetlora_aggregate(states, counts, r_max=3)
    assert aggregation_error(het, states, counts) > 0.1


def test_flexlora_truncation_is_best_low_rank_approximation():
    states = [make_state(4, d_out=9, d_in=7, seed=s) for s in (3, 4)]
    out = flexlora_aggregate(states, [1, 1], r_max=8)
    target = weighted_products(states, [1, 1])[L]
    sv = np.linalg.svd(target, compute_uv=False)
    for r in (1, 2, 4):
        got = lora_products(truncate_lora(out, r))[L]
        # Eckart-Young: the residual of the best rank-r approximation is sqrt(sum of the rest)
        assert np.linalg.norm(target - got) == pytest.approx(np.sqrt((sv[r:] ** 2).sum()), rel=1e-4)


def test_factorize_pads_when_matrix_is_smaller_than_rank():
    delta = np.arange(6, dtype=np.float64).reshape(2, 3)
    b, a = factorize(delta, 4)
    assert b.shape == (2, 4) and a.shape == (4, 3)
    np.testing.assert_allclose(b @ a, delta, atol=1e-10)


def test_example_weights_reject_empty_or_nonpositive():
    np.testing.assert_allclose(example_weights([1, 3]), [0.25, 0.75])
    for bad in ([], [0, 2], [-1, 3]):
        with pytest.raises(ValueError):
            example_weights(bad)


def test_mixed_ranks_in_one_state_are_refused():
    s = make_state(4)
    s[f"{L}.lora_B.weight"] = s[f"{L}.lora_B.weight"][:, :3]
    with pytest.raises(ValueError, match="mixed ranks"):
        lora_rank(s)


def test_initial_state_is_fresh_even_after_training(tiny_bert, agnews):
    """A process that trained an adapter still hands out the untrained initial state."""
    from edge_lam.training.evaluation import ServerModel
    from edge_lam.config.run_config import RunConfig
    from edge_lam.models.lora_model import get_lora_model, get_trainable_state, set_trainable_state

    cfg = RunConfig.from_run_config({"model": str(tiny_bert), "data.path": str(agnews),
                                     "eval.max-examples": 20})
    task = ServerModel.prepare(cfg)
    first = task.initial_state()
    assert all(not v.any() for k, v in first.items() if "lora_B" in k)
    model = get_lora_model(cfg, task.label_names, cfg.r_max)
    set_trainable_state(model, {k: v + 1 for k, v in first.items()})
    assert any(get_trainable_state(model)[k].any() for k in first if "lora_B" in k)
    again = task.initial_state()
    for k in first:
        np.testing.assert_array_equal(again[k], first[k])
