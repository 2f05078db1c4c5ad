"""The heterogeneous-rank aggregations added for the LLM gap (rank-wise renormalised,
HetLoRA's sparsity weighting) and FlexLoRA's low-rank SVD, against hand computations, and
each new strategy end to end through the Flower strategy with a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inprocess_grid import InProcessGrid
from strategies.lora.math import (AGGREGATORS, DELTA_AGGREGATORS, delta_aggregate, example_weights,
                                  factorize,
                                  fedex_aggregate, flexlora_aggregate, flora_aggregate,
                                  hetlora_aggregate, lowrank_svd,
                                  norm_weighted_aggregate, rankwise_aggregate,
                                  weighted_products)
from edge_lam.training.lora import BASE_DELTA, lora_products, trainable_part, truncate_lora
from strategies.lora.server import federate, prepare_run
from edge_lam.config.run_config import RunConfig

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
    for rank in (2, 3, 16):  # R = 14 <= 8 x rank: the exact paths
        b, a = lowrank_svd(bs, as_, w, rank)
        b_ref, a_ref = factorize(dense, rank)
        assert b.shape == (d_out, rank) and a.shape == (rank, d_in)
        np.testing.assert_allclose(b @ a, b_ref @ a_ref, atol=1e-9)
        # the factors are balanced (B^T B = A A^T = S_r), as factorize's
        np.testing.assert_allclose(b.T @ b, a @ a.T, atol=1e-9)


def test_many_devices_take_the_randomized_svd_and_match_the_exact_one():
    """100 devices at ranks 2-16 (R = 750 > 8 x 16): the randomized range finder. Trained
    updates share directions, so the sum's spectrum decays past the rank: as here, where the
    devices' factors share 10 directions of falling weight, plus noise."""
    rng = np.random.default_rng(8)
    d_out, d_in, shared = 300, 200, 10
    basis_out = np.linalg.qr(rng.normal(size=(d_out, shared)))[0] * 0.7 ** np.arange(shared)
    basis_in = np.linalg.qr(rng.normal(size=(d_in, shared)))[0].T
    ranks = [(2, 4, 8, 16)[k % 4] for k in range(100)]
    bs = [basis_out @ rng.normal(size=(shared, r)) + 1e-3 * rng.normal(size=(d_out, r))
          for r in ranks]
    as_ = [rng.normal(size=(r, shared)) @ basis_in + 1e-3 * rng.normal(size=(r, d_in))
           for r in ranks]
    w = example_weights(range(1, 101))
    dense = sum(wk * b @ a for wk, b, a in zip(w, bs, as_))
    for rank in (4, 16):
        b, a = lowrank_svd(bs, as_, w, rank)
        b_ref, a_ref = factorize(dense, rank)
        best = np.linalg.norm(dense - b_ref @ a_ref)
        # as close to the sum as the best rank-r factors, to 0.1% of their error
        assert np.linalg.norm(dense - b @ a) <= best * 1.001
        np.testing.assert_allclose(b.T @ b, a @ a.T, atol=1e-9)  # balanced, as factorize's


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


def _effective(state):
    """base_delta + B A: the weight update a state stands for."""
    return lora_products(state)[L] + state.get(L + BASE_DELTA, 0.0)


def test_truncation_moves_the_dropped_components_into_the_base_delta():
    rng = np.random.default_rng(5)
    state = _state(rng.normal(size=(6, 4)), rng.normal(size=(4, 5)))
    state[L + BASE_DELTA] = rng.normal(size=(6, 5)).astype(np.float32)
    for rank in (1, 2, 4):
        view = truncate_lora(state, rank)
        assert view[f"{L}.lora_A.weight"].shape == (rank, 5)
        np.testing.assert_allclose(_effective(view), _effective(state), atol=1e-5)
    assert L + BASE_DELTA not in trainable_part(state)


def test_fedex_makes_every_devices_model_the_exact_weighted_mean():
    rng = np.random.default_rng(6)
    previous = _state(rng.normal(size=(6, 4)), rng.normal(size=(4, 5)), head=[1.0])
    previous[L + BASE_DELTA] = rng.normal(size=(6, 5)).astype(np.float32)
    ranks, counts = [1, 2, 4], [1, 2, 5]
    sent = [truncate_lora(previous, r) for r in ranks]
    new = [{k: v + 0.3 * rng.normal(size=v.shape).astype(np.float32)
            for k, v in trainable_part(s).items()} for s in sent]
    out = fedex_aggregate(previous, sent, new, counts, r_max=4)
    w = np.array(counts) / sum(counts)
    # each device's model after training: its base delta (incl. its dropped tail) + B' A'
    target = sum(wk * (s[L + BASE_DELTA] + lora_products(n)[L])
                 for wk, s, n in zip(w, sent, new))
    np.testing.assert_allclose(_effective(out), target, atol=1e-4)
    for r in ranks:  # and every device receives exactly that model next round
        np.testing.assert_allclose(_effective(truncate_lora(out, r)), target, atol=1e-4)
    # the factors are hetlora's zero-pad mean of the returned ones
    het = hetlora_aggregate(new, counts, 4)
    np.testing.assert_allclose(out[f"{L}.lora_A.weight"], het[f"{L}.lora_A.weight"])
    np.testing.assert_allclose(out["head.weight"], [sum(wk * n["head.weight"][0]
                                                        for wk, n in zip(w, new))], rtol=1e-6)


