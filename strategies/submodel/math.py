"""S7 sub-model math, pure numpy (no Flower, no torch): which embedding rows a device needs,
the decoys that hide them, and the per-row weighted aggregation.

- `touched_rows`: the token ids a device's data uses, with how often (its per-row weight);
- `request_rows` + `privacy_bound`: randomized response over the vocabulary. Each id of the
  device's true set is requested with probability `keep`, each other id (a decoy) with
  probability `q`. For any one id the server observes one bit, "requested or not":
  P(requested | true) / P(requested | not true) = keep / q, and
  P(not requested | not true) / P(not requested | true) = (1 - q) / (1 - keep);
  epsilon-LDP per id holds with epsilon = max(ln(keep / q), ln((1 - q) / (1 - keep))). With
  keep = 1 (the default: a device always gets every row it needs) the second ratio is
  infinite: an id that is NOT requested is certainly not in the true set; only membership of
  a requested id is deniable, bounded by ln(1 / q). The request is drawn once per device and
  reused every round (fresh decoys each round would let the server intersect them away).
- `aggregate_rows`: per row r, sum_k c_kr v_kr / sum_k c_kr over the devices that sent row r
  with a positive count c_kr; rows with no positive count (decoys, untouched rows) keep
  their value.
- secure aggregation of the row uplink: each device of a round puts into the round's
  SecAgg+ sum (`strategies.secure`), for every row of the round's union U of requests, the
  fixed-point pair (c_kr x_kr, c_kr) (zeros for rows it does not hold or holds as decoys;
  `plain_upload`); the server learns only the per-row sums (`unmask_sums`) and from them
  the same per-row weighted average (`aggregate_sums`).
A global table is kept sparse: (ids, values) of the rows that differ from the base model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


def touched_rows(token_ids: Iterable[np.ndarray], vocab_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique ids, occurrences of each) over arrays of token ids (padding removed by
    the caller). Ids outside [0, vocab_size) are a ValueError (tokenizer/model mismatch)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ids in token_ids:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"token id {int(ids.max())} outside the vocabulary of "
                             f"{vocab_size} rows: the tokenizer does not match the model")
        counts += np.bincount(ids, minlength=vocab_size)
    rows = np.flatnonzero(counts)
    return rows, counts[rows]


def decoy_rate(epsilon: float, keep: float = 1.0) -> float:
    """q such that keep / q = e^epsilon (the bound on a requested id's membership)."""
    if epsilon < 0 or not 0 < keep <= 1:
        raise ValueError("epsilon must be >= 0 and keep in (0, 1]")
    return keep * math.exp(-epsilon)


def privacy_bound(keep: float, q: float) -> dict[str, float]:
    """The per-id likelihood ratios of the request, as epsilons (inf = unbounded)."""
    if not 0 < keep <= 1 or not 0 <= q <= keep:
        raise ValueError("need 0 <= q <= keep <= 1 and keep > 0")
    requested = math.inf if q == 0 else math.log(keep / q)
    not_requested = math.inf if keep == 1 and q < 1 else \
        (0.0 if keep == 1 else math.log((1 - q) / (1 - keep)))
    return {"keep": keep, "q": q, "epsilon_requested": requested,
            "epsilon_not_requested": not_requested,
            "epsilon_ldp": max(requested, not_requested)}


@dataclass(frozen=True)
class RowRequest:
    """What a device asks for: `ids` (sorted) and which of them are its own (`true`)."""

    ids: np.ndarray  # int64 [m], sorted, unique
    true: np.ndarray  # bool [m]: in the device's true set (the others are decoys)
    dropped: np.ndarray  # int64: true ids not requested (keep < 1); not trained this run

    @property
    def decoys(self) -> int:
        return int((~self.true).sum())


def request_rows(true_ids: np.ndarray, vocab_size: int, keep: float, q: float,
                 rng: np.random.Generator) -> RowRequest:
    """Randomized response over the whole vocabulary: true id kept w.p. `keep`, any other
    id added w.p. `q` (independently). q = 0 and keep = 1: exactly the true set."""
    true_ids = np.unique(np.asarray(true_ids, dtype=np.int64))
    is_true = np.zeros(vocab_size, dtype=bool)
    is_true[true_ids] = True
    draw = rng.random(vocab_size)
    requested = np.where(is_true, draw < keep, draw < q)
    ids = np.flatnonzero(requested).astype(np.int64)
    return RowRequest(ids, is_true[ids], true_ids[~requested[true_ids]])


@dataclass(frozen=True)
class RowUpdate:
    """One device's uplink for the table: rows `ids` with values and counts (0 = a decoy
    sent back unchanged, or a row the device did not train: no weight)."""

    ids: np.ndarray  # int64 [m]
    values: np.ndarray  # float [m, d]
    counts: np.ndarray  # float [m], >= 0


def check_update(update: RowUpdate, sent_ids: np.ndarray, dim: int) -> str | None:
    """Why an uplink of rows must be rejected, or None: rows must be among those sent."""
    ids, values, counts = update.ids, update.values, update.counts
    if ids.ndim != 1 or counts.shape != ids.shape or values.shape != (ids.size, dim):
        return (f"row arrays do not match: ids {ids.shape}, values {values.shape}, counts "
                f"{counts.shape} (rows of {dim})")
    if np.unique(ids).size != ids.size:
        return "duplicate row ids"
    if not np.isin(ids, sent_ids).all():
        return "rows that were not sent to this device"
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(counts))) or (counts < 0).any():
        return "non-finite row values or negative counts"
    return None


