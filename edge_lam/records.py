"""Conversions between numpy state dicts and Flower's ArrayRecord (and their wire size)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from edge_lam.training.lora import State


def to_record(state: State) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    return {k: arr.numpy() for k, arr in record.items()}


def record_nbytes(record: ArrayRecord) -> int:
    """Serialized bytes of the arrays: what this record puts on the wire."""
    return int(sum(len(arr.data) for arr in record.values()))
