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
