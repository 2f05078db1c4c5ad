"""Secure aggregation of the sub-model rows against a dishonest server (issue 28, item 2):
the device refuses a peer list with duplicates, without itself, or with fewer than two
distinct others; a second TRAIN for the same round; secure mode without a group secret on a
real device; it never sends its rows in the clear when the server leaves out the union; and
the server adds no rows of a reply it rejected for its adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from inprocess_grid import InProcessGrid
from strategies.submodel.device import (COUNTS, IDS, MASKED, PEERS, ROWS, SECRET, UNION,
                                        checked_peers, claim_round, row_secret)
from strategies.submodel.server import federate, prepare_run
from edge_lam.config.run_config import RunConfig
from edge_lam.records import from_record, to_record

from test_submodel_federation import _raw, pairs, tied_llama  # noqa: F401 (fixtures)


def _train_rows(run_dir) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("clients") is not None and r["round"] > 0]


class TamperGrid(InProcessGrid):
    """An in-process federation whose server changes its TRAIN messages (`tamper(msg)`)
    or the replies it gets (`tamper_reply(msg)`) before anyone reads them."""

    def __init__(self, raw, nodes=3, tamper=None, tamper_reply=None):
        super().__init__(raw, num_nodes=nodes, errors_as_replies=True)
        self.tamper = tamper or (lambda msg: None)
        self.tamper_reply = tamper_reply or (lambda msg: None)
        self.before_send = lambda msg: (self.tamper(msg) if msg.metadata.message_type
                                        == "train" else None)

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.message_type == "train" and not reply.has_error():
                self.tamper_reply(reply)
        return replies


def _run(grid, raw):
    return federate(grid, prepare_run(RunConfig.from_run_config(raw), 1))


def _errors(grid) -> list[str]:
    return [r.error.reason for r in grid.replies
            if r.metadata.message_type == "train" and r.has_error()]


@pytest.mark.parametrize("peers, reason", [
    (lambda me, others: [me, me] + others[:1], "names a device twice"),
    (lambda me, others: [me] + others[:1], "names 1 other device"),
    (lambda me, others: others, "does not include this device"),
])
def test_a_bad_peer_list_is_refused_and_no_share_leaves(peers, reason, tied_llama, pairs,
                                                        tmp_path):
    raw = _raw(tied_llama, pairs, tmp_path, **{"num-server-rounds": 1})
    grid = TamperGrid(raw)

    def tamper(msg):
        me = msg.metadata.dst_node_id
        others = sorted(set(grid.contexts) - {me})
        msg.content["config"][PEERS] = peers(me, others)

    grid.tamper = tamper
    run_dir = _run(grid, raw)
    errors = _errors(grid)
    assert len(errors) == 3 and all(reason in e for e in errors)
    assert not [r for r in grid.replies if r.metadata.message_type == "train"
                and not r.has_error()]  # no share, no adapter: nothing went up
    (row,) = _train_rows(run_dir)
    assert row["secure_rows"] == {"applied": False, "skipped": "no acceptable reply",
                                  "skipped_total": 0}
    assert row["rejected"] == 3


def test_checked_peers_by_hand():
    assert checked_peers([3, 1, 2], 1) == [3, 1, 2]
    for peers, reason in (([1, 1, 2, 3], "twice"), ([1, 2], "1 other"), ([2, 3, 4], "not")):
        with pytest.raises(ValueError, match=reason):
            checked_peers(peers, 1)


def test_a_second_train_for_the_same_round_is_refused(tied_llama, pairs, tmp_path):
    raw = _raw(tied_llama, pairs, tmp_path, **{"num-server-rounds": 1})
    grid = TamperGrid(raw)
    _run(grid, raw)
    first = next(m for _, m in grid.sent if m.metadata.message_type == "train")
    node = first.metadata.dst_node_id
    from client_app.app import app as client_app

    with pytest.raises(ValueError, match="a second TRAIN for round 1 of run 1: refused"):
        client_app(first, grid.contexts[node])
    # by hand: the claim is per (run, round)
    ctx = Context(run_id=9, node_id=5, node_config={}, state=RecordDict(), run_config={})
    claim_round(ctx, 1)
    claim_round(ctx, 2)
    with pytest.raises(ValueError, match="round 2"):
        claim_round(ctx, 2)


def test_a_real_device_without_a_group_secret_is_refused():
    cfg = RunConfig.from_run_config({"strategy": "submodel", "task": "causal-lm"})

    def ctx(node_config):
        return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                       run_config={})

    with pytest.raises(ValueError, match="needs a group secret on a real device"):
        row_secret(ctx({"device": "rpi4", "data-dir": "/data"}), cfg)
    assert row_secret(ctx({"device": "rpi4", SECRET: "s3cret"}), cfg) == "s3cret"
    # Flower's simulation gives a node only its partition: the documented fallback
    assert row_secret(ctx({"partition-id": 0, "num-partitions": 3}), cfg).startswith(
        "simulation/1/")


def test_without_the_union_rows_are_withheld_never_sent_in_the_clear(tied_llama, pairs,
                                                                      tmp_path):
    raw = _raw(tied_llama, pairs, tmp_path, **{"num-server-rounds": 1})

    def tamper(msg):  # the server pretends the round is not a secure one
        arrays = from_record(msg.content["arrays"])
        arrays.pop(UNION)
        msg.content["arrays"] = to_record(arrays)

    grid = TamperGrid(raw, tamper=tamper)
    _run(grid, raw)
    ups = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(ups) == 3 and not any(r.has_error() for r in ups)
    for reply in ups:
        up = from_record(reply.content["arrays"])
        assert not {IDS, ROWS, COUNTS, MASKED} & set(up)
        assert reply.content["metrics"]["rows-withheld"] == 1


def test_a_reply_rejected_for_its_adapter_adds_no_rows(tied_llama, pairs, tmp_path):
    raw = _raw(tied_llama, pairs, tmp_path, **{"num-server-rounds": 1})

    def tamper_reply(msg):  # node 1002's adapter comes back at the wrong rank
        if msg.metadata.src_node_id != 1002:
            return
        arrays = from_record(msg.content["arrays"])
        key = next(k for k in arrays if k.endswith("lora_A.weight"))
        arrays[key] = np.zeros((arrays[key].shape[0] + 1, arrays[key].shape[1]), np.float32)
        msg.content["arrays"] = to_record(arrays)

    grid = TamperGrid(raw, tamper_reply=tamper_reply)
    run_dir = _run(grid, raw)
    (row,) = _train_rows(run_dir)
    assert row["rejected"] == 1 and "wrong rank" in row["rejections"][0]["reason"]
    secure = row["secure_rows"]
    # its share (well formed) is not in the sum: two shares, the masks cannot cancel
    assert secure["shares"] == 2 and secure["applied"] is False
    assert "1002" in secure["skipped"]
