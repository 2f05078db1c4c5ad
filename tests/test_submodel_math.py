"""S7 sub-model math by hand: row sets, decoys and their stated bound, per-row weighted
aggregation (against a hand-computed case), validation of row uplinks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from strategies.submodel.math import (RowUpdate, aggregate_rows, check_update, decoy_rate,
                                      lookup, privacy_bound, request_rows, row_bytes,
                                      touched_rows)


def test_touched_rows_are_the_ids_used_with_their_occurrences():
    ids, counts = touched_rows([np.array([5, 1, 5]), np.array([[1, 9]]), np.array([])], 10)
    assert ids.tolist() == [1, 5, 9] and counts.tolist() == [2, 2, 1]
    with pytest.raises(ValueError, match="outside the vocabulary of 10 rows"):
        touched_rows([np.array([10])], 10)


def test_per_row_aggregation_weighs_by_row_use_not_by_examples():
    # global table: row 2 already changed; rows 1, 3, 5 are base rows
    ids, values = np.array([2]), np.array([[1.0, 1.0]], np.float32)
    a = RowUpdate(np.array([1, 2, 5]), np.array([[2, 0], [4, 4], [9, 9]], np.float32),
                  np.array([1.0, 3.0, 0.0]))  # row 5 is a decoy: count 0
    b = RowUpdate(np.array([1, 3]), np.array([[5, 3], [7, 7]], np.float32),
                  np.array([2.0, 1.0]))
    new_ids, new_values = aggregate_rows(ids, values, [a, b])
    assert new_ids.tolist() == [1, 2, 3]  # row 5 (decoy only) untouched, absent
    # row 1: (1 * [2, 0] + 2 * [5, 3]) / 3 = [4, 2]; row 2: only a; row 3: only b
    np.testing.assert_allclose(new_values, [[4, 2], [4, 4], [7, 7]])
    # weighting by examples (a: 10, b: 1) would have given row 1 = (10*[2,0] + [5,3]) / 11
    assert not np.allclose(new_values[0], (10 * np.array([2, 0]) + [5, 3]) / 11)
    # nothing sent with a positive count: the table is unchanged
    z = RowUpdate(np.array([7]), np.array([[3.0, 3.0]], np.float32), np.array([0.0]))
    same_ids, same_values = aggregate_rows(ids, values, [z])
    assert same_ids.tolist() == [2] and same_values.tolist() == [[1.0, 1.0]]


def test_lookup_reads_the_sparse_table_then_the_base():
    base = np.arange(12, dtype=np.float32).reshape(6, 2)
    got = lookup(np.array([1, 4]), np.array([[-1, -1], [-4, -4]], np.float32),
                 np.array([0, 1, 4, 5]), base)
    assert got.tolist() == [[0, 1], [-1, -1], [-4, -4], [10, 11]]
    assert lookup(np.zeros(0, np.int64), np.zeros((0, 2)), np.array([3]), base).tolist() == \
        [[6, 7]]


def test_decoys_always_request_the_true_rows_and_add_about_q_of_the_others():
    true = np.array([3, 50, 999, 20_000])
    exact = request_rows(true, 30_000, keep=1.0, q=0.0, rng=np.random.default_rng(0))
    assert exact.ids.tolist() == true.tolist() and exact.true.all() and exact.decoys == 0
    q = decoy_rate(2.0)
    assert q == pytest.approx(math.exp(-2))
    req = request_rows(true, 30_000, 1.0, q, np.random.default_rng(1))
    assert np.isin(true, req.ids).all() and req.dropped.size == 0
    assert req.true.sum() == 4 and np.all(np.diff(req.ids) > 0)
    assert req.decoys / (30_000 - 4) == pytest.approx(q, abs=0.01)
    # keep < 1: some true rows are not requested (and so not trained)
    half = request_rows(np.arange(0, 2000, 2), 4000, 0.5, 0.1, np.random.default_rng(2))
    assert 400 < half.true.sum() < 600 and half.true.sum() + half.dropped.size == 1000


def test_privacy_bound_is_the_likelihood_ratio_of_one_id():
    b = privacy_bound(1.0, decoy_rate(2.0))
    assert b["epsilon_requested"] == pytest.approx(2.0)
    assert b["epsilon_not_requested"] == math.inf  # not requested => certainly not own
    two = privacy_bound(0.9, 0.1)
    assert two["epsilon_requested"] == pytest.approx(math.log(9))
    assert two["epsilon_not_requested"] == pytest.approx(math.log(9))
    assert two["epsilon_ldp"] == pytest.approx(math.log(9))
    assert privacy_bound(1.0, 0.0)["epsilon_requested"] == math.inf  # no decoys


def test_row_uplinks_are_checked():
    sent = np.array([1, 2, 3])
    ok = RowUpdate(np.array([1, 3]), np.zeros((2, 4), np.float32), np.array([1.0, 0.0]))
    assert check_update(ok, sent, 4) is None
    assert "not sent" in check_update(RowUpdate(np.array([9]), np.zeros((1, 4)),
                                                np.ones(1)), sent, 4)
    assert "do not match" in check_update(RowUpdate(np.array([1]), np.zeros((1, 3)),
                                                    np.ones(1)), sent, 4)
    assert "negative" in check_update(RowUpdate(np.array([1]), np.zeros((1, 4)),
                                                -np.ones(1)), sent, 4)
    assert "duplicate" in check_update(RowUpdate(np.array([1, 1]), np.zeros((2, 4)),
                                                 np.ones(2)), sent, 4)
    assert row_bytes(10, 576) == 10 * (8 + 576 * 4)


# ------------------------------------------------------------------ secure aggregation
import os  # noqa: E402

from strategies.secure.protocol import masked  # noqa: E402
from strategies.submodel.math import (aggregate_sums, plain_upload, unmask_sums,  # noqa: E402
                                      value_bound)


def _u(x):
    return np.asarray(x, np.int64).view(np.uint64)


def test_unmasked_sums_refuse_sums_whose_masks_did_not_cancel():
    plain = {5: _u([[1, 2], [0, 0]]), 9: _u([[-3, 4], [7, 1]])}
    seeds = {k: os.urandom(32) for k in plain}
    partial = masked(plain[5], seeds[5], {}, 5) + plain[9]  # 5's self-mask still on
    with pytest.raises(ValueError, match="masks did not cancel"):
        unmask_sums(partial, 0)  # its count column is masked: out of range


def test_one_share_is_uniform_whether_or_not_the_device_holds_the_row():
    # the same coordinate of a device's masked share over 4000 rounds (fresh SecAgg+ seed
    # and pair keys each): plain count 0 (decoy / not held) vs 37 (a true row): both look
    # uniform on [0, 2^64)
    def coords(plain_value):
        plain = _u([[plain_value]])
        return np.array([masked(plain, os.urandom(32), {2: os.urandom(32), 3: os.urandom(32)},
                                1)[0, 0] for _ in range(4000)], dtype=np.float64) / 2.0 ** 64
    decoy, true = coords(0), coords(37)
    for x in (decoy, true):
        assert abs(x.mean() - 0.5) < 0.02 and abs(x.var() - 1 / 12) < 0.01
        hist = np.histogram(x, bins=16, range=(0, 1))[0]
        assert ((hist - 250) ** 2 / 250).sum() < 40  # chi-square, 15 dof (p ~ 0.0005)
    # equal to plain + mask: with the same seed and keys the difference is the plain one
    seed, keys = os.urandom(32), {2: os.urandom(32)}
    assert np.array_equal(masked(_u([[37]]), seed, keys, 1) - masked(_u([[0]]), seed, keys, 1),
                          _u([[37]]))


def test_plain_share_fixed_point_layout_and_bounds():
    union = np.array([2, 5, 8, 11])
    ids = np.array([5, 8, 30])  # row 30 is a decoy with count 0 (not in U: fine)
    values = np.array([[0.5, -1.0], [2.0, 0.25], [9.0, 9.0]], np.float32)
    share = plain_upload(union, ids, values, np.array([3.0, 1.0, 0.0]), 4, 2).view(np.int64)
    # 4 fractional bits: c x * 16; last column: c; rows 2 and 11 (not held): zero
    assert share.tolist() == [[0, 0, 0], [24, -48, 3], [32, 4, 1], [0, 0, 0]]
    assert value_bound(32, 4) == 2.0 ** 29
    with pytest.raises(ValueError, match="fixed-point range"):
        plain_upload(union, ids[:1], np.array([[1e9, 0]]), np.array([3.0]), 32, 4)
    with pytest.raises(ValueError, match="not in the round's union"):
        plain_upload(union, np.array([3]), np.zeros((1, 2)), np.ones(1), 8, 2)
    with pytest.raises(ValueError, match="whole numbers"):
        plain_upload(union, np.array([2]), np.zeros((1, 2)), np.array([0.5]), 8, 2)


def test_summed_shares_give_the_plain_per_row_weighted_average():
    # the hand-computed case of test_per_row_aggregation_weighs_by_row_use_not_by_examples
    ids, values = np.array([2]), np.array([[1.0, 1.0]], np.float32)
    a = RowUpdate(np.array([1, 2, 5]), np.array([[2, 0], [4, 4], [9, 9]], np.float32),
                  np.array([1.0, 3.0, 0.0]))  # row 5: a decoy (count 0)
    b = RowUpdate(np.array([1, 3]), np.array([[5, 3], [7, 7]], np.float32),
                  np.array([2.0, 1.0]))
    union = np.array([1, 2, 3, 5])
    shares = [plain_upload(union, u.ids, u.values, u.counts, 32, 2) for u in (a, b)]
    sums, counts = unmask_sums(shares[0] + shares[1], 32)
    assert counts.tolist() == [3, 3, 1, 0]  # row 5 (a decoy only): no count, no value
    np.testing.assert_allclose(sums, [[12, 6], [12, 12], [7, 7], [0, 0]])
    new_ids, new_values = aggregate_sums(ids, values, union, sums, counts)
    assert new_ids.tolist() == [1, 2, 3]
    np.testing.assert_allclose(new_values, [[4, 2], [4, 4], [7, 7]])
    plain_ids, plain_values = aggregate_rows(ids, values, [a, b])
    assert np.array_equal(new_ids, plain_ids)
    np.testing.assert_allclose(new_values, plain_values, atol=2.0 ** -30)
    # float rows: within 2^-(bits+1) of the plain float64 aggregation
    rng = np.random.default_rng(0)
    ups = [RowUpdate(np.array([1, 3, 4]), rng.normal(0, 0.05, (3, 8)).astype(np.float32),
                     np.array([5.0, 1.0, 1000.0])) for _ in range(3)]
    union = np.array([1, 3, 4])
    total = sum(plain_upload(union, u.ids, u.values, u.counts, 32, 3) for u in ups)
    got = aggregate_sums(np.zeros(0, np.int64), np.zeros((0, 8), np.float32), union,
                         *unmask_sums(total, 32))[1]
    want = aggregate_rows(np.zeros(0, np.int64), np.zeros((0, 8), np.float32), ups)[1]
    np.testing.assert_allclose(got, want, atol=1e-7)