def aggregate_rows(ids: np.ndarray, values: np.ndarray, updates: Sequence[RowUpdate]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The new sparse table: rows with sum_k c_kr > 0 become sum_k c_kr v_kr / sum_k c_kr
    (float64 sums); all other rows of (ids, values) stay as they are."""
    dim = values.shape[1]
    sent = [u for u in updates if u.ids.size]
    if not sent:
        return ids.copy(), values.copy()
    all_ids = np.concatenate([u.ids for u in sent])
    rows, where = np.unique(all_ids, return_inverse=True)
    weight = np.zeros(rows.size)
    total = np.zeros((rows.size, dim))
    start = 0
    for u in sent:
        at = where[start:start + u.ids.size]
        start += u.ids.size
        c = u.counts.astype(np.float64)
        np.add.at(weight, at, c)
        np.add.at(total, at, c[:, None] * u.values.astype(np.float64))
    return _merge(ids, values, rows, total, weight)


def _merge(ids: np.ndarray, values: np.ndarray, rows: np.ndarray, total: np.ndarray,
           weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sparse table with rows `rows` where `weight` > 0 set to total / weight."""
    moved = weight > 0
    new_ids, new_vals = rows[moved], (total[moved] / weight[moved, None]).astype(values.dtype)
    keep = ~np.isin(ids, new_ids)
    out_ids = np.concatenate([ids[keep], new_ids])
    order = np.argsort(out_ids, kind="stable")
    return out_ids[order], np.concatenate([values[keep], new_vals])[order]


def lookup(ids: np.ndarray, values: np.ndarray, wanted: np.ndarray, base: np.ndarray
           ) -> np.ndarray:
    """Current values of rows `wanted`: the sparse table's where it has them, else `base`
    (the base model's full table, or any array indexable by row)."""
    out = np.asarray(base[wanted], dtype=np.float32).copy()
    if ids.size and wanted.size:
        pos = np.searchsorted(ids, wanted)
        pos = np.minimum(pos, ids.size - 1)
        hit = ids[pos] == wanted
        out[hit] = values[pos[hit]]
    return out


def row_bytes(rows: int, dim: int, counts: bool = False, value_bytes: int = 4) -> int:
    """Payload bytes of `rows` rows: int64 ids, float values (and float32 counts)."""
    return rows * (8 + dim * value_bytes + (4 if counts else 0))


# ---------------------------------------------------------------- secure aggregation
# Fixed point modulo 2^64: x -> round(x * 2^bits) as a two's-complement int64 (uint64 on the
# wire); sums of uint64 arrays wrap modulo 2^64 (numpy), so masks cancel exactly. The sum of
# the true values must stay inside int64: |sum_k c_kr x_kr| * 2^bits < 2^63. A device checks
# its own share against 2^(63 - bits) / K (K devices in the round), which bounds the sum.
MAX_COUNT_SUM = 1 << 48  # a per-row count sum above this is not a sum of real counts


def value_bound(bits: int, devices: int) -> float:
    """The largest |c x| one of `devices` devices may encode so that no sum overflows."""
    return 2.0 ** (63 - bits) / max(devices, 1)


def plain_upload(union: np.ndarray, ids: np.ndarray, values: np.ndarray, counts: np.ndarray,
                 bits: int, devices: int) -> np.ndarray:
    """One device's unmasked share, uint64 [|U|, d + 1]: for every row r of `union` (sorted)
    held with a positive count c (its `ids`, `values`, `counts`), columns :d = fixed(c * x_r)
    and column d = c; every other row (not held, or a decoy: count 0) is all zero.
    ValueError if a row is not in the union, a count is not a whole number, or |c x| exceeds
    `value_bound(bits, devices)`."""
    dim = values.shape[1]
    out = np.zeros((union.size, dim + 1), np.int64)
    c = np.asarray(counts, np.float64)
    held = c > 0
    if not held.any():
        return out.view(np.uint64)
    pos = np.searchsorted(union, ids[held])
    if (pos >= union.size).any() or not np.array_equal(union[np.minimum(pos, union.size - 1)],
                                                       ids[held]):
        raise ValueError("a row of this device is not in the round's union")
    if not np.array_equal(c[held], np.rint(c[held])):
        raise ValueError("row counts must be whole numbers")
    weighted = c[held, None] * np.asarray(values, np.float64)[held]
    bound = value_bound(bits, devices)
    if not np.all(np.isfinite(weighted)) or np.abs(weighted).max() >= bound:
        raise ValueError(f"count x value {np.abs(weighted).max():.3g} outside the fixed-point "
                         f"range {bound:.3g} (2^(63-{bits}) / {devices} devices)")
    out[pos, :dim] = np.rint(weighted * 2.0 ** bits).astype(np.int64)
    out[pos, dim] = c[held].astype(np.int64)
    return out.view(np.uint64)


def unmask_sums(total: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-row sums of c x [|U|, d] float64, per-row count sums [|U|] int64) from the sum
    (mod 2^64) of every device's masked upload. ValueError when the sums are not those of
    real uploads (a device's masks did not cancel: a count sum negative or implausibly
    large, or values without a count)."""
    signed = np.asarray(total, np.uint64).view(np.int64)
    counts, sums = signed[:, -1], signed[:, :-1]
    if (counts < 0).any() or (counts > MAX_COUNT_SUM).any():
        raise ValueError("per-row count sums out of range: masks did not cancel")
    if (sums[counts == 0] != 0).any():
        raise ValueError("values in rows without a count: masks did not cancel")
    return sums.astype(np.float64) / 2.0 ** bits, counts


def aggregate_sums(ids: np.ndarray, values: np.ndarray, union: np.ndarray, sums: np.ndarray,
                   counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The new sparse table from the per-row sums: rows of `union` with a positive count
    sum become sums / counts; all other rows stay (as `aggregate_rows`)."""
    return _merge(ids, values, np.asarray(union, np.int64), sums,
                  np.asarray(counts, np.float64))


def secure_row_bytes(union_rows: int, dim: int) -> int:
    """Masked uplink bytes: |U| x (d + 1) uint64 (no ids: U is known to all)."""
    return union_rows * (dim + 1) * 8
