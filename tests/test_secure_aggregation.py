"""Secure aggregation (SecAgg+ on Flower's pieces, `strategies.secure`), issue 28 item 1.

Three parts: the protocol's sums are exact, with devices dropping before and after masking
(dropout recovery); a dishonest server's messages are refused by the devices (the suite
below: duplicates, too few devices, a weak threshold, replays, both secrets of one device,
misrouted shares); and in a federation (in-process Flower grid, the real ClientApp) the
secure rounds give the same models as the plain ones while no adapter goes up in the clear.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.common import run_inprocess
from inprocess_grid import InProcessGrid
from strategies.lora.server import federate, prepare_run
from strategies.secure import device, encoding
from strategies.secure.device import MASKED
from strategies.secure.protocol import (Refused, as_int64, check_setup, neighbours, prg,
                                        threshold_for)
from strategies.secure.server import RoundFailed, SecureRound
from edge_lam.config.options import ConfigError
from edge_lam.config.run_config import RunConfig
from edge_lam.records import from_record


# ------------------------------------------------------------------ the protocol alone
class StageGrid:
    """Delivers QUERY `secagg` stages to `strategies.secure.device.handle` on each node's
    Context; `drop` = {(node, stage)} never answers; `tamper(node, config)` edits a
    message before the device reads it (a dishonest server)."""

    def __init__(self, ids, drop=(), tamper=None):
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.ctx = {i: Context(run_id=1, node_id=i, node_config={}, state=RecordDict(),
                               run_config={}) for i in ids}
        self.drop, self.tamper = set(drop), tamper
        self.errors: list[str] = []

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node, stage = msg.metadata.dst_node_id, msg.content["config"]["stage"]
            if (node, stage) in self.drop:
                continue
            if self.tamper:
                self.tamper(node, msg.content["config"])
            try:
                replies.append(device.handle(msg, self.ctx[node]))
            except Refused as err:
                self.errors.append(str(err))
        return replies


def _inputs(ids, size=5000, seed=0):
    rng = np.random.default_rng(seed)
    return {i: rng.integers(-2 ** 40, 2 ** 40, size) for i in ids}


def _round(grid, ids, xs, server_round=1, k=0, t=0.6, skip_mask=()):
    rnd = SecureRound(1, server_round, k, t, 10.0)
    u1 = rnd.begin(grid, ids)
    masked = {}
    for node in u1:
        if node in skip_mask:
            continue
        config = ConfigRecord({"server-round": server_round, **rnd.train_config(node)})
        masked[node] = device.mask_input(grid.ctx[node], config, xs[node].view(np.uint64))
    return rnd, masked


@pytest.mark.parametrize("k", [0, 4])
def test_the_sum_is_exact_with_devices_dropping_before_and_after_masking(k):
    ids = list(range(11, 21))  # 10 devices
    xs = _inputs(ids)
    # 13 never masks (gone before its input), 15 and 18 mask and leave before unmasking
    grid = StageGrid(ids, drop={(15, "unmask"), (18, "unmask")})
    rnd, masked = _round(grid, ids, xs, k=k, skip_mask={13})
    assert sorted(masked) == [i for i in ids if i != 13]
    for node, y in masked.items():  # one input alone is the mask, not the value
        assert not np.array_equal(as_int64(y), xs[node])
    total = rnd.finish(grid, masked)
    assert np.array_equal(as_int64(total), sum(xs[i] for i in ids if i != 13))
    info = rnd.info()
    assert info["dropped"] == [13] and 15 in info["survived"] and 18 in info["survived"]
    assert info["threshold"] == threshold_for(0.6, 10 if k == 0 else 5)


def test_too_many_dropouts_fail_the_round_instead_of_a_wrong_sum():
    ids = list(range(1, 8))  # threshold 0.6 of 7 -> 5
    grid = StageGrid(ids, drop={(2, "unmask"), (3, "unmask"), (4, "unmask")})
    rnd, masked = _round(grid, ids, _inputs(ids))
    with pytest.raises(RoundFailed, match="under the threshold 5"):
        rnd.finish(grid, masked)


def test_neighbourhoods_are_symmetric_rings_and_keys_are_fresh_each_round():
    ids = [5, 9, 2, 30, 14, 7]
    for k in (2, 4):
        for u in ids:
            assert len(neighbours(ids, u, k)) == k
            assert all(u in neighbours(ids, v, k) for v in neighbours(ids, u, k))
    assert neighbours(ids, 2, 0) == [5, 7, 9, 14, 30]
    grid = StageGrid(ids)
    xs = _inputs(ids)
    rnd1, m1 = _round(grid, ids, xs, server_round=1)
    rnd1.finish(grid, m1)
    rnd2, m2 = _round(grid, ids, xs, server_round=2)
    # the same input in two rounds: masks differ (new keys and seeds), the difference of
    # the two masked inputs is not the (zero) change of the input
    assert not np.array_equal(m1[5], m2[5])
    assert np.array_equal(as_int64(rnd2.finish(grid, m2)), sum(xs.values()))
    assert prg(b"k" * 32, 4).dtype == np.uint64 and len(set(prg(b"k" * 32, 1000))) == 1000


# ------------------------------------------------------------------ a dishonest server
@pytest.mark.parametrize("devices, k, t, reason", [
    ([1, 1, 2, 3], 0, 3, "names a device twice"),
    ([1, 2], 0, 2, "at least 3"),
    ([2, 3, 4], 0, 2, "does not include this device"),
    ([1, 2, 3, 4], 0, 2, "more than half"),  # 2 of 4: two disjoint halves
    ([1, 2, 3, 4, 5, 6], 2, 1, "more than half"),  # 1 of 3
])
def test_setup_refusals(devices, k, t, reason):
    with pytest.raises(Refused, match=reason):
        check_setup(devices, 1, k, t)


def test_a_server_asking_for_both_secrets_of_a_device_is_refused():
    ids = [1, 2, 3, 4, 5]
    grid = StageGrid(ids)

    def both(node, config):  # claim 3 survived AND dropped: b_3 and sk_3 would unmask it
        if config["stage"] == "unmask":
            config["dropped"] = [3]

    rnd, masked = _round(grid, ids, _inputs(ids))
    grid.tamper = both
    with pytest.raises(RoundFailed):
        rnd.finish(grid, masked)
    assert len(grid.errors) == 5 and all("both surviving and dropped" in e
                                         for e in grid.errors)


def test_a_second_unmask_and_a_replayed_round_are_refused():
    ids = [1, 2, 3, 4]
    grid = StageGrid(ids)
    rnd, masked = _round(grid, ids, _inputs(ids))
    rnd.finish(grid, masked)
    again = SecureRound(1, 1, 0, 0.6, 10.0)
    again.devices, again.t, again.s_keys = rnd.devices, rnd.t, rnd.s_keys
    with pytest.raises(RoundFailed):  # secrets wiped after the first unmask
        again.finish(grid, masked)
    assert all("not at the 'masked' stage" in e for e in grid.errors)
    grid.errors.clear()
    with pytest.raises(RoundFailed):  # a new setup of a round already masked
        SecureRound(1, 1, 0, 0.6, 10.0).begin(grid, ids)
    assert len(grid.errors) == 4 and all("already masked" in e for e in grid.errors)


def test_a_second_masked_input_for_a_round_is_refused():
    ids = [1, 2, 3]
    grid = StageGrid(ids)
    rnd = SecureRound(1, 1, 0, 2, 10.0)
    rnd.begin(grid, ids)
    config = ConfigRecord({"server-round": 1, **rnd.train_config(1)})
    device.mask_input(grid.ctx[1], config, np.zeros(8, np.uint64))
    with pytest.raises(Refused, match="not at the 'share' stage"):
        device.mask_input(grid.ctx[1], config, np.ones(8, np.uint64))


def test_misrouted_or_forged_shares_and_key_lists_are_refused():
    ids = [1, 2, 3, 4]
    grid = StageGrid(ids)
    rnd = SecureRound(1, 1, 0, 0.75, 10.0)
    rnd.begin(grid, ids)
    # the share 2 sent to 3, delivered to 4 as if from 2
    cfg4 = rnd.train_config(4)
    src = cfg4["secagg-src"].index(2)
    cfg4["secagg-ciphertext"][src] = dict(rnd.inbox[3])[2]
    with pytest.raises(Refused, match="does not decrypt"):
        device.mask_input(grid.ctx[4], ConfigRecord({"server-round": 1, **cfg4}),
                          np.zeros(4, np.uint64))
    # a key list with this device's keys replaced (a server in the middle)
    grid2 = StageGrid(ids, tamper=lambda node, c: c["stage"] == "share" and c.__setitem__(
        "pk-s", [b"\x01" * 32] + list(c["pk-s"])[1:]))
    assert SecureRound(1, 1, 0, 0.75, 10.0).begin(grid2, ids) == [2, 3, 4]  # 1 left
    assert grid2.errors == ["the server's key list does not hold this device's own keys: "
                            "refused"]


# ------------------------------------------------------------------ in a federation
def _raw(tiny_bert, agnews_short, tmp_path, **extra) -> dict:
    return {"model": str(tiny_bert), "data.path": str(agnews_short(40)), "strategy": "hetlora",
            "results-dir": str(tmp_path / "r"), "num-server-rounds": 2,
            "train.local-steps": 2, "train.batch-size": 4, "eval.max-examples": 0,
            "data.partitioner": "iid", "train.lr": 5e-3, **extra}


def _adapter(run_dir):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("strategy", ["hetlora", "rankwise"])
def test_secure_rounds_equal_plain_rounds_and_no_adapter_goes_up(strategy, tiny_bert,
                                                                 agnews_short, tmp_path):
    raw = _raw(tiny_bert, agnews_short, tmp_path, strategy=strategy)
    plain_rows, plain_dir = run_inprocess(raw, 5, run_id=3)
    secure = {**raw, "secure.enabled": True, "results-dir": str(tmp_path / "s")}
    grid = InProcessGrid(secure, num_nodes=5)
    run_dir = federate(grid, prepare_run(RunConfig.from_run_config(secure), 3))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for p, s in zip(plain_rows, rows):
        assert s["loss"] == pytest.approx(p["loss"], abs=1e-6)
    a, b = _adapter(plain_dir), _adapter(run_dir)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-6)
    ups = [m for m in grid.replies if m.metadata.message_type == "train"]
    assert len(ups) == 10
    for reply in ups:
        assert set(from_record(reply.content["arrays"])) == {MASKED}
    train = [r for r in rows if r["round"] > 0]
    for row in train:
        sec = row["secure"]
        assert sec["survived"] == sorted(grid.contexts) and sec["dropped"] == []
        assert sec["weight"] == sum(c["num_examples"] for c in row["clients"])
        assert sec["bytes"]["setup"] > 0 and sec["bytes"]["share"] > 0
        assert row["aggregation_error"] is None  # the server never sees one device's factors


class DropGrid(InProcessGrid):
    """A federation where node `gone` stops answering at `stage` ('train': its masked input
    never arrives; 'unmask': it masked and left)."""

    def __init__(self, raw, nodes, gone, stage):
        super().__init__(raw, num_nodes=nodes)
        self.gone, self.stage = gone, stage

    def send_and_receive(self, messages, *, timeout=None):
        keep = []
        for msg in messages:
            kind = msg.metadata.message_type
            stage = "train" if kind == "train" else msg.content["config"].get("stage")
            if not (msg.metadata.dst_node_id == self.gone and stage == self.stage):
                keep.append(msg)
        if self.stage == "unmask" or not any(m.metadata.message_type == "train"
                                             for m in messages):
            return super().send_and_receive(keep, timeout=timeout)
        replies = super().send_and_receive(messages, timeout=timeout)
        return [r for r in replies if r.metadata.src_node_id != self.gone]  # trained, lost


@pytest.mark.parametrize("stage", ["train", "unmask"])
def test_a_device_dropping_mid_round_still_aggregates_exactly(stage, tiny_bert, agnews_short,
                                                             tmp_path):
    raw = {**_raw(tiny_bert, agnews_short, tmp_path, **{"num-server-rounds": 1}),
           "secure.enabled": True}
    grid = DropGrid(raw, 5, gone=1003, stage=stage)
    run_dir = federate(grid, prepare_run(RunConfig.from_run_config(raw), 4))
    (row,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["round"] == 1]
    sec = row["secure"]
    # the plain aggregation over the devices whose input arrived
    arrived = [1001, 1002, 1004, 1005] if stage == "train" else sorted(grid.contexts)
    assert sec["survived"] == arrived
    assert sec["dropped"] == ([1003] if stage == "train" else [])
    plain = {**raw, "secure.enabled": False, "results-dir": str(tmp_path / "p")}
    pgrid = DropGrid(plain, 5, gone=1003 if stage == "train" else -1, stage="train")
    plain_dir = federate(pgrid, prepare_run(RunConfig.from_run_config(plain), 4))
    a, b = _adapter(plain_dir), _adapter(run_dir)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-6)


def test_a_reply_rejected_for_its_input_adds_nothing(tiny_bert, agnews_short, tmp_path):
    raw = {**_raw(tiny_bert, agnews_short, tmp_path, **{"num-server-rounds": 1}),
           "secure.enabled": True}

    class Truncating(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            for r in replies:
                if r.metadata.message_type == "train" and r.metadata.src_node_id == 1002:
                    arrays = r.content["arrays"]
                    arrays[MASKED] = type(arrays[MASKED]).from_numpy_ndarray(
                        arrays[MASKED].numpy()[:-1])
            return replies

    grid = Truncating(raw, num_nodes=4)
    run_dir = federate(grid, prepare_run(RunConfig.from_run_config(raw), 5))
    row = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["rejected"] == 1 and "masked input of" in row["rejections"][0]["reason"]
    assert 1002 not in row["secure"]["survived"] and row["secure"]["dropped"] == [1002]
    assert row["secure"]["weight"] == sum(c["num_examples"] for c in row["clients"])


def test_secure_mode_refuses_aggregations_that_read_each_upload():
    for extra, why in (({"strategy": "flexlora"}, "product"),
                       ({"strategy": "fedex"}, "product"),
                       ({"strategy": "fedkd"}, "logits"),
                       ({"strategy": "hetlora", "robust.aggregator": "krum"}, "robust"),
                       ({"strategy": "hetlora", "fleet.selection": "fedlaavg"}, "latest")):
        with pytest.raises(ConfigError, match=why):
            RunConfig.from_run_config({**extra, "secure.enabled": True})
    with pytest.raises(ConfigError, match="secure.threshold"):
        RunConfig.from_run_config({"secure.enabled": True, "secure.threshold": 0.4})
    cfg = RunConfig.from_run_config({"strategy": "rankwise", "secure.enabled": True})
    assert cfg.secure.threshold == 0.66 and cfg.secure.neighbours == 0


def test_encoding_round_trip_is_the_weighted_mean():
    rng = np.random.default_rng(1)
    states = [{"l.lora_A.weight": rng.normal(size=(r, 6)).astype(np.float32),
               "l.lora_B.weight": rng.normal(size=(4, r)).astype(np.float32),
               "head.weight": rng.normal(size=(3, 6)).astype(np.float32)} for r in (1, 2, 4)]
    counts = [5, 7, 11]
    template = {k: np.zeros_like(v) for k, v in states[2].items()}
    from strategies.lora.math import hetlora_aggregate, rankwise_aggregate

    for layout, rule in (("padded", hetlora_aggregate), ("rankwise", rankwise_aggregate)):
        total = sum(encoding.encode(s, n, 4, layout, 8.0)[0] for s, n in zip(states, counts))
        got, weight, clipped = encoding.decode(total, template, layout, 4, 8.0)
        want = rule(states, counts, 4)
        assert weight == 23 and clipped == 0
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-6)  # float32 sums
    _, clipped = encoding.encode({"w": np.array([9.0, -20.0, 1.0])}, 1, 4, "padded", 8.0)
    assert clipped == 2


def test_the_client_app_answers_the_stages_through_flower(tmp_path):
    """QUERY `secagg` reaches the ClientApp's handler (what a SuperNode delivers)."""
    from client_app.app import app as client_app

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    ctx = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    msg = Message(RecordDict({"config": ConfigRecord({
        "stage": "setup", "server-round": 1, "devices": [1, 2, 3], "neighbours": 0,
        "threshold": 2})}), dst_node_id=2, message_type="query.secagg")
    reply = client_app(msg, ctx)
    keys = reply.content["config"]
    assert len(keys["pk-c"]) == len(keys["pk-s"]) == 32 and keys["pk-c"] != keys["pk-s"]


def test_rebuilding_with_kept_lagrange_coefficients_equals_flowers_combine_shares():
    import os

    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

    from strategies.secure.protocol import rebuild

    basis: dict = {}
    for size in (16, 32, 47):
        secret = os.urandom(size)
        shares = create_shares(secret, 4, 7)
        for pick in ([0, 1, 2, 3], [6, 2, 4, 1], [1, 2, 3, 4, 5]):
            chosen = [shares[i] for i in pick]
            assert rebuild(chosen, 4, "s", basis) == combine_shares(chosen[:4]) == secret
    assert len(basis) == 3  # three distinct 4-index sets seen: coefficients kept per set