def test_flora_stacks_the_products_into_the_base_and_restarts_the_adapters():
    rng = np.random.default_rng(7)
    a0 = rng.normal(size=(4, 5)).astype(np.float32)
    previous = _state(np.zeros((6, 4)), a0)
    previous[L + BASE_DELTA] = np.ones((6, 5), np.float32)
    sent = [truncate_lora(previous, r) for r in (2, 4)]
    new = [{k: v + rng.normal(size=v.shape).astype(np.float32)
            for k, v in trainable_part(s).items()} for s in sent]
    out = flora_aggregate(previous, sent, new, [3, 1], r_max=4)
    stacked = 0.75 * lora_products(new[0])[L] + 0.25 * lora_products(new[1])[L]
    np.testing.assert_allclose(out[L + BASE_DELTA], 1.0 + stacked, atol=1e-5)
    np.testing.assert_array_equal(out[f"{L}.lora_B.weight"], 0.0)  # fresh adapter: B = 0,
    np.testing.assert_array_equal(out[f"{L}.lora_A.weight"], a0)  # A as initialised


def test_rank_matched_lr_is_standalone_lora_at_the_devices_own_scaling():
    """Adam on (B', A') = c (B, A) at lr c eta under scaling s is Adam on (B, A) at lr eta
    under scaling s c^2: with c = sqrt(r_max / r_k), alpha / r_max becomes alpha / r_k."""
    import torch
    from edge_lam.training.device import lora_lr_scale

    cfg = RunConfig.from_run_config({"lora.rank-matched-lr": True})
    assert lora_lr_scale(cfg, 2, 16) == pytest.approx(8 ** 0.5)
    assert lora_lr_scale(cfg, 16, 16) == 1.0
    assert lora_lr_scale(RunConfig.from_run_config({"lora.rank-matched-lr": False}), 2, 16) == 1.0
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randn(32, 5)
    b0, a0 = torch.randn(5, 2) * 0.1, torch.randn(2, 6) * 0.1
    alpha, r_max, r_k, eta = 16.0, 16, 2, 1e-2
    c = lora_lr_scale(cfg, r_k, r_max)

    def train(scaling, lr, scale):
        b, a = (scale * b0).requires_grad_(), (scale * a0).requires_grad_()
        opt = torch.optim.AdamW([b, a], lr=lr, weight_decay=0.0)
        for _ in range(20):
            opt.zero_grad()
            ((x @ (scaling * b @ a).T - y) ** 2).mean().backward()
            opt.step()
        return (scaling * b @ a).detach()

    standalone = train(alpha / r_k, eta, 1.0)  # LoRA at its own rank's scaling
    matched = train(alpha / r_max, c * eta, c)  # the device: scaling alpha / r_max, lr c eta
    torch.testing.assert_close(matched, standalone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(train(alpha / r_max, eta, c), standalone, atol=1e-3)


def test_a_base_delta_sets_the_frozen_weight_and_is_undone(tiny_bert):
    import torch
    from edge_lam.models.lora_model import get_lora_model, get_trainable_state, set_trainable_state

    cfg = RunConfig.from_run_config({"model": str(tiny_bert), "strategy": "fedex"})
    model = get_lora_model(cfg, ("a", "b"), 4)
    state = get_trainable_state(model)
    prefix = sorted(k for k in state if k.endswith(".lora_A.weight"))[0][: -len(".lora_A.weight")]
    layer = model.get_submodule(prefix)
    w0 = layer.get_base_layer().weight.detach().clone()
    delta = np.full(tuple(w0.shape), 0.5, np.float32)
    set_trainable_state(model, {**state, prefix + BASE_DELTA: delta})
    scaling = layer.scaling[model.active_adapter]
    torch.testing.assert_close(layer.get_base_layer().weight, w0 + scaling * 0.5)
    assert set(get_trainable_state(model)) == set(state)  # never sent back
    set_trainable_state(model, state)  # a state without deltas: W0 again, exactly
    assert torch.equal(layer.get_base_layer().weight, w0)
    with pytest.raises(ValueError, match="base delta"):
        set_trainable_state(model, {**state, prefix + BASE_DELTA: delta[:1]})


@pytest.mark.parametrize("strategy", ["rankwise", "hetlora-sw", "flexlora-delta", "flora",
                                      "fedex", "fedex+rank-matched-lr"])
def test_new_aggregations_run_end_to_end(strategy, tiny_bert, agnews, tmp_path):
    strategy, _, option = strategy.partition("+")
    data = tmp_path / "data"  # AG News with a 40-text test split the server evaluates whole
    data.mkdir()
    (data / "train.tsv").symlink_to(agnews / "train.tsv")
    lines = (agnews / "test.tsv").read_text().splitlines()
    (data / "test.tsv").write_text("\n".join(lines[:41]) + "\n")
    raw = {"model": str(tiny_bert), "data.path": str(data), "strategy": strategy,
           "results-dir": str(tmp_path), "num-server-rounds": 2, "train.local-steps": 2,
           "train.batch-size": 8, "eval.max-examples": 0, "data.partitioner": "iid"}
    if option:
        raw[f"lora.{option}"] = True
    assert strategy in AGGREGATORS or strategy in DELTA_AGGREGATORS
    grid = InProcessGrid(raw, num_nodes=4)
    run_dir = federate(grid, prepare_run(RunConfig.from_run_config(raw), run_id=3))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert sorted(c["rank"] for c in rows[1]["clients"]) == [2, 4, 8, 16]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    if strategy in ("flora", "fedex"):  # exact by construction: no approximation error
        assert rows[2]["aggregation_error"] is None
        # the merged update is saved beside the adapter and comes back with it
        from edge_lam.cli.main import evaluate_adapter, load_adapter
        _, _, state = load_adapter(adapter)
        assert any(k.endswith(BASE_DELTA) for k in state)
        assert np.abs(np.concatenate([v.ravel() for k, v in state.items()
                                      if k.endswith(BASE_DELTA)])).max() > 0
        # the downlink carries the dense merged weights on top of the adapter sent back
        from edge_lam.records import record_nbytes, to_record
        dense = record_nbytes(to_record({k: v for k, v in state.items()
                                         if k.endswith(BASE_DELTA)}))
        for client in rows[2]["clients"]:
            assert client["bytes_down"] == client["bytes_up"] + dense
        # the saved adapter + base delta is the model the server evaluated
        merged = evaluate_adapter(adapter, data / "test.tsv")
        assert merged["loss"] == pytest.approx(rows[2]["loss"], abs=1e-6)
        if strategy == "flora":  # the adapter restarts each round: B = 0, all is merged
            assert all(not v.any() for k, v in state.items() if k.endswith("lora_B.weight"))
    else:  # mixed ranks: these approximate the mean product (S1's error is measured > 0)
        assert all(r["aggregation_error"] > 0 for r in rows[1:])
        # the saved adapter is the rule applied to round 2's replies, recomputed here from
        # the messages themselves
        from edge_lam.records import from_record
        from edge_lam.training.evaluation import load_adapter
        from strategies.lora.math import aggregate

        sent = {m.metadata.dst_node_id: from_record(m.content["arrays"])
                for rnd, m in grid.sent if rnd == 2 and m.metadata.message_type == "train"}
        replies = [m for m in grid.replies if m.metadata.message_type == "train"][-4:]
        nodes = [m.metadata.src_node_id for m in replies]
        states = [from_record(m.content["arrays"]) for m in replies]
        counts = [int(m.content["metrics"]["num-examples"]) for m in replies]
        start = max(sent.values(), key=lambda st: st[next(k for k in st if k.endswith(
            "lora_A.weight"))].shape[0])  # the rank-16 device got the whole global state
        want = aggregate(strategy, start, [sent[n] for n in nodes], states, counts, 16)
        _, _, saved = load_adapter(adapter)
        assert sorted(saved) == sorted(want)
        for key in want:
            np.testing.assert_allclose(saved[key], want[key], rtol=1e-5, atol=1e-6)
    # the model moved, and each round's global state is what the next round sent: a rank-16
    # device got the whole adapter, a rank-2 device its first 2 components
    assert rows[2]["loss"] != rows[0]["loss"]
    by_rank = {c["rank"]: c for c in rows[2]["clients"]}
    assert by_rank[2]["bytes_up"] < by_rank[4]["bytes_up"] < by_rank[8]["bytes_up"] \
        < by_rank[16]["bytes_up"]
