"""Secure aggregation of the sub-model rows against a dishonest server (issue 28, items 1-2):
the rows go into the SecAgg+ sum (`strategies.secure`, whose own dishonest-server suite is
`test_secure_aggregation.py`): a second TRAIN for the same round is refused; a real device
needs no secret of its own (keys are agreed by X25519 each round); a device never sends its
rows in the clear when the server leaves out the union; a reply rejected for its adapter
adds no rows (its masks are removed like a dropped device's)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inprocess_grid import InProcessGrid
from strategies.secure.device import MASKED
from strategies.secure.protocol import Refused
from strategies.submodel.device import COUNTS, IDS, ROWS, UNION
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


def test_a_second_train_for_the_same_round_is_refused(tied_llama, pairs, tmp_path):
    raw = _raw(tied_llama, pairs, tmp_path, **{"num-server-rounds": 1})
    grid = TamperGrid(raw)
    _run(grid, raw)
    first = next(m for _, m in grid.sent if m.metadata.message_type == "train")
    node = first.metadata.dst_node_id
    from client_app.app import app as client_app

    # replayed after the round: its masks would repeat; the device's round is over
    with pytest.raises(Refused, match="round 1 is not at the 'share' stage"):
        client_app(first, grid.contexts[node])
    # a real device (a --node-config of its own) needs no group secret: keys are agreed
    assert all(len(c["secure"]["shared"]) == 3 for c in _train_rows(
        _run(TamperGrid(raw), raw)))


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
        assert reply.content["metrics"]["rows-withheld"] == 1  # rejected: no masked input


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
    # its input (well formed) is not in the sum: 1002 counts as dropped, its masks are
    # rebuilt from the others' shares and the rows are the sum of the two accepted devices
    assert secure["shares"] == 2 and secure["applied"] is True
    assert row["secure"]["survived"] == [1001, 1003] and row["secure"]["dropped"] == [1002]
