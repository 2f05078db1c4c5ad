"""The mixed-rank options of issue 27, each against a hand-computed case: the rsLoRA
scaling rule, server optimisers on the aggregate (Flower's FedAvgM / FedAdam equations),
rank warm-up, and the low-rank downlink of fedex/flora's base delta; then all of them
through the strategy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.training.device import lora_lr_scale
from edge_lam.training.lora import (BASE_DELTA, compress_base_deltas, expand_base_deltas,
                                    state_nbytes)
from strategies.lora.resume import Restored
from strategies.lora.server_opt import ServerOptimizer

W = "layer.lora_A.weight"


def _cfg(**raw) -> RunConfig:
    return RunConfig.from_run_config(raw)


# ------------------------------------------------------------------ scaling rules
def test_rslora_scales_by_the_square_root_and_matches_its_own_standalone_rank():
    plain, rs = _cfg(strategy="hetlora"), _cfg(strategy="hetlora",
                                               **{"lora.scaling-rule": "rslora"})
    assert plain.r_max == rs.r_max == 16
    assert plain.lora_scaling == pytest.approx(16 / 16)
    assert rs.lora_scaling == pytest.approx(16 / 4)  # alpha / sqrt(16)
    # lr x c with c^2 x shared scaling = the rank's standalone scaling
    assert lora_lr_scale(plain, 2, 16) == pytest.approx(math.sqrt(8))
    assert lora_lr_scale(rs, 2, 16) == pytest.approx(8 ** 0.25)
    assert lora_lr_scale(rs, 2, 16) ** 2 * rs.lora_scaling == pytest.approx(16 / math.sqrt(2))
    assert lora_lr_scale(rs, 16, 16) == 1.0
    # alpha proportional to r: one scaling for every rank, no matching
    off = _cfg(strategy="hetlora", **{"lora.rank-matched-lr": False})
    assert lora_lr_scale(off, 2, 16) == 1.0
    with pytest.raises(ConfigError, match="lora.scaling-rule"):
        _cfg(**{"lora.scaling-rule": "sqrt"})


# ------------------------------------------------------------------ server optimisers
def _state(value: float) -> dict:
    return {W: np.full((2, 3), value, np.float32),
            "layer" + BASE_DELTA: np.full((4, 3), value, np.float32)}


def test_fedavgm_steps_along_the_momentum_of_the_pseudo_gradients():
    opt = ServerOptimizer(_cfg(**{"lora.server-optimizer": "fedavgm", "lora.server-lr": 1.0,
                                  "lora.server-momentum": 0.5}))
    # round 1: g = 1.0 - 0.6 = 0.4, v = g, x = 1.0 - 0.4 = 0.6
    x = opt.step(1, _state(1.0), _state(0.6))
    np.testing.assert_allclose(x[W], 0.6, rtol=1e-6)
    # round 2: g = 0.6 - 0.5 = 0.1, v = 0.5 x 0.4 + 0.1 = 0.3, x = 0.6 - 0.3 = 0.3
    x = opt.step(2, x, _state(0.5))
    np.testing.assert_allclose(x[W], 0.3, rtol=1e-6)
    # the base delta passes through as aggregated
    np.testing.assert_array_equal(x["layer" + BASE_DELTA], 0.5)


def test_fedadam_takes_flowers_bias_corrected_step():
    opt = ServerOptimizer(_cfg(**{"lora.server-optimizer": "fedadam", "lora.server-lr": 0.1,
                                  "lora.server-tau": 1e-6}))
    x = opt.step(1, _state(0.0), _state(0.2))
    # d = 0.2; m = 0.1 x 0.2 = 0.02; v = 0.01 x 0.04 = 4e-4; lr_t = 0.1 sqrt(1 - 0.99^2) /
    # (1 - 0.9^2) = 0.074248...; x = lr_t x 0.02 / (0.02 + 1e-6)
    lr_t = 0.1 * math.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)
    np.testing.assert_allclose(x[W], lr_t * 0.02 / (0.02 + 1e-6), rtol=1e-6)
    assert x[W].dtype == np.float32
    # round 2 from there, to 0.0: d = -x1; m, v accumulate
    x1 = float(x[W][0, 0])
    x2 = opt.step(2, x, _state(0.0))
    m = 0.9 * 0.02 + 0.1 * (-x1)
    v = 0.99 * 4e-4 + 0.01 * x1 ** 2
    lr_t = 0.1 * math.sqrt(1 - 0.99 ** 3) / (1 - 0.9 ** 3)
    np.testing.assert_allclose(x2[W], x1 + lr_t * m / (math.sqrt(v) + 1e-6), rtol=1e-5)


def test_none_is_the_aggregate_and_the_moments_survive_a_resume():
    agg = _state(0.3)
    assert ServerOptimizer(_cfg()).step(1, _state(0.0), agg) is agg
    cfg = _cfg(**{"lora.server-optimizer": "fedadam"})
    opt = ServerOptimizer(cfg)
    opt.step(1, _state(0.0), _state(0.2))
    meta, arrays = opt.checkpoint_state(str)
    assert meta == {"kind": "fedadam"} and sorted(arrays) == [f"server_opt/m/{W}",
                                                               f"server_opt/v/{W}"]
    again = ServerOptimizer(cfg)
    again.restore(meta, Restored({}, {}, arrays))
    a = opt.step(2, _state(0.1), _state(0.4))
    b = again.step(2, _state(0.1), _state(0.4))
    np.testing.assert_array_equal(a[W], b[W])


# ------------------------------------------------------------------ low-rank downlink
def test_base_delta_travels_as_its_best_rank_k_factors():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(40, 3)))
    v, _ = np.linalg.qr(rng.normal(size=(30, 3)))
    delta = (u * [5.0, 2.0, 0.5]) @ v.T  # singular values 5, 2, 0.5
    state = {"q" + BASE_DELTA: delta.astype(np.float32), W: np.ones((2, 30), np.float32)}
    exact = compress_base_deltas(state, 3)
    assert sorted(exact) == sorted([W, "q.base_delta.u", "q.base_delta.v"])
    assert exact["q.base_delta.u"].shape == (40, 3) and exact["q.base_delta.v"].shape == (3, 30)
    np.testing.assert_allclose(expand_base_deltas(exact)["q" + BASE_DELTA], delta, atol=1e-5)
    assert state_nbytes(exact) < state_nbytes(state)
    # rank 1 keeps the largest direction: the error is the dropped singular values
    one = expand_base_deltas(compress_base_deltas(state, 1))["q" + BASE_DELTA]
    assert np.linalg.norm(one - delta) == pytest.approx(math.hypot(2.0, 0.5), rel=1e-4)
    # rank 0, or one that would cost more than the dense matrix: sent dense
    assert compress_base_deltas(state, 0) == state
    assert "q" + BASE_DELTA in compress_base_deltas(state, 20)
    with pytest.raises(ValueError, match="without q.base_delta.v"):
        expand_base_deltas({"q.base_delta.u": exact["q.base_delta.u"]})


def test_base_delta_rank_needs_a_strategy_that_sends_one():
    assert _cfg(strategy="fedex", **{"lora.base-delta-rank": 8}).lora.base_delta_rank == 8
    with pytest.raises(ConfigError, match="strategy='hetlora' sends none"):
        _cfg(strategy="hetlora", **{"lora.base-delta-rank": 8})


# ------------------------------------------------------------------ through the strategy
def test_warmup_fedadam_and_low_rank_downlink_run_through_the_strategy(tiny_bert, agnews,
                                                                       tmp_path):
    from inprocess_grid import InProcessGrid
    from strategies.lora.server import federate, prepare_run

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").symlink_to(agnews / "train.tsv")
    lines = (agnews / "test.tsv").read_text().splitlines()
    (data / "test.tsv").write_text("\n".join(lines[:41]) + "\n")
    raw = {"model": str(tiny_bert), "data.path": str(data), "strategy": "fedex",
           "results-dir": str(tmp_path), "num-server-rounds": 3, "train.local-steps": 2,
           "train.batch-size": 8, "eval.max-examples": 0, "data.partitioner": "iid",
           "lora.rank-warmup-rounds": 1, "lora.server-optimizer": "fedadam",
           "lora.server-lr": 1e-3, "lora.base-delta-rank": 2}
    run_dir = federate(InProcessGrid(raw, num_nodes=4),
                       prepare_run(RunConfig.from_run_config(raw), run_id=5))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    # warm-up: round 1 at the smallest rank everywhere, then each device at its own
    assert sorted(c["rank"] for c in rows[1]["clients"]) == [2, 2, 2, 2]
    assert sorted(c["rank"] for c in rows[2]["clients"]) == [2, 4, 8, 16]
    # the base delta (zero in round 1, then fedex's residual) travels as rank-2 factors:
    # the downlink is the adapter plus 2 (d_out + d_in) numbers per layer, not d_out d_in
    from edge_lam.training.evaluation import load_adapter

    _, _, state = load_adapter(run_dir / "adapter")
    deltas = {k: v for k, v in state.items() if k.endswith(BASE_DELTA)}
    assert deltas and max(np.abs(v).max() for v in deltas.values()) > 0
    from edge_lam.records import record_nbytes, to_record

    factors = compress_base_deltas(deltas, 2)
    assert all(v.shape[0] == 2 or v.shape[1] == 2 for v in factors.values())
    dense = record_nbytes(to_record(deltas))
    low_rank = record_nbytes(to_record(factors))  # float32 data and each array's header
    assert low_rank < dense / 4
    for client in rows[3]["clients"]:
        assert client["bytes_down"] == client["bytes_up"] + low_rank
    assert all(math.isfinite(r["loss"]) for r in rows)
