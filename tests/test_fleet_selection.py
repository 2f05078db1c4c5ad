"""S2's latency model and joint selection + bandwidth allocation against brute force, the
baselines, and FedLaAvg's longest-absent choice (strategies.fleet)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from strategies.fleet.select import (allocate, longest_absent, oort_utility, random_subset,
                                     schedule)
from strategies.fleet.wireless import (bandwidth_for, comm_seconds, db_to_linear,
                                       rayleigh_snr, round_seconds)


def test_shannon_latency_by_hand():
    # 1 Mbit over 1 MHz at SNR 3 (log2 4 = 2 bit/s/Hz): 0.5 s
    assert comm_seconds(1e6, 1e6, 3.0) == pytest.approx(0.5)
    assert bandwidth_for(np.array([1e6]), np.array([0.5]), np.array([3.0]))[0] == \
        pytest.approx(1e6)
    assert np.isinf(comm_seconds(1e6, 0.0, 3.0))
    assert np.isinf(bandwidth_for(np.array([1e6]), np.array([0.0]), np.array([3.0]))[0])
    assert db_to_linear(10.0) == pytest.approx(10.0)
    # a synchronous round lasts as long as its slowest selected device
    assert round_seconds([1, 1, 1], [2, 5, 9], [1, 1, 1], [True, True, False]) == 7.0


def test_rayleigh_fading_has_the_mean_snr():
    snr = rayleigh_snr(np.full(200_000, 10.0), np.random.default_rng(0))
    assert snr.mean() == pytest.approx(10.0, rel=0.02)
    assert (snr < 10.0).mean() == pytest.approx(1 - np.exp(-1), abs=0.01)  # Exp(1) CDF


def _brute(progress, need, total):
    best = 0.0
    for mask in itertools.product([0, 1], repeat=len(progress)):
        m = np.array(mask, bool)
        if need[m].sum() <= total + 1e-9:
            best = max(best, progress[m].sum())
    return best


@pytest.mark.parametrize("seed", range(6))
def test_exact_allocation_matches_brute_force_and_greedy_never_beats_it(seed):
    rng = np.random.default_rng(seed)
    progress = rng.integers(1, 30, size=9).astype(float)
    need = rng.uniform(0.1, 1.0, size=9)
    need[rng.integers(9)] = np.inf  # a device that cannot make the deadline
    total = 2.0
    exact = allocate(progress, need, total, exact=True)
    assert need[exact].sum() <= total + 1e-9
    assert progress[exact].sum() == _brute(progress, need, total)
    greedy = allocate(progress, need, total, exact=False)
    assert need[greedy].sum() <= total + 1e-9
    assert progress[greedy].sum() <= progress[exact].sum()


def test_exact_allocation_needs_whole_numbers():
    with pytest.raises(ValueError, match="whole-number"):
        allocate(np.array([1.5, 2.0]), np.array([0.1, 0.1]), 1.0, exact=True)


def test_schedule_trades_progress_for_round_time():
    # two fast devices and one slow one: waiting for the slow one halves the rate
    progress = np.array([10.0, 10.0, 10.0])
    bits = np.full(3, 1e6)
    alloc = schedule(progress, bits, down_s=np.zeros(3), comp_s=np.array([1.0, 1.0, 9.0]),
                     snr=np.full(3, 3.0), total_hz=1e7)
    assert alloc.selected.tolist() == [True, True, False]
    assert alloc.bandwidth_hz[2] == 0 and alloc.bandwidth_hz.sum() == pytest.approx(1e7)
    # each fast device: 1 s compute + 1e6 / (b * 2) <= deadline with b = its share
    assert alloc.deadline_s == pytest.approx(1.0 + 1e6 / (5e6 * 2))
    assert alloc.progress_per_s == pytest.approx(20.0 / alloc.deadline_s)
    # a deadline cap that excludes every device: nobody
    none = schedule(progress, bits, np.zeros(3), np.array([1.0, 1.0, 9.0]), np.full(3, 3.0),
                    1e7, max_deadline_s=0.5)
    assert not none.selected.any() and none.progress == 0.0


def test_baselines_and_fedlaavg_choice():
    rng = np.random.default_rng(0)
    available = np.array([True, False, True, True, True])
    chosen = random_subset(available, 2, rng)
    assert chosen.sum() == 2 and not chosen[1]
    # never-seen (-1) first, then the longest absent; the offline device never
    last = np.array([-1, -1, 5, 2, 7])
    assert np.flatnonzero(longest_absent(available, last, 2, rng)).tolist() == [0, 3]
    u = oort_utility(np.array([100, 100]), np.array([4.0, 4.0]), np.array([10.0, 20.0]),
                     preferred_s=10.0, alpha=2.0)
    np.testing.assert_allclose(u, [200.0, 50.0])  # the slow device pays (10/20)^2


# ------------------------------------------------------------------ in a federation
import json  # noqa: E402

from benchmarks.common import run_inprocess  # noqa: E402
from strategies.fleet.model import Availability, load_profiles  # noqa: E402
from strategies.fleet.scheduler import LatestUpdates  # noqa: E402
from edge_lam.config.options import ConfigError  # noqa: E402


def _federation(tiny_bert, agnews_short, tmp_path, **extra):
    raw = {"model": str(tiny_bert), "data.path": str(agnews_short(20)), "strategy": "hetlora",
           "results-dir": str(tmp_path / "r"), "num-server-rounds": 3,
           "train.local-steps": 1, "train.batch-size": 4, "eval.max-examples": 0,
           "data.partitioner": "iid", **extra}
    return run_inprocess(raw, 4, run_id=5)[0]


def test_every_round_has_a_simulated_clock_and_the_policy_picks_who_trains(tiny_bert,
                                                                         agnews_short,
                                                                         tmp_path):
    rows = _federation(tiny_bert, agnews_short, tmp_path)  # the default: everyone, always online
    clock = [r["fleet"]["sim_clock_s"] for r in rows[1:]]
    assert all(r["fleet"]["selected"] == 4 == len(r["clients"]) for r in rows[1:])
    assert clock == sorted(clock) and clock[0] > 0
    for r in rows[1:]:  # the round lasts as long as its slowest device's down + comp + up
        devices = r["fleet"]["devices"]
        slowest = max(d["down_s"] + d["comp_s"] + d["up_s"] for d in devices)
        assert r["fleet"]["round_sim_s"] == pytest.approx(slowest)
        assert sum(d["bandwidth_mhz"] for d in devices) == pytest.approx(20.0)
        # the rpi4 (speed 0.35) computes its measured seconds 1 / 0.35 times slower
        by_node = {c["node_id"]: c for c in r["clients"]}
        for d in devices:
            c = by_node[d["node_id"]]
            speed = {"rpi4": 0.35, "rpi5": 0.8, "jetson-orin-nano": 6.0, "laptop": 4.0}
            assert d["comp_s"] == pytest.approx(c["train_s"] / speed[c["device"]])
    rows = _federation(tiny_bert, agnews_short, tmp_path / "random", **{
        "fleet.selection": "random", "fleet.per-round": 2})
    assert [len(r["clients"]) for r in rows[1:]] == [2, 2, 2]


def test_fedlaavg_takes_the_longest_absent_and_keeps_their_updates(tiny_bert, agnews_short,
                                                                    tmp_path):
    rows = _federation(tiny_bert, agnews_short, tmp_path, **{
        "fleet.selection": "fedlaavg", "fleet.per-round": 2})
    picked = [sorted(c["node_id"] for c in r["clients"]) for r in rows[1:]]
    assert len(set(map(tuple, picked[:2]))) == 2 and set(picked[0]) | set(picked[1]) == \
        {1001, 1002, 1003, 1004}  # round 2 takes the two that never trained
    # the stored updates: the new global is the start plus the n-weighted mean of all
    store = LatestUpdates(r_max=2)
    sent = {"l.lora_A.weight": np.zeros((1, 3)), "l.lora_B.weight": np.zeros((3, 1)),
            "head": np.zeros(2)}
    store.store(1, sent, {k: v + 1 for k, v in sent.items()}, 1)
    store.store(2, sent, {k: v + 4 for k, v in sent.items()}, 3)
    out = store.apply({"l.lora_A.weight": np.zeros((2, 3)), "l.lora_B.weight": np.zeros((3, 2)),
                       "head": np.ones(2)})
    np.testing.assert_allclose(out["head"], 1 + (1 * 1 + 3 * 4) / 4)
    np.testing.assert_allclose(out["l.lora_A.weight"][0], (1 + 12) / 4)
    np.testing.assert_allclose(out["l.lora_A.weight"][1], 0.0)  # zero-padded to r_max
    with pytest.raises(ConfigError, match="strategy='fedavg' or 'hetlora'"):
        _federation(tiny_bert, agnews_short, tmp_path / "flex", strategy="flexlora",
                    **{"fleet.selection": "fedlaavg"})


def test_a_bad_fleet_fails_before_training_naming_the_field(tmp_path):
    bad = tmp_path / "fleet.json"
    bad.write_text(json.dumps({"rpi4": {"speed": -1.0}}))
    with pytest.raises(ConfigError, match="'rpi4': speed must be > 0"):
        load_profiles(str(bad))
    bad.write_text(json.dumps({"phone": {"speed": 0.5}}))
    with pytest.raises(ConfigError, match="'phone' lacks snr_db"):
        load_profiles(str(bad))
    bad.write_text(json.dumps({"rpi4": {"sped": 0.5}}))
    with pytest.raises(ConfigError, match="unknown field.*sped"):
        load_profiles(str(bad))
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"0": [1, 0], "1": [1]}))
    with pytest.raises(ConfigError, match="partition '2'"):
        Availability(str(trace), [0, 1, 2], [], seed=0)
    on = Availability(str(trace), [0, 1], [], seed=0)
    assert on.step(1).tolist() == [True, True] and on.step(2).tolist() == [False, True]


def test_fleet_benchmark_runs_and_renders(tiny_bert, agnews, tmp_path):
    import subprocess
    import sys

    from flower_e2e import ROOT

    out = tmp_path / "fleet"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fleet.py"), "--model", str(tiny_bert),
           "--data", str(agnews), "--rounds", "2", "--devices", "4", "--local-steps", "1",
           "--batch", "4", "--eval-max", "20", "--per-round", "2", "--offline-period", "2",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((out / "fleet.json").read_text())
    assert set(res["selection"]) == {"all", "random", "oort", "s2"}
    for r in res["selection"].values():
        clock = [p["sim_clock_s"] for p in r["curve"]]
        assert len(clock) == 3 and clock == sorted(clock) and clock[-1] > 0
    assert [len(r["curve"]) for r in res["intermittent"]["runs"].values()] == [3, 3]
    assert set(res["intermittent"]["runs"]["fedlaavg"]["per_class"]) == {
        "Business", "Sci/Tech", "Sports", "World"}
    assert [c["devices"] for c in res["cost"]] == [10, 100, 1000]
    before = (out / "fleet.md").read_text()
    (out / "fleet.md").unlink()
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fleet.py"), "--render",
                    "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
    assert (out / "fleet.md").read_text() == before
