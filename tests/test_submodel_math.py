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
