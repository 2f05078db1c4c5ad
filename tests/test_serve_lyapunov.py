"""Lyapunov drift-plus-penalty scheduling of MoE experts (S8): the per-slot minimiser against
hand-computed and brute-force minima, the queue update, the LP optimum, queue stability
inside the capacity region and growth outside it, failed devices, the V trade-off, and the
benchmark end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from flower_e2e import ROOT
from server_app.serve.fleet import fleet
from server_app.serve.lyapunov import (BaselineScheduler, LyapunovScheduler,
                                       best_assignment, brute_force_assignment,
                                       capacity_margin, check_hosts, energy_costs,
                                       greedy_assignment, late_tokens, optimal_average_cost,
                                       queue_update, simulate, slot_objective, striped_hosts)
from edge_lam.config.run_config import RunConfig
from edge_lam.config.options import ConfigError


def test_queue_update_by_hand():
    # Q(t+1) = max(Q - S, 0) + A: [10 - 4 + 3, max(2 - 5, 0) + 7, 0 + 0]
    got = queue_update(np.array([10.0, 2, 0]), np.array([4.0, 5, 1]), np.array([3.0, 7, 0]))
    assert got.tolist() == [9.0, 7.0, 0.0]


def test_slot_choice_by_hand():
    # a = (10, 4), Q = (0, 20), S = (5, 5), c = (1, 0), V = 2; quadratic value of
    # A_d (Q_d - S_d)^+ + A_d^2 / 2 + V c_d A_d summed over d, for the four assignments:
    # (0,0): A=(14,0): 0 + 98 + 28 = 126        (0,1): A=(10,4): 0 + 50 + 20 + 4*15 + 8 = 138
    # (1,0): A=(4,10): 0 + 8 + 8 + 10*15 + 50 = 216   (1,1): A=(0,14): 14*15 + 98 = 308
    args = (np.array([10.0, 4]), np.array([0.0, 20]), np.array([5.0, 5]), np.array([1.0, 0]),
            2.0)
    every = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    assert slot_objective(every, *args).tolist() == [126.0, 138.0, 216.0, 308.0]
    allowed = np.ones((2, 2), bool)
    assert best_assignment(*args, allowed).tolist() == [0, 0]
    # linear: per expert Q_d + V c_d = (2, 20): both to device 0
    assert best_assignment(*args, allowed, objective="linear").tolist() == [0, 0]
    # a large V makes the free device 1 worth its backlog: Q + V c = (100, 20)
    big_v = (*args[:4], 100.0)
    assert best_assignment(*big_v, allowed, objective="linear").tolist() == [1, 1]


def random_case(rng):
    experts, devices = rng.integers(2, 6), rng.integers(2, 5)
    allowed = rng.random((experts, devices)) < 0.6
    allowed[np.arange(experts), rng.integers(0, devices, experts)] = True
    return (rng.integers(0, 50, experts).astype(float), rng.integers(0, 100, devices).astype(float),
            rng.integers(0, 40, devices).astype(float), rng.random(devices) * 3,
            float(rng.choice([0.0, 1.0, 10.0]))), allowed


def test_linear_rule_is_the_brute_force_minimum():
    rng = np.random.default_rng(1)
    for _ in range(200):
        args, allowed = random_case(rng)
        fast = best_assignment(*args, allowed, objective="linear")
        exact = brute_force_assignment(*args, allowed, objective="linear")
        values = slot_objective(np.stack([fast, exact]), *args, objective="linear")
        assert values[0] == pytest.approx(values[1])
        assert allowed[np.arange(len(fast)), fast].all()


def test_quadratic_greedy_against_brute_force():
    rng = np.random.default_rng(2)
    exact_hits, gaps = 0, []
    for _ in range(200):
        args, allowed = random_case(rng)
        greedy = greedy_assignment(*args, allowed)
        exact = brute_force_assignment(*args, allowed)
        g, b = slot_objective(np.stack([greedy, exact]), *args)
        assert g >= b - 1e-9 and allowed[np.arange(len(greedy)), greedy].all()
        exact_hits += g <= b + 1e-9
        gaps.append((g - b) / max(b, 1.0))
        # no single move lowers the greedy result (its local optimality, the basis of its bound)
        for e in range(len(greedy)):
            for d in np.flatnonzero(allowed[e]):
                moved = greedy.copy()
                moved[e] = d
                assert slot_objective(moved[None], *args)[0] >= g - 1e-9
    assert exact_hits >= 160 and max(gaps) < 0.2  # measured: 175 of 200, worst 11%
    # below brute_limit the quadratic rule is exact
    args, allowed = random_case(np.random.default_rng(3))
    assert (slot_objective(best_assignment(*args, allowed)[None], *args)[0]
            == slot_objective(brute_force_assignment(*args, allowed)[None], *args)[0])


def test_lp_optimum_by_hand():
    hosts, cost = np.ones((1, 2), bool), np.array([1.0, 3.0])
    # 6 tokens per slot: 4 on the cheap device (its capacity), 2 on the other: 4 + 6 = 10
    c_star, rates = optimal_average_cost(np.array([6.0]), np.array([4.0, 10.0]), hosts, cost)
    assert c_star == pytest.approx(10.0)
    np.testing.assert_allclose(rates, [[4.0, 2.0]], atol=1e-9)
    assert optimal_average_cost(np.array([20.0]), np.array([4.0, 10.0]), hosts, cost)[0] == \
        float("inf")
    assert capacity_margin(np.array([6.0]), np.array([4.0, 10.0]), hosts) == pytest.approx(14 / 6)
    # device 0 dead half the slots: alive, it may take 8 (4 on average); dead, all 6 go to
    # device 1: C* = 0.5 * 6 + 0.5 * 18 = 12
    states = np.array([[True, True], [False, True]])
    c_star, rates = optimal_average_cost(np.array([6.0]), np.array([4.0, 10.0]), hosts, cost,
                                         states, np.array([0.5, 0.5]))
    assert c_star == pytest.approx(12.0)
    np.testing.assert_allclose(rates, [[3.0, 3.0]], atol=1e-9)  # averaged over the states


def test_late_tokens_by_hand():
    # 5 tokens arrive in slot 0; by the end of slot 1 (deadline 1) only 2 are computed
    late, judged = late_tokens(np.array([[5.0], [0], [0], [0]]),
                               np.array([[0.0], [2], [2], [1]]), deadline=1)
    assert (late, judged) == (3.0, 5.0)


def small_fleet():
    devices = fleet(["rpi5", "jetson-orin-nano", "laptop"])
    cost, spt = energy_costs(devices, 0.01)  # capacities 80, 600, 400 tokens per 1 s slot
    return devices, striped_hosts(6, 3, 2), cost, spt


def trace(rng, hosts, capacity, load, slots=3000):
    popularity = np.array([0.3, 0.25, 0.15, 0.12, 0.1, 0.08])
    theta = capacity_margin(popularity, capacity, hosts)
    demand = rng.poisson(load * theta * popularity, (slots, len(popularity))).astype(float)
    return demand, np.tile(capacity, (slots, 1)), np.ones((slots, len(capacity)), bool)


def test_queues_stable_below_capacity_and_growing_above():
    devices, hosts, cost, spt = small_fleet()
    capacity = np.array([80.0, 600, 400])
    demand, cap, alive = trace(np.random.default_rng(0), hosts, capacity, 0.9)
    sched = LyapunovScheduler(devices, hosts, 100.0, cost, spt)
    run = simulate(sched, demand, cap, alive)
    total = run["backlog"].sum(1)
    assert total[1500:].max() < 3 * demand.sum(1).mean()  # a few slots of demand, not growing
    assert abs(sched.backlog_growth()) < 0.5
    demand, cap, alive = trace(np.random.default_rng(0), hosts, capacity, 1.2)
    assert capacity_margin(demand.mean(0), capacity, hosts) < 1.0  # signalled: no policy can
    sched = LyapunovScheduler(devices, hosts, 100.0, cost, spt)
    simulate(sched, demand, cap, alive)
    excess = demand.sum(1).mean() - capacity_margin(demand.mean(0), capacity, hosts) * \
        demand.sum(1).mean()
    assert sched.backlog_growth() == pytest.approx(excess, rel=0.15)


def test_larger_v_trades_backlog_for_cost_on_a_fixed_trace():
    devices, hosts, cost, spt = small_fleet()
    demand, cap, alive = trace(np.random.default_rng(1), hosts, np.array([80.0, 600, 400]), 0.8)
    runs = {v: simulate(LyapunovScheduler(devices, hosts, v, cost, spt), demand, cap, alive)
            for v in (0.0, 1e4, 1e5)}
    costs = [runs[v]["cost"].mean() for v in (0.0, 1e4, 1e5)]
    backlogs = [runs[v]["backlog"].sum(1).mean() for v in (0.0, 1e4, 1e5)]
    assert costs[0] > costs[1] > costs[2] and backlogs[0] < backlogs[1] < backlogs[2]
    c_star, _ = optimal_average_cost(demand.mean(0), cap.mean(0), hosts, cost)
    assert costs[2] < c_star * 1.01 < costs[0]  # near C* at large V
    cheapest = simulate(BaselineScheduler("cheapest", devices, hosts, cost, spt), demand, cap,
                        alive)
    assert cheapest["backlog"][-1].sum() > 10 * runs[1e5]["backlog"][-1].sum()  # unstable


def test_a_failed_device_gets_nothing():
    devices, hosts, cost, spt = small_fleet()
    alive = np.array([True, False, True])
    for sched in (LyapunovScheduler(devices, hosts, 0.0, cost, spt),
                  LyapunovScheduler(devices, hosts, 1e6, cost, spt, objective="linear"),
                  BaselineScheduler("cheapest", devices, hosts, cost, spt)):
        for t in range(20):
            choice = sched.assign(t, np.full(6, 30.0), alive)
            assert (choice != 1).all() and (choice >= 0).all()
            sched.observe(t, sched.nominal_service * alive)
        assert sched.backlog[1] == 0.0
    only_on_1 = np.zeros((2, 3), bool)
    only_on_1[0, 1] = only_on_1[1, 0] = True
    sched = LyapunovScheduler(devices, only_on_1, 1.0, cost, spt)
    assert sched.assign(0, np.array([7.0, 3.0]), alive).tolist() == [-1, 0]
    assert sched.dropped == 7.0


def test_errors_say_what_to_do():
    devices, hosts, cost, spt = small_fleet()
    sched = LyapunovScheduler(devices, hosts, 1.0, cost, spt)
    sched.assign(0, np.ones(6), np.ones(3, bool))
    with pytest.raises(RuntimeError, match="observe"):
        sched.assign(1, np.ones(6), np.ones(3, bool))
    with pytest.raises(ValueError, match="V must be >= 0"):
        LyapunovScheduler(devices, hosts, -1.0, cost, spt)
    with pytest.raises(ValueError, match="objective 'cubic'"):
        LyapunovScheduler(devices, hosts, 1.0, cost, spt, objective="cubic")
    with pytest.raises(ValueError, match="more than 2 experts"):
        check_hosts(striped_hosts(6, 3, 2), max_experts=2)  # 6 x 2 / 3 = 4 each
    with pytest.raises(ValueError, match="without a device"):
        check_hosts(np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match="3 device columns for 2"):
        LyapunovScheduler(devices[:2], hosts, 1.0, cost[:2], spt[:2])
    cfg = RunConfig.from_run_config({"serve.moe-lyapunov-v": 5.0,
                                     "serve.moe-lyapunov-objective": "linear"})
    assert (cfg.serve.moe_lyapunov_v, cfg.serve.moe_lyapunov_objective) == (5.0, "linear")
    with pytest.raises(ConfigError):
        RunConfig.from_run_config({"serve.moe-lyapunov-objective": "cubic"})


def test_energy_costs_from_profiles():
    cost, spt = energy_costs(fleet(["rpi4", "jetson-orin-nano"]), 0.01)
    assert spt.tolist() == pytest.approx([0.01 / 0.35, 0.01 / 6.0])
    assert cost.tolist() == pytest.approx([6.4 * 0.01 / 0.35, 15.0 * 0.01 / 6.0])


def test_benchmark_end_to_end(tmp_path):
    out = tmp_path / "lyap"
    script = str(ROOT / "benchmarks" / "serve_lyapunov.py")
    args = ["--slots", "300", "--seeds", "2", "--experts", "6", "--v", "0", "1e5",
            "--decision-experts", "16", "--decision-devices", "20", "--out", str(out)]
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((out / "serve_lyapunov.json").read_text())
    assert len(res["seeds"]) == 2 and res["total_s"] > 0 and "serve_lyapunov.py" in res["command"]
    names = [r["scheduler"] for r in res["summary"]]
    assert names == ["dpp-linear"] * 2 + ["dpp-quadratic"] * 2 + ["cheapest", "fastest",
                                                                  "random", "round-robin"]
    assert all(np.isfinite(s["c_star"]) for s in res["seeds"])
    assert res["decision_ms"]["quadratic"] > 0 and (out / "serve_lyapunov.png").is_file()
    before = (out / "serve_lyapunov.md").read_text()
    (out / "serve_lyapunov.md").unlink()
    done = subprocess.run([sys.executable, script, "--render", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and (out / "serve_lyapunov.md").read_text() == before
