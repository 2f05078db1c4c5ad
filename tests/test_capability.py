"""Rank from capability (S1): the rank rule against hand-computed cases, the simulated /
real rule, and a federation where each device's rank comes from its (simulated) memory."""

from __future__ import annotations

import json

import pytest
from inprocess_grid import InProcessGrid

from strategies.fleet.model import FleetProfile, load_profiles
from strategies.lora.server import federate, prepare_run
from strategies.lora.strategy import device_budget
from edge_lam.training.capability import (HEADROOM, Footprint, Measured, candidate_ranks,
                                          choose_rank, footprint_of, is_simulated,
                                          meminfo_available_mib, memory_needed_mib, step_seconds_at)
from edge_lam.config.run_config import RunConfig
from edge_lam.models.lora_model import get_lora_model
from edge_lam.config.options import ConfigError

MIB = 2 ** 20
# 100 MiB of base weights; 65,536 LoRA parameters per rank x 16 bytes (weight, gradient,
# Adam's two moments in float32) = 1 MiB per rank; 16-bit activations of 8 x 64 tokens x 4
# layers x 256 hidden x (34 + 5 x 8 heads x 64 / 256 = 44) bytes = 22 MiB; LoRA's dropped
# inputs: 512 tokens x 32,768 x 5 bytes = 80 MiB: M(r) = 202 + r MiB. Compute: 4 x 393,216
# = 24 x 65,536, so FLOPs per token are 65,536 x (24 + 6 r).
FP = Footprint(base_bytes=100 * MIB, lora_params_per_rank=65_536, head_params=0,
               compute_params=393_216, hidden_size=256, num_layers=4, num_heads=8,
               logit_units=0, activation_bytes=2)
RULE = {"local_steps": 10, "batch": 8, "max_length": 64, "r_max": 16}


def test_memory_and_step_time_by_hand():
    assert memory_needed_mib(FP, 1, 8, 64) == pytest.approx(203.0)
    assert memory_needed_mib(FP, 16, 8, 64) == pytest.approx(218.0)
    # a classification head of 65,536 trained parameters: one more MiB; float32
    # activations: twice the 22 MiB; a 1,000-word vocabulary: 512 tokens x 1,000 x 20 bytes
    assert memory_needed_mib(Footprint(**{**FP.__dict__, "head_params": 65_536}), 1, 8, 64) \
        == pytest.approx(204.0)
    assert memory_needed_mib(Footprint(**{**FP.__dict__, "activation_bytes": 4}), 1, 8, 64) \
        == pytest.approx(225.0)
    assert memory_needed_mib(Footprint(**{**FP.__dict__, "logit_units": 1000}), 1, 8, 64) \
        == pytest.approx(203.0 + 10_240_000 / MIB)
    # step time at r = 0.3 s x (24 + 6 r) / 30: 0.30, 0.36, 0.48, 0.72, 1.20
    assert [step_seconds_at(FP, 0.3, 1, r) for r in (1, 2, 4, 8, 16)] == \
        pytest.approx([0.30, 0.36, 0.48, 0.72, 1.20])
    assert candidate_ranks(16) == [1, 2, 4, 8, 16]
    assert candidate_ranks(12) == [1, 2, 4, 8, 12] and candidate_ranks(1) == [1]


def test_memory_bound_rank():
    # 80 % of 265 MiB = 212 MiB: 202 + 8 fits, 202 + 16 does not
    assert HEADROOM == 0.8
    assert choose_rank(FP, 265.0, 0.3, 1, deadline_s=0.0, **RULE) == 8
    assert choose_rank(FP, 218.0 / 0.8, 0.3, 1, deadline_s=0.0, **RULE) == 16
    assert choose_rank(FP, 265.0, 0.3, 1, deadline_s=0.0, **{**RULE, "r_max": 4}) == 4


def test_deadline_bound_rank():
    # 10 steps: 3.0, 3.6, 4.8, 7.2, 12.0 s at ranks 1, 2, 4, 8, 16; memory is plenty
    assert choose_rank(FP, 1e6, 0.3, 1, deadline_s=5.0, **RULE) == 4
    assert choose_rank(FP, 1e6, 0.3, 1, deadline_s=12.0, **RULE) == 16
    assert choose_rank(FP, 1e6, 0.3, 1, deadline_s=0.0, **RULE) == 16  # no deadline
    # both bind: memory allows 8, the deadline 4
    assert choose_rank(FP, 265.0, 0.3, 1, deadline_s=5.0, **RULE) == 4


def test_none_fits_is_a_refusal_that_says_what_to_do():
    # 80 % of 250 MiB = 200 MiB < 203 MiB at rank 1
    with pytest.raises(ConfigError, match=r"rank 1 needs 203 MiB.*only 250 MiB.*batch-size"):
        choose_rank(FP, 250.0, 0.3, 1, deadline_s=0.0, **RULE)
    with pytest.raises(ConfigError, match=r"3.00 s at rank 1, over fleet.deadline-s=2.9"):
        choose_rank(FP, 1e6, 0.3, 1, deadline_s=2.9, **RULE)


