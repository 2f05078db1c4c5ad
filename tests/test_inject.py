"""Faulty and Byzantine devices injected on the device side (strategies.robust.inject, issue 17
R2 / R4): deterministic fault draws at the configured rates, each attack's reply checked on
products B A by hand, backdoor poisoning of exactly the drawn examples, and in-process
federations (tiny BERT, InProcessGrid) where faults are rejected / missing in metrics.jsonl
and attackers' replies are what the attack says."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from inprocess_grid import InProcessGrid
from strategies.lora.math import factorize
from strategies.robust import inject
from strategies.robust.math import update_of
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.data.text import Examples
from edge_lam.training.lora import lora_products, truncate_lora
from edge_lam.records import from_record

L = "layer"
B_KEY, A_KEY = f"{L}.lora_B.weight", f"{L}.lora_A.weight"


def _state(product, rank, head):
    b, a = factorize(np.asarray(product, dtype=np.float64), rank)
    return {B_KEY: b.astype(np.float32), A_KEY: a.astype(np.float32),
            "head.weight": np.asarray(head, dtype=np.float32)}


def _sent(rank, d_out=2, d_in=3):
    """A fresh adapter (B = 0) of `rank` with a head: what round 1 sends."""
    rng = np.random.default_rng(rank)
    return {B_KEY: np.zeros((d_out, rank), np.float32),
            A_KEY: rng.standard_normal((rank, d_in)).astype(np.float32),
            "head.weight": np.array([0.5, -1.0], np.float32)}


TRAINED_PRODUCT = np.array([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])  # rank 2
TRAINED_HEAD = np.array([0.7, -1.5])


def _trained(rank=2):
    return _state(TRAINED_PRODUCT, rank, TRAINED_HEAD)


# ------------------------------------------------------------------------------ faults
def test_fault_draws_are_deterministic_exclusive_and_hit_the_rates():
    rates = {"crash": 0.1, "error": 0.1, "timeout": 0.1}
    draws = [inject.fault_draw(7, r, p, **rates) for r in range(1, 201) for p in range(50)]
    assert draws == [inject.fault_draw(7, r, p, **rates) for r in range(1, 201)
                     for p in range(50)]
    n = len(draws)
    for kind in inject.FAULTS:
        assert draws.count(kind) / n == pytest.approx(0.1, abs=0.012), kind
    assert draws.count(None) / n == pytest.approx(0.7, abs=0.015)
    # another seed, another pattern; no faults configured, none drawn; all crash, all crash
    assert draws != [inject.fault_draw(8, r, p, **rates) for r in range(1, 201)
                     for p in range(50)]
    assert {inject.fault_draw(7, r, 0, 0, 0, 0) for r in range(100)} == {None}
    assert {inject.fault_draw(7, r, 0, 1.0, 0, 0) for r in range(100)} == {"crash"}
    with pytest.raises(ConfigError, match="exclusive probabilities"):
        RunConfig.from_run_config({"faults.crash": 0.6, "faults.error": 0.5})


def _cfg(**faults):
    return RunConfig.from_run_config({f"faults.{k.replace('_', '-')}": v
                                      for k, v in faults.items()} | {"round-timeout": 30})


def _msg():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    return Message(RecordDict(), dst_node_id=1001, message_type="train")


def test_fault_reply_crashes_errors_and_sleeps_past_the_timeout(monkeypatch):
    slept = []
    monkeypatch.setattr(inject, "SLEEP", slept.append)
    with pytest.raises(inject.InjectedCrash, match="injected crash"):
        inject.fault_reply(_msg(), _cfg(crash=1.0), 3, 1)
    reply = inject.fault_reply(_msg(), _cfg(error=1.0), 3, 1)
    assert reply.has_error() and "injected error" in reply.error.reason
    assert inject.fault_reply(_msg(), _cfg(timeout=1.0), 3, 1) is None
    assert inject.fault_reply(_msg(), _cfg(timeout=1.0, delay_s=99.0), 3, 1) is None
    assert slept == [35.0, 99.0]  # round-timeout + 5 s by default
    assert inject.fault_reply(_msg(), _cfg(), 3, 1) is None and len(slept) == 2


# ------------------------------------------------------------------------------ attacks
def test_sign_flip_scale_and_gaussian_replies_on_products():
    sent, trained = _sent(2), _trained(2)
    delta = TRAINED_PRODUCT  # B = 0 was sent: the update is the trained product
    flip = inject.poisoned_reply("sign-flip", sent, trained)
    np.testing.assert_allclose(lora_products(flip)[L], -delta, atol=1e-5)
    np.testing.assert_allclose(flip["head.weight"], [0.5 - 0.2, -1.0 + 0.5], atol=1e-6)
    big = inject.poisoned_reply("scale", sent, trained, factor=10.0)
    np.testing.assert_allclose(lora_products(big)[L], 10 * delta, atol=1e-4)
    np.testing.assert_allclose(big["head.weight"], [0.5 + 2.0, -1.0 - 5.0], atol=1e-5)
    noise = inject.poisoned_reply("gaussian", sent, trained, sigma=0.5,
                                  rng=np.random.default_rng(0))
    expect = 0.5 * np.random.default_rng(0).standard_normal((2, 3))  # layer noise first
    np.testing.assert_allclose(lora_products(noise)[L], expect, atol=1e-5)  # rank 2: exact
    for out in (flip, big, noise):
        assert list(out) == list(trained)
        assert all(out[k].shape == trained[k].shape for k in out)


def test_colluders_of_different_ranks_send_identical_products():
    """Ranks 2 and 4 truncate to r_c = 2, train the same, and send -factor x that update:
    the server sees the same B A (and head) from both."""
    sent4 = _sent(4)
    sent2 = truncate_lora(sent4, 2)
    trained_c = _trained(2)
    replies = [inject.colluding_reply(s, truncate_lora(s, 2), trained_c, 3.0)
               for s in (sent2, sent4)]
    for s, r in zip((sent2, sent4), replies):
        u = update_of(s, r)
        np.testing.assert_allclose(u[L], -3.0 * TRAINED_PRODUCT, atol=1e-4)
        np.testing.assert_allclose(u["head.weight"], -3.0 * (TRAINED_HEAD - [0.5, -1.0]),
                                   atol=1e-5)
    assert replies[1][B_KEY].shape == (2, 4)
    cfg = RunConfig.from_run_config({})
    assert inject.collusion_rank(cfg, 16) == 2 and inject.collusion_rank(cfg, 1) == 1


def test_attackers_are_the_seeded_partitions():
    cfg = RunConfig.from_run_config({"attack.kind": "sign-flip", "attack.fraction": 0.2})
    bad = inject.attackers(cfg, 10)
    assert len(bad) == 2 and bad == inject.attackers(cfg, 10)
    assert len(inject.attackers(cfg, 5)) == 1  # at least one


def test_backdoor_poisons_exactly_the_drawn_examples():
    ex = Examples([f"text {i}" for i in range(40)], [i % 4 for i in range(40)], [],
                  ("a", "b", "c", "d"))
    idx = inject.poison_indices(len(ex), 0.25, seed=42, partition=3)
    assert len(idx) == 10 and len(set(idx.tolist())) == 10
    np.testing.assert_array_equal(idx, inject.poison_indices(40, 0.25, 42, 3))
    out = inject.poison(ex, idx, "cf", target=2)
    for i in range(40):
        if i in idx:
            assert out.texts[i] == f"cf text {i}" and out.labels[i] == 2
        else:
            assert out.texts[i] == ex.texts[i] and out.labels[i] == ex.labels[i]
    cfg = RunConfig.from_run_config({"attack.kind": "backdoor"})
    assert inject.target_label(cfg, ("World", "Sports")) == 0
    cfg = RunConfig.from_run_config({"attack.kind": "backdoor", "attack.target": "Sports"})
    assert inject.target_label(cfg, ("World", "Sports")) == 1
    with pytest.raises(ConfigError, match="attack.target='Sports' is not a label"):
        inject.target_label(cfg, ("a", "b"))
    test = inject.backdoor_test(ex, "cf", target=2)
    assert len(test) == 30 and 2 not in test.labels
    assert all(t.startswith("cf text ") for t in test.texts)


# ------------------------------------------------------------------ in-process federations
def _raw(tiny_bert, agnews, out, **extra):
    return {"model": str(tiny_bert), "data.path": str(agnews), "strategy": "hetlora",
            "results-dir": str(out), "train.local-steps": 1, "train.batch-size": 4,
            "eval.max-examples": 16, "data.partitioner": "iid", "min-devices": 1,
            "round-timeout": 60, **extra}


def _federate(raw, devices, run_id):
    from strategies.lora.server import federate, prepare_run

    grid = InProcessGrid(raw, num_nodes=devices)
    run_dir = federate(grid, prepare_run(RunConfig.from_run_config(raw), run_id=run_id))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return grid, rows, run_dir


def test_federation_with_faults_completes_and_records_every_refusal(tiny_bert, agnews,
                                                                    tmp_path):
    devices, rounds = 6, 3
    rates = {"crash": 0.3, "error": 0.1, "timeout": 0.1}
    raw = _raw(tiny_bert, agnews, tmp_path, **{"num-server-rounds": rounds, "seed": 47,
                                              **{f"faults.{k}": v for k, v in rates.items()}})
    grid, rows, run_dir = _federate(raw, devices, run_id=71)
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    assert (run_dir / "adapter").is_dir()
    seen, timeouts = set(), 0
    for row in rows[1:]:
        drawn = {1001 + p: inject.fault_draw(47, row["round"], p, **rates)
                 for p in range(devices)}
        seen |= set(drawn.values())
        timeouts += sum(k == "timeout" for k in drawn.values())
        reasons = {r["node_id"]: r["reason"] for r in row.get("rejections", [])}
        assert sorted(reasons) == sorted(n for n, k in drawn.items()
                                         if k in ("crash", "error"))
        for node, reason in reasons.items():
            word = "InjectedCrash" if drawn[node] == "crash" else "injected error"
            assert reason.startswith("device error:") and word in reason, reason
        assert row["rejected"] == len(reasons)
        assert row["missing"] == sorted(n for n, k in drawn.items() if k == "timeout")
        assert sorted(c["node_id"] for c in row["clients"]) == sorted(
            n for n, k in drawn.items() if k is None)
    assert {"crash", "error", "timeout", None} <= seen  # seed 47 draws every kind
    assert len(grid.late) == timeouts  # the late replies came, and were dropped


def _round1_products(grid):
    """{partition: (update products per layer, head)} of the round-1 TRAIN replies."""
    sent = {m.metadata.dst_node_id: from_record(m.content["arrays"]) for r, m in grid.sent
            if r == 1 and m.metadata.message_type == "train"}
    out = {}
    for reply in grid.replies:
        node = reply.metadata.src_node_id
        if node in sent and "arrays" in reply.content:
            out[node - 1001] = update_of(sent[node], from_record(reply.content["arrays"]))
    return out


def test_attackers_reply_as_the_attack_says_in_a_federation(tiny_bert, agnews, tmp_path):
    devices = 5
    base = {"num-server-rounds": 1, "attack.fraction": 0.4}
    clean, _, _ = _federate(_raw(tiny_bert, agnews, tmp_path / "clean", **base), devices, 72)
    flip, _, _ = _federate(_raw(tiny_bert, agnews, tmp_path / "flip", **base,
                                **{"attack.kind": "sign-flip"}), devices, 73)
    coll, _, _ = _federate(_raw(tiny_bert, agnews, tmp_path / "coll", **base,
                                **{"attack.kind": "collude", "attack.factor": 2.0}),
                           devices, 74)
    bad = inject.attackers(RunConfig.from_run_config({"attack.fraction": 0.4}), devices)
    assert len(bad) == 2
    honest, flipped, colluded = (_round1_products(g) for g in (clean, flip, coll))
    for p in range(devices):
        for key, u in honest[p].items():
            if p in bad:  # the honest update negated; colluders: identical replies
                np.testing.assert_allclose(flipped[p][key], -u, atol=1e-4, rtol=1e-3)
                np.testing.assert_allclose(colluded[p][key], colluded[bad[0]][key],
                                           atol=1e-5)
            else:  # honest devices untouched (same seed, same data, same start)
                np.testing.assert_allclose(flipped[p][key], u, atol=1e-6)
                np.testing.assert_allclose(colluded[p][key], u, atol=1e-6)
    # the colluders' shared update is -2 x a training step's, not any honest device's own
    key = next(iter(honest[0]))
    assert np.abs(colluded[bad[0]][key]).max() > 0
    assert not np.allclose(colluded[bad[0]][key], -2 * honest[bad[0]][key], atol=1e-6)
