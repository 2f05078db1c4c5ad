"""Rank algebra on LoRA adapter state dicts (S1): plain functions over {name: ndarray}.

A state holds, for every adapted Linear layer, `<prefix>.lora_A.weight` (r x d_in) and
`<prefix>.lora_B.weight` (d_out x r), plus whole trainable tensors that are not LoRA
factors (a classification head, say). Names are PEFT's (`get_peft_model_state_dict`).

Strategies that merge updates into the frozen weights (`flora`, `fedex`) add, per adapted
layer, `<prefix>.base_delta` (d_out x d_in, in the units of B @ A): the device's model is then
W0 + scaling * (base_delta + B @ A). Devices never train or return it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

State = dict[str, np.ndarray]

_A, _B = ".lora_A.weight", ".lora_B.weight"
BASE_DELTA = ".base_delta"


def is_lora_key(key: str) -> bool:
    return key.endswith(_A) or key.endswith(_B)


def is_base_delta_key(key: str) -> bool:
    return key.endswith(BASE_DELTA)


def trainable_part(state: Mapping[str, np.ndarray]) -> State:
    """The state without its frozen base deltas: what a device trains and returns."""
    return {k: v for k, v in state.items() if not is_base_delta_key(k)}


def lora_layers(state: Mapping[str, np.ndarray]) -> list[str]:
    """Prefixes of the adapted layers, sorted; each has both an A and a B factor."""
    prefixes = sorted(k[: -len(_A)] for k in state if k.endswith(_A))
    missing = [p for p in prefixes if p + _B not in state]
    if missing or len(prefixes) != sum(k.endswith(_B) for k in state):
        raise ValueError(f"LoRA state has unpaired A/B factors (e.g. {missing[:1]})")
    return prefixes


def factors(state: Mapping[str, np.ndarray], prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) of one layer: B is d_out x r, A is r x d_in."""
    return state[prefix + _B], state[prefix + _A]


def lora_rank(state: Mapping[str, np.ndarray]) -> int:
    """The common rank of every layer's factors; ValueError if layers disagree."""
    ranks = {state[p + _A].shape[0] for p in lora_layers(state)}
    ranks |= {state[p + _B].shape[1] for p in lora_layers(state)}
    if len(ranks) != 1:
        raise ValueError(f"LoRA factors have mixed ranks {sorted(ranks)}")
    return ranks.pop()


def truncate_lora(state: Mapping[str, np.ndarray], rank: int) -> State:
    """S1 step 1: B_k = Bbar[:, :r_k], A_k = Abar[:r_k, :]; other tensors are copied whole.

    A state with base deltas loses nothing: the dropped components' product
    Bbar[:, r_k:] Abar[r_k:, :] moves into the device's base delta, so its model is exactly
    the global one."""
    out: State = {}
    for key, value in state.items():
        if is_base_delta_key(key):
            prefix = key[: -len(BASE_DELTA)]
            b, a = state[prefix + _B], state[prefix + _A]
            tail = b[:, rank:].astype(np.float64) @ a[rank:, :].astype(np.float64)
            out[key] = (value.astype(np.float64) + tail).astype(value.dtype)
            continue
        if key.endswith(_A):
            out[key] = np.ascontiguousarray(value[:rank, :])
        elif key.endswith(_B):
            out[key] = np.ascontiguousarray(value[:, :rank])
        else:
            out[key] = value.copy()
    return out


def pad_lora(state: Mapping[str, np.ndarray], rank: int) -> State:
    """S1 step 4: zero-pad B with columns and A with rows up to `rank`."""
    out: State = {}
    for key, value in state.items():
        if key.endswith(_A):
            out[key] = np.pad(value, ((0, rank - value.shape[0]), (0, 0)))
        elif key.endswith(_B):
            out[key] = np.pad(value, ((0, 0), (0, rank - value.shape[1])))
        else:
            out[key] = value.copy()
    return out


def lora_products(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """B @ A of each adapted layer (d_out x d_in), in float64."""
    out = {}
    for prefix in lora_layers(state):
        b, a = factors(state, prefix)
        out[prefix] = b.astype(np.float64) @ a.astype(np.float64)
    return out


def state_nbytes(state: Mapping[str, np.ndarray]) -> int:
    """Bytes of the arrays' data: what crosses the network for this state."""
    return int(sum(v.nbytes for v in state.values()))


_U, _V = BASE_DELTA + ".u", BASE_DELTA + ".v"  # a base delta sent as factors u @ v


def compress_base_deltas(state: Mapping[str, np.ndarray], rank: int) -> State:
    """`lora.base-delta-rank`: every base delta (d_out x d_in) replaced by its best rank-`rank`
    factors, `<prefix>.base_delta.u` = U_k S_k (d_out x k) and `.v` = V_k^T (k x d_in)
    (Eckart-Young), which `expand_base_deltas` multiplies back; k (d_out + d_in) numbers
    instead of d_out d_in. rank 0, or a rank that saves nothing: the state unchanged."""
    out = dict(state)
    for key in [k for k in state if is_base_delta_key(k)]:
        delta = np.asarray(state[key], dtype=np.float32)
        d_out, d_in = delta.shape
        if rank <= 0 or rank * (d_out + d_in) >= d_out * d_in:
            continue
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        prefix = key[: -len(BASE_DELTA)]
        del out[key]
        out[prefix + _U] = np.ascontiguousarray(u[:, :rank] * s[:rank])
        out[prefix + _V] = np.ascontiguousarray(vt[:rank])
    return out


def expand_base_deltas(state: Mapping[str, np.ndarray]) -> State:
    """The inverse of `compress_base_deltas` (a device's side): u @ v back into base deltas."""
    out = dict(state)
    for key in [k for k in state if k.endswith(_U)]:
        prefix = key[: -len(_U)]
        if prefix + _V not in state:
            raise ValueError(f"{key} came without {prefix + _V}: a damaged message")
        out[prefix + BASE_DELTA] = (np.asarray(out.pop(key), np.float32)
                                    @ np.asarray(out.pop(prefix + _V), np.float32))
    return out
