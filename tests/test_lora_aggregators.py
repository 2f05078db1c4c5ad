"""The heterogeneous-rank aggregations added for the LLM gap (rank-wise renormalised,
HetLoRA's sparsity weighting) and FlexLoRA's low-rank SVD, against hand computations, and
each new strategy end to end through the Flower strategy with a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inprocess_grid import InProcessGrid
from strategies.lora.math import (AGGREGATORS, DELTA_AGGREGATORS, delta_aggregate, factorize,
                                  flexlora_aggregate, hetlora_aggregate, lowrank_svd,
                                  norm_weighted_aggregate, rankwise_aggregate,
                                  weighted_products)
from task.lora import lora_products, truncate_lora
from strategies.lora.server import federate, prepare_run
from task.config import RunConfig

L = "layer"


def _state(b, a, head=None):
    s = {f"{L}.lora_B.weight": np.array(b, dtype=np.float32),
         f"{L}.lora_A.weight": np.array(a, dtype=np.float32)}
    if head is not None:
        s["head.weight"] = np.array(head, dtype=np.float32)
    return s


def test_rankwise_averages_each_component_over_the_devices_that_have_it():
    low = _state([[1.0], [2.0]], [[1.0, 2.0]], head=[0.0])  # rank 1, 1 example
    high = _state([[3.0, 5.0], [4.0, 6.0]], [[3.0, 4.0], [5.0, 6.0]], head=[4.0])  # rank 2, 3
    out = rankwise_aggregate([low, high], [1, 3], r_max=2)
    # component 0: (1 * low + 3 * high) / 4; component 1: high alone (not 3/4 of it)
    np.testing.assert_allclose(out[f"{L}.lora_A.weight"], [[2.5, 3.5], [5.0, 6.0]])
    np.testing.assert_allclose(out[f"{L}.lora_B.weight"], [[2.5, 5.0], [3.5, 6.0]])
    np.testing.assert_allclose(out["head.weight"], [3.0])  # whole tensors: by examples
    zero_pad = hetlora_aggregate([low, high], [1, 3], r_max=2)
    np.testing.assert_allclose(zero_pad[f"{L}.lora_A.weight"][1], [3.75, 4.5])  # shrunk
    # a component no device has stays zero (r_max above every rank)
    wide = rankwise_aggregate([low, high], [1, 3], r_max=3)
    assert not wide[f"{L}.lora_A.weight"][2].any() and not wide[f"{L}.lora_B.weight"][:, 2].any()


def test_rankwise_with_equal_ranks_is_fedavg():
    rng = np.random.default_rng(0)
    states = [_state(rng.normal(size=(5, 3)), rng.normal(size=(3, 4))) for _ in range(3)]
    for key, value in hetlora_aggregate(states, [1, 2, 5], 3).items():
        np.testing.assert_allclose(rankwise_aggregate(states, [1, 2, 5], 3)[key], value,
                                   rtol=1e-6)


def test_sparsity_weighting_follows_the_update_norms():
    small = _state([[1.0]], [[1.0]])  # ||B A|| = 1
    large = _state([[2.0]], [[2.0]])  # ||B A|| = 4
    out = norm_weighted_aggregate([small, large], [1, 1], r_max=1)
    # weights n_k ||B_k A_k|| / sum = 1/5, 4/5
    np.testing.assert_allclose(out[f"{L}.lora_A.weight"], [[0.2 * 1 + 0.8 * 2]])
    np.testing.assert_allclose(out[f"{L}.lora_B.weight"], [[1.8]])
    # with example counts: 3 * 1 vs 1 * 4 -> 3/7, 4/7
    out = norm_weighted_aggregate([small, large], [3, 1], r_max=1)
    np.testing.assert_allclose(out[f"{L}.lora_A.weight"], [[3 / 7 + 8 / 7]], rtol=1e-6)
    # no device moved the layer: plain example weights
    zero = _state([[0.0]], [[1.0]])
    out = norm_weighted_aggregate([zero, zero], [1, 3], r_max=1)
    np.testing.assert_allclose(out[f"{L}.lora_A.weight"], [[1.0]])


@pytest.mark.parametrize("d_out, d_in, ranks", [(40, 30, (2, 4, 8)), (6, 5, (4, 4))])
def test_lowrank_svd_equals_the_dense_svd_of_the_weighted_sum(d_out, d_in, ranks):
    """(6, 5): R = 8 >= min(d): the dense fallback."""
    rng = np.random.default_rng(1)
    bs = [rng.normal(size=(d_out, r)) for r in ranks]
    as_ = [rng.normal(size=(r, d_in)) for r in ranks]
    w = np.array([0.2, 0.3, 0.5][:len(ranks)])
    w = w / w.sum()
    dense = sum(wk * b @ a for wk, b, a in zip(w, bs, as_))
    for rank in (1, 3, 16):
        b, a = lowrank_svd(bs, as_, w, rank)
        b_ref, a_ref = factorize(dense, rank)
        assert b.shape == (d_out, rank) and a.shape == (rank, d_in)
        np.testing.assert_allclose(b @ a, b_ref @ a_ref, atol=1e-9)
        # the factors are balanced (B^T B = A A^T = S_r), as factorize's
        np.testing.assert_allclose(b.T @ b, a @ a.T, atol=1e-9)


def test_flexlora_keeps_the_exact_sum_when_its_rank_fits():
    rng = np.random.default_rng(2)
    states = [_state(rng.normal(size=(20, r)), rng.normal(size=(r, 12))) for r in (2, 4)]
    out = flexlora_aggregate(states, [1, 3], r_max=6)
    target = weighted_products(states, [1, 3])[L]
    got = out[f"{L}.lora_B.weight"].astype(np.float64) @ out[f"{L}.lora_A.weight"]
    np.testing.assert_allclose(got, target, atol=1e-4)


def test_delta_aggregation_adds_the_weighted_changes_to_the_old_product():
    rng = np.random.default_rng(3)
    previous = _state(rng.normal(size=(6, 4)), rng.normal(size=(4, 5)), head=[1.0, 1.0])
    low_sent, high_sent = truncate_lora(previous, 1), truncate_lora(previous, 4)
    low_new = {k: v.copy() for k, v in low_sent.items()}  # the rank-1 device changed nothing
    high_new = {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32)
                for k, v in high_sent.items()}
    out = delta_aggregate(previous, [low_sent, high_sent], [low_new, high_new], [1, 3], r_max=4)
    old = lora_products(previous)[L]
    change = lora_products(high_new)[L] - lora_products(high_sent)[L]
    target = old + 0.75 * change  # the rank-1 device adds nothing, shrinks nothing
    got = lora_products(out)[L]
    # the best rank-4 approximation of the target (it has rank <= 4 + 2 * 4 here)
    b, a = factorize(target, 4)
    np.testing.assert_allclose(got, b @ a, atol=1e-5)
    np.testing.assert_allclose(out["head.weight"], 1.0 + 0.75 * (high_new["head.weight"] - 1.0),
                               rtol=1e-6)
    # zero-padding of models would have shrunk the components the rank-1 device cannot see
    shrunk = lora_products(hetlora_aggregate([low_new, high_new], [1, 3], 4))[L]
    assert np.linalg.norm(got - target) < 0.5 * np.linalg.norm(shrunk - target)


def test_delta_aggregation_at_full_rank_is_flexlora():
    rng = np.random.default_rng(4)
    previous = _state(rng.normal(size=(6, 3)), rng.normal(size=(3, 5)))
    sent = [truncate_lora(previous, 3)] * 2
    new = [{k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in sent[0].items()}
           for _ in range(2)]
    got = lora_products(delta_aggregate(previous, sent, new, [2, 5], 3))[L]
    want = lora_products(flexlora_aggregate(new, [2, 5], 3))[L]
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("strategy", ["rankwise", "hetlora-sw", "flexlora-delta"])
def test_new_aggregations_run_end_to_end(strategy, tiny_bert, agnews, tmp_path):
    raw = {"model": str(tiny_bert), "data.path": str(agnews), "strategy": strategy,
           "results-dir": str(tmp_path), "num-server-rounds": 2, "train.local-steps": 2,
           "train.batch-size": 8, "eval.max-examples": 32, "data.partitioner": "iid"}
    assert strategy in AGGREGATORS or strategy in DELTA_AGGREGATORS
    grid = InProcessGrid(raw, num_nodes=4)
    run_dir = federate(grid, prepare_run(RunConfig.from_run_config(raw), run_id=3))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert sorted(c["rank"] for c in rows[1]["clients"]) == [2, 4, 8, 16]
    assert all(0 <= r["accuracy"] <= 1 for r in rows) and rows[2]["aggregation_error"] >= 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
