"""S6 in a federation: robust aggregation on products and contributions wired into the LoRA
strategy, recorded per round in metrics.jsonl (in-process Flower grid, tiny model)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.common import run_inprocess
from strategies.lora.server import prepare_run
from strategies.robust.contribution import spearman
from strategies.robust.influence import ProductSpace
from strategies.robust.math import stack, update_of, unstack
from edge_lam.config.run_config import RunConfig
from edge_lam.data.text import Examples
from edge_lam.config.options import ConfigError


def _raw(tiny_bert, agnews_short, tmp_path, **extra) -> dict:
    return {"model": str(tiny_bert), "data.path": str(agnews_short(20)), "strategy": "hetlora",
            "results-dir": str(tmp_path / "r"), "num-server-rounds": 2,
            "train.local-steps": 2, "train.batch-size": 4, "eval.max-examples": 0,
            "data.partitioner": "iid", "train.lr": 5e-3, **extra}


def _federation(raw: dict, devices: int = 5) -> list[dict]:
    return run_inprocess(raw, devices, run_id=7)[0]


def test_krum_keeps_one_device_and_logs_every_refusal(tiny_bert, agnews_short, tmp_path):
    rows = _federation(_raw(tiny_bert, agnews_short, tmp_path, **{"robust.aggregator": "krum"}))
    for row in rows[1:]:
        entry = row["robust"]
        nodes = {c["node_id"] for c in row["clients"]}
        assert entry["aggregator"] == "krum" and entry["refused"] == len(nodes) - 1 == 4
        assert {int(n) for n in entry["weights"]} == nodes
        assert sorted(entry["weights"].values())[-1] == pytest.approx(1.0)
        assert len(entry["refusals"]) == 4 and all(r["refused"] for r in entry["refusals"])
        assert all("krum: score" in r["reason"] for r in entry["refusals"])
        assert 0.0 <= entry["svd_error"] < 1e-5  # one device's rank <= r_max: exact
        assert np.isfinite(row["accuracy"])


def test_median_on_products_moves_the_model_and_weights_every_device(tiny_bert, agnews_short,
                                                                    tmp_path):
    rows = _federation(_raw(tiny_bert, agnews_short, tmp_path, **{"robust.aggregator": "median"}))
    entry = rows[-1]["robust"]
    assert entry["refused"] == 0 and sum(entry["weights"].values()) == pytest.approx(1.0)
    assert rows[-1]["loss"] != rows[0]["loss"]
    # one device of five scales its update x 1000: the mean follows it, the median does not
    scaled = {"attack.kind": "scale", "attack.factor": 1000.0, "attack.fraction": 0.2}
    median = _federation(_raw(tiny_bert, agnews_short, tmp_path / "m", **scaled,
                              **{"robust.aggregator": "median"}))
    mean = _federation(_raw(tiny_bert, agnews_short, tmp_path / "a", **scaled))
    clean = rows[-1]["loss"]
    assert abs(median[-1]["loss"] - clean) < 0.2 * abs(mean[-1]["loss"] - clean)


def test_contribution_estimate_ranks_devices_like_true_leave_one_out(tiny_bert, agnews_short,
                                                                     tmp_path):
    """Every round (round 2 after the simulated devices trained other ranks' adapters on the
    process's shared model), the estimate ranks the devices as exact leave-one-out does."""
    raw = _raw(tiny_bert, agnews_short, tmp_path, **{
        "robust.contribution": "report", "robust.exact-loo": True,
        "robust.contribution-examples": 24, "num-server-rounds": 2,
        "train.local-steps": 4, "data.partitioner": "pathological"})
    for row in _federation(raw, devices=6)[1:]:
        c = row["contribution"]
        estimate = np.array([c["estimate"][k] for k in sorted(c["estimate"])])
        exact = np.array([c["exact"][k] for k in sorted(c["exact"])])
        assert len(estimate) == 6 and c["validation_examples"] == 24
        assert c["spearman"] == pytest.approx(spearman(estimate, exact))
        assert c["spearman"] >= 0.8, (estimate, exact)
        assert c["estimate_s"] > 0 and c["exact_s"] > 0  # costs reported (benchmark compares)


def test_drop_harmful_gives_harmful_devices_no_weight(tiny_bert, agnews_short, tmp_path):
    raw = _raw(tiny_bert, agnews_short, tmp_path, **{
        "robust.contribution": "drop-harmful", "num-server-rounds": 1,
        "data.partitioner": "pathological"})
    row = _federation(raw)[-1]
    weights = row["robust"]["contribution_weights"]
    estimate = row["contribution"]["estimate"]
    assert sum(weights.values()) == pytest.approx(1.0)
    for node, w in weights.items():
        assert (w == 0.0) == (estimate[node] <= 0.0)


def test_robust_aggregation_refuses_strategies_that_aggregate_otherwise(tiny_bert, agnews_short,
                                                                        tmp_path):
    for extra in ({"strategy": "flora"}, {"fleet.selection": "fedlaavg"}):
        raw = _raw(tiny_bert, agnews_short, tmp_path, **{"robust.aggregator": "median", **extra})
        with pytest.raises(ConfigError, match="robust.aggregator='median'"):
            _federation(raw)


def test_the_product_space_gradient_is_the_loss_slope(tiny_bert, agnews_short, tmp_path):
    """dL/dP by backprop through the frozen weight (x s) agrees with a finite difference."""
    raw = _raw(tiny_bert, agnews_short, tmp_path)
    cfg = RunConfig.from_run_config(raw)
    plan = prepare_run(cfg, run_id=3)
    state = plan.initial
    rng = np.random.default_rng(0)
    trained = {k: v + 0.05 * rng.standard_normal(v.shape).astype(v.dtype)
               for k, v in state.items()}
    matrix, keys, shapes = stack([update_of(state, trained)])
    valid = plan.server_model.test.subset(range(6))
    assert isinstance(valid, Examples)
    space = ProductSpace(cfg, plan.server_model.label_names, valid)
    g, fisher, losses, _ = space.gradients(state, unstack(matrix[0], keys, shapes), keys)
    assert fisher.shape == g.shape and np.all(fisher >= g * g - 1e-12)  # E[x^2] >= E[x]^2
    assert losses.mean() == pytest.approx(space.loss(state, unstack(matrix[0], keys, shapes)),
                                          rel=1e-5)
    direction = rng.standard_normal(g.shape)
    direction /= np.linalg.norm(direction)
    eps = 1e-2
    up = space.loss(state, unstack(matrix[0] + eps * direction, keys, shapes))
    down = space.loss(state, unstack(matrix[0] - eps * direction, keys, shapes))
    assert (up - down) / (2 * eps) == pytest.approx(g @ direction, rel=0.05, abs=1e-5)


def test_fltrust_trains_a_root_update_and_weights_by_cosine_trust(tiny_bert, agnews_short,
                                                                  tmp_path):
    # one sign-flipping device (its update negated): FLTrust must refuse it in some round
    # (on a tiny model after 2 steps an honest update's cosine to the root update is noisy
    # too, so which round is not fixed); every refusal is a cosine <= 0, with weight 0
    import re

    from edge_lam.config.run_config import RunConfig
    from strategies.robust.inject import attackers

    extra = {"robust.aggregator": "fltrust", "robust.root-examples": 16,
             "attack.kind": "sign-flip", "attack.fraction": 0.2}
    rows = _federation(_raw(tiny_bert, agnews_short, tmp_path, **extra))
    bad = attackers(RunConfig.from_run_config(_raw(tiny_bert, agnews_short, tmp_path,
                                                   **extra)), 5)
    assert len(bad) == 1
    attacker_refused = 0
    for row in rows[1:]:
        entry = row["robust"]
        weights = entry["weights"]
        assert sum(weights.values()) == pytest.approx(1.0) or entry["refused"] == 5
        refused = {str(r["node_id"]) for r in entry["refusals"] if r["refused"]}
        assert refused == {n for n, w in weights.items() if w == 0.0}
        for r in entry["refusals"]:
            cosine = float(re.search(r"cosine to root update (\S+) <= 0", r["reason"])[1])
            assert cosine <= 0
        attacker = {str(c["node_id"]) for c in row["clients"] if c["partition_id"] in bad}
        attacker_refused += attacker <= refused
    assert attacker_refused >= 1  # not vacuous: the attacker was refused


def test_too_few_replies_for_krum_keep_the_model_and_say_why(tiny_bert, agnews_short,
                                                               tmp_path):
    rows = _federation(_raw(tiny_bert, agnews_short, tmp_path, **{
        "robust.aggregator": "krum", "robust.f": 2, "num-server-rounds": 1}))
    assert "needs K >= 2f + 3" in rows[1]["robust"]["skipped"]
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"])  # the model did not move


def test_every_contribution_drop_is_counted_and_logged_with_its_node(tiny_bert, agnews_short,
                                                                     tmp_path):
    raw = _raw(tiny_bert, agnews_short, tmp_path, **{
        "robust.contribution": "drop-harmful", "num-server-rounds": 1,
        "data.partitioner": "pathological"})
    entry = _federation(raw)[-1]["robust"]
    dropped = {str(r["node_id"]) for r in entry["refusals"] if r["refused"]}
    assert dropped == {n for n, w in entry["contribution_weights"].items() if w == 0.0}
    assert entry["dropped"] == len(dropped) >= 1


def test_batched_per_example_gradients_equal_one_backward_per_example(tiny_bert, agnews_short,
                                                                      tmp_path, monkeypatch):
    """The Linear hooks' per-example gradients (batches of 8) give the same mean gradient
    and diagonal Fisher as one backward per example."""
    raw = _raw(tiny_bert, agnews_short, tmp_path)
    cfg = RunConfig.from_run_config(raw)
    plan = prepare_run(cfg, run_id=4)
    state = plan.initial
    rng = np.random.default_rng(1)
    trained = {k: v + 0.05 * rng.standard_normal(v.shape).astype(v.dtype)
               for k, v in state.items()}
    update = update_of(state, trained)
    server_model = plan.server_model
    space = ProductSpace(cfg, server_model.label_names, server_model.test.subset(range(11)))
    directions = rng.standard_normal((3, sum(v.size for v in update.values())))
    g, fisher, losses, form = space.gradients(state, update, list(update), directions)
    monkeypatch.setattr(ProductSpace, "_linear_of", lambda self, params: None)
    g1, fisher1, losses1, form1 = space.gradients(state, update, list(update), directions)
    np.testing.assert_allclose(form, form1, rtol=1e-4)
    # the empirical Fisher's quadratic form dominates (g . d)^2 (Cauchy-Schwarz over examples)
    assert np.all(form >= (directions @ g) ** 2 * (1 - 1e-9))
    np.testing.assert_allclose(losses, losses1, rtol=1e-5)
    np.testing.assert_allclose(g, g1, rtol=1e-4, atol=1e-7 * np.abs(g1).max())
    np.testing.assert_allclose(fisher, fisher1, rtol=1e-4, atol=1e-7 * fisher1.max())


@pytest.mark.parametrize("kind", ["alie", "min-max"])
def test_attacks_on_the_defences_send_one_crafted_update_from_every_colluder(
        kind, tiny_bert, agnews_short, tmp_path):
    """alie / min-max in a federation: the two colluders (of five) send the same product
    update, crafted from their shards' estimates; the honest ones train as usual."""
    from inprocess_grid import InProcessGrid
    from strategies.lora.server import federate
    from strategies.robust import inject
    from edge_lam.records import from_record

    raw = _raw(tiny_bert, agnews_short, tmp_path, **{
        "attack.kind": kind, "attack.fraction": 0.4, "num-server-rounds": 1,
        "strategy": "fedavg"})
    grid = InProcessGrid(raw, num_nodes=5)
    federate(grid, prepare_run(RunConfig.from_run_config(raw), 21))
    cfg = RunConfig.from_run_config(raw)
    bad = inject.attackers(cfg, 5)
    sent = {m.metadata.dst_node_id: from_record(m.content["arrays"])
            for _, m in grid.sent if m.metadata.message_type == "train"}
    ups = {}
    for reply in grid.replies:
        if reply.metadata.message_type == "train":
            node = reply.metadata.src_node_id
            ups[grid.contexts[node].node_config["partition-id"]] = update_of(
                sent[node], from_record(reply.content["arrays"]))
    assert len(bad) == 2 and len(ups) == 5
    a, b = (ups[p] for p in bad)
    honest = [ups[p] for p in range(5) if p not in bad]
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5)  # one crafted update
        assert not np.allclose(a[key], honest[0][key], atol=1e-6)
