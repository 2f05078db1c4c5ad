"""Byzantine replies for tests and benchmarks (issue 17, S6): pure functions that turn a
device's honest reply into a poisoned one of the same keys, shapes and rank.

The attacks act on the update in product space, Delta = B' A' - B A per layer (with (B, A)
what the device was sent) and x' - x for dense keys (the head): the poisoned reply's product
is B A + c Delta (sign flip c = -1, scaling c = 10), refactorised to the device's rank r by
truncated SVD (`strategies.lora.math.factorize`). That is exact when rank(B A + c Delta) <= r,
e.g. when the device was sent B = 0 (a fresh adapter, as LoRA starts); otherwise it is the best
rank-r approximation of the attack, which is what a real attacker could send at that rank.

Not here: the backdoor through poisoned data (it needs a training run with triggered
examples; it belongs to the benchmark, not to this pure math).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from strategies.lora.math import factorize
from strategies.robust.math import update_of
from edge_lam.training.lora import (State, factors, is_base_delta_key, is_lora_key, lora_layers,
                                    lora_rank)


def _with_updates(sent: Mapping[str, np.ndarray], updates: Mapping[str, np.ndarray]) -> State:
    """The reply whose product per layer is B A + updates[layer] (refactorised at the sent
    rank) and whose dense keys are x + updates[key]; dtypes of `sent`."""
    rank = lora_rank(sent)
    out: State = {}
    for key, value in sent.items():
        if not is_lora_key(key) and not is_base_delta_key(key):
            out[key] = (value.astype(np.float64) + updates[key]).astype(value.dtype)
    for prefix in lora_layers(sent):
        b0, a0 = factors(sent, prefix)
        target = b0.astype(np.float64) @ a0.astype(np.float64) + updates[prefix]
        b, a = factorize(target, rank)  # (d_out x r), (r x d_in)
        out[prefix + ".lora_B.weight"] = b.astype(b0.dtype)
        out[prefix + ".lora_A.weight"] = a.astype(a0.dtype)
    return out


def scale(sent: State, trained: State, factor: float = 10.0) -> State:
    """The update multiplied by `factor` (x10: a model-replacement style boost)."""
    return _with_updates(sent, {k: factor * d for k, d in update_of(sent, trained).items()})


def sign_flip(sent: State, trained: State) -> State:
    """The update negated: the device pushes the model against its own descent direction."""
    return scale(sent, trained, -1.0)


def gaussian(sent: State, trained: State, sigma: float, rng: np.random.Generator) -> State:
    """The update replaced by noise N(0, sigma^2) in every entry of every layer's product and
    every dense tensor (the Gaussian attack of Blanchard et al., NeurIPS 2017); the layer's
    noise is then the best rank-r approximation of it (rank of the reply kept)."""
    if not sigma > 0:
        raise ValueError(f"gaussian attack sigma={sigma} must be > 0")
    noise = {k: sigma * rng.standard_normal(d.shape) for k, d in update_of(sent, trained).items()}
    return _with_updates(sent, noise)


def collude(sent: Sequence[State], trained: Sequence[State], colluders: Sequence[int],
            factor: float = 1.0) -> list[State]:
    """Colluding devices all send the same crafted update: -factor x the mean of the honest
    devices' updates (they see each other's data, the inner-product manipulation of Xie et
    al., UAI 2019). Returns every reply, colluders' replaced, honest ones as given."""
    bad = set(colluders)
    honest = [k for k in range(len(trained)) if k not in bad]
    if not bad or not honest or not bad <= set(range(len(trained))):
        raise ValueError(f"colluders {sorted(bad)} must be some, not all, of the device "
                         f"indices 0..{len(trained) - 1}")
    updates = [update_of(sent[k], trained[k]) for k in honest]
    crafted = {key: -factor * np.mean([u[key] for u in updates], axis=0) for key in updates[0]}
    return [_with_updates(sent[k], crafted) if k in bad else trained[k]
            for k in range(len(trained))]


def pick_attackers(num_devices: int, fraction: float, rng: np.random.Generator) -> list[int]:
    """round(fraction x K) device indices, at least one, drawn without replacement (the
    issue asks for 10-30% of devices)."""
    if not 0.0 < fraction < 0.5:
        raise ValueError(f"attack fraction {fraction} must be in (0, 0.5): robust "
                         f"aggregation assumes an honest majority")
    count = max(1, round(fraction * num_devices))
    return sorted(rng.choice(num_devices, size=count, replace=False).tolist())