def test_meminfo_and_the_simulated_rule():
    text = "MemTotal:       16384000 kB\nMemFree:  100 kB\nMemAvailable:    8192000 kB\n"
    assert meminfo_available_mib(text) == pytest.approx(8000.0)
    with pytest.raises(ValueError, match="MemAvailable"):
        meminfo_available_mib("MemTotal: 1 kB\n")
    assert is_simulated({"partition-id": 0, "num-partitions": 4})  # the simulation engine
    assert not is_simulated({"device": "rpi4"})  # a real device names its profile
    assert is_simulated({"device": "rpi4", "device-measure": 0})  # an emulated Pi
    assert not is_simulated({"partition-id": 0, "device-measure": 1})
    with pytest.raises(ConfigError, match="device-measure='yes'"):
        is_simulated({"device-measure": "yes"})


def test_fedkd_without_one_label_set_is_refused_when_the_config_is_parsed():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config({"strategy": "fedkd", "fleet.rank-from": "capability"})
    assert str(err.value) == (
        "fleet.rank-from='capability' measures one model with the run's labels, which "
        "strategy='fedkd' does not have (its devices train several tasks' heads): use "
        "fleet.rank-from='profile'")


def test_simulated_devices_take_the_fleet_model():
    pi = load_profiles("")["rpi4"]
    assert pi.memory_mib == 3000.0 and pi.speed == 0.35
    sim = Measured(22_000.0, 0.7, 1, True, FP)
    assert device_budget(sim, pi) == (3000.0, pytest.approx(2.0), "fleet model")
    real = Measured(1_500.0, 0.7, 1, False, FP)
    assert device_budget(real, pi) == (1_500.0, 0.7, "measured")
    # a profile without memory_mib keeps what the device measured
    assert device_budget(sim, FleetProfile(speed=2.0, snr_db=10.0))[:2] == (22_000.0, 0.35)
    with pytest.raises(ConfigError, match="lacks 'base-bytes'.*same edge-lam version"):
        Measured.from_reply({"free-memory-mib": 1.0})


# ------------------------------------------------------------------ in a federation
def _raw(tiny_bert, agnews_short, tmp_path, **extra):
    return {"model": str(tiny_bert), "data.path": str(agnews_short(20)), "strategy": "hetlora",
            "results-dir": str(tmp_path / "r"), "num-server-rounds": 1,
            "train.local-steps": 1, "train.batch-size": 4, "eval.max-examples": 0,
            "data.partitioner": "iid", "fleet.rank-from": "capability", **extra}


def test_ranks_follow_simulated_memory_and_explicit_rank_wins(tiny_bert, agnews_short, tmp_path):
    raw = _raw(tiny_bert, agnews_short, tmp_path)
    cfg = RunConfig.from_run_config(raw)
    labels = prepare_run(cfg, run_id=7).server_model.label_names
    fp = footprint_of(get_lora_model(cfg, labels, 1), cfg)
    # the rpi4 holds rank 4 but not 8; the rpi5 not even rank 1 (left out); the jetson
    # is started with an explicit lora-rank; the laptop (12,000 MiB) gets r_max = 16
    fleet = {"rpi4": {"memory_mib": memory_needed_mib(fp, 4, 4, 128) / HEADROOM + 1e-4},
             "rpi5": {"memory_mib": memory_needed_mib(fp, 1, 4, 128) / HEADROOM / 2}}
    (tmp_path / "fleet.json").write_text(json.dumps(fleet))
    raw["fleet.file"] = str(tmp_path / "fleet.json")
    grid = InProcessGrid(raw, num_nodes=4)
    grid.contexts[1003].node_config["lora-rank"] = 2
    cfg = RunConfig.from_run_config(raw)
    run_dir = federate(grid, prepare_run(cfg, run_id=7))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clients = {c["device"]: c for c in rows[-1]["clients"]}
    assert sorted(clients) == ["jetson-orin-nano", "laptop", "rpi4"]  # rpi5 left out
    assert clients["rpi4"]["rank"] == 4 < clients["laptop"]["rank"] == 16
    assert clients["jetson-orin-nano"]["rank"] == 2 and "capability" not in \
        clients["jetson-orin-nano"]
    pi = clients["rpi4"]["capability"]
    assert pi["source"] == "fleet model" and pi["memory_mib"] == pytest.approx(
        fleet["rpi4"]["memory_mib"]) and pi["simulated"]
    assert pi["device_step_s"] == pytest.approx(pi["step_s"] / 0.35)
    # the profile replies carry what each device measured (none for the explicit rank)
    replies = {r.metadata.src_node_id: r.content["profile"] for r in grid.replies
               if "profile" in r.content}
    for node in (1001, 1002, 1004):
        p = replies[node]
        assert p["free-memory-mib"] > 0 and p["step-s"] > 0 and p["step-rank"] == 1
        assert p["base-bytes"] == fp.base_bytes and p["hidden-size"] == fp.hidden_size
    assert "step-s" not in replies[1003]
    # the QUERY asked for it and carried the run config the device measured with
    query = next(m for _, m in grid.sent if "measure" in m.content["config"])
    assert RunConfig.from_dict(json.loads(query.content["config"]["run-config"])) == cfg


def test_profile_mode_asks_nothing(tiny_bert, agnews_short, tmp_path):
    raw = _raw(tiny_bert, agnews_short, tmp_path, **{"fleet.rank-from": "profile"})
    grid = InProcessGrid(raw, num_nodes=2)
    federate(grid, prepare_run(RunConfig.from_run_config(raw), run_id=8))
    profiles = [r.content["profile"] for r in grid.replies if "profile" in r.content]
    assert len(profiles) == 2 and all("step-s" not in p for p in profiles)
