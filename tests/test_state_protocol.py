"""The strategy's stateful parts and the checkpoint protocol (strategies.lora.resume): each
part implements CheckpointPart; a strategy's state survives checkpoint_state -> restore ->
checkpoint_state unchanged, and devices met again under new node ids take up their entries
(and the rank they trained at)."""

from __future__ import annotations

import numpy as np

from strategies.fleet.scheduler import Member
from strategies.lora.resume import CheckpointPart, NodeTable, moved
from strategies.lora.strategy import HeterogeneousLoRA, NodeProfile
from edge_lam.config.run_config import RunConfig


def _strategy(**extra) -> HeterogeneousLoRA:
    return HeterogeneousLoRA(RunConfig.from_run_config({"strategy": "hetlora", **extra}),
                             ("a", "b"))


def _filled(s: HeterogeneousLoRA) -> None:
    for node, (device, rank, pid) in {11: ("rpi4", 2, 0), 12: ("laptop", 16, 1)}.items():
        s.profiles[node] = NodeProfile(node, device, pid, rank)
        s.fleet.join(node, pid, s.fleet.profile_of(device))
    s.fleet.members[12].last_round, s.fleet.clock_s = 3, 1.5
    s.exhausted[12] = 1.25
    s.capability[11] = {"rank": 2, "source": "fleet model"}


def test_every_stateful_part_implements_the_protocol():
    s = _strategy(**{"fleet.selection": "fedlaavg", "fleet.per-round": 1})
    parts = [s.directory, s.exhausted, s.capability, s.fleet, s.latest, s.server_opt]
    assert all(isinstance(p, CheckpointPart) for p in parts)
    assert [p.entry for p in s.resume.parts] == ["profiles", "exhausted", "capability",
                                                 "fleet", "latest", "server_opt"]
    robust = _strategy(**{"robust.aggregator": "median"})
    assert isinstance(robust.aggregation, CheckpointPart)
    assert robust.aggregation.entry == "trust"
    assert not isinstance(_strategy().aggregation, CheckpointPart)  # S6 off: no trust


def test_state_round_trips_and_moves_to_new_node_ids():
    s = _strategy(**{"fleet.selection": "fedlaavg", "fleet.per-round": 1})
    _filled(s)
    s.latest.updates[12] = ({"w": np.ones((2, 2), np.float32)}, 5)
    meta, arrays = s.checkpoint_state()
    assert list(meta) == ["profiles", "exhausted", "capability", "trust", "fleet", "latest",
                          "server_opt"]
    assert meta["exhausted"] == {"p1": 1.25} and meta["capability"] == {"p0": {
        "rank": 2, "source": "fleet model"}}
    assert meta["latest"] == [{"device": "p1", "examples": 5}] and list(arrays) == ["latest/p1/w"]

    resumed = _strategy(**{"fleet.selection": "fedlaavg", "fleet.per-round": 1})
    resumed.restore_checkpoint(meta, arrays)
    again, again_arrays = resumed.checkpoint_state()  # nobody met yet: the same state
    assert again == meta and list(again_arrays) == list(arrays)
    # partition 1 comes back as node 72, saying it is an rpi5 now: it stays a laptop at 16
    resumed.profiles[72] = NodeProfile(72, "rpi5", 1, 4)
    resumed.resume.adopt(resumed.profiles)
    assert resumed.profiles[72].device == "laptop" and resumed.profiles[72].rank == 16
    assert dict(resumed.exhausted) == {72: 1.25}
    assert resumed.fleet.members[72].node == 72 and resumed.fleet.members[72].last_round == 3
    assert 72 in resumed.latest.updates and resumed.fleet.clock_s == 1.5
    after, _ = resumed.checkpoint_state()
    assert after["profiles"]["p1"] == meta["profiles"]["p1"]
    assert after["exhausted"] == meta["exhausted"] and after["fleet"] == meta["fleet"]


def test_trust_round_trips_with_the_robust_wrapper():
    s = _strategy(**{"robust.aggregator": "median"})
    _filled(s)
    s.aggregation.trust.update({11: 0.5, 12: 1.5})
    meta, _ = s.checkpoint_state()
    assert meta["trust"] == {"p0": 0.5, "p1": 1.5}
    resumed = _strategy(**{"robust.aggregator": "median"})
    resumed.restore_checkpoint(meta, {})
    resumed.profiles[5] = NodeProfile(5, "rpi4", 0, 2)
    resumed.resume.adopt(resumed.profiles)
    assert resumed.aggregation.trust[5] == 0.5
    assert resumed.checkpoint_state()[0]["trust"] == meta["trust"]


def test_moves_keep_the_order_and_replace_a_value_already_there():
    table = NodeTable("trust", float)
    table.update({-1: 1.0, 7: 2.0, -2: 3.0})
    table.move(-1, 7)
    assert list(table.items()) == [(7, 1.0), (-2, 3.0)]
    members = {-1: Member(-1, 0, None), 4: Member(4, 1, None)}
    assert list(moved(members, -1, 9)) == [9, 4]
