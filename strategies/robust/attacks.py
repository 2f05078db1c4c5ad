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


# ------------------------------------------------------------- attacks on the defences
# Colluders who estimate the honest updates (`benign`: update dicts in product space, as
# `update_of` gives) craft one update that robust statistics accept (Baruch et al., NeurIPS
# 2019, "A Little Is Enough"; Shejwalkar & Houmansadr, NDSS 2021, min-max / min-sum).
def _flat(updates: Sequence[Mapping[str, np.ndarray]]) -> tuple[np.ndarray, list]:
    keys = sorted(updates[0])
    shapes = [np.shape(updates[0][k]) for k in keys]
    return (np.stack([np.concatenate([np.ravel(u[k]).astype(np.float64) for k in keys])
                      for u in updates]), list(zip(keys, shapes)))


def _unflat(vector: np.ndarray, layout: list) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for key, shape in layout:
        size = int(np.prod(shape))
        out[key] = vector[pos:pos + size].reshape(shape)
        pos += size
    return out


def alie_z(num_devices: int, num_attackers: int) -> float:
    """ALIE's z: the attackers need s = floor(n / 2 + 1) - f honest devices to sit farther
    from the mean than they do; z = Phi^-1((n - s) / n)."""
    from scipy.stats import norm

    s = num_devices // 2 + 1 - num_attackers
    return float(norm.ppf((num_devices - s) / num_devices))


def alie(benign: Sequence[Mapping[str, np.ndarray]], num_devices: int,
         num_attackers: int) -> dict[str, np.ndarray]:
    """mu - z sigma per coordinate, inside the honest spread (median, trimmed mean and Krum
    accept it), z = `alie_z`; mu, sigma over the estimated honest updates."""
    x, layout = _flat(benign)
    return _unflat(x.mean(0) - alie_z(num_devices, num_attackers) * x.std(0), layout)


def _scaled_to_fit(x: np.ndarray, direction: np.ndarray, fits) -> np.ndarray:
    """mu + gamma p with the largest gamma (binary search) for which `fits(m)` holds."""
    mu = x.mean(0)
    lo, hi = 0.0, 1.0
    while fits(mu + hi * direction) and hi < 1e6:
        lo, hi = hi, 2 * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mu + mid * direction) else (lo, mid)
    return mu + lo * direction


def _direction(x: np.ndarray) -> np.ndarray:
    """The perturbation: minus the unit standard deviation (Shejwalkar & Houmansadr's
    'std' direction)."""
    sd = x.std(0)
    norm = np.linalg.norm(sd)
    return -sd / norm if norm > 0 else -x.mean(0) / max(np.linalg.norm(x.mean(0)), 1e-12)


def min_max(benign: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """mu + gamma p, gamma as large as keeps the crafted update's largest distance to an
    honest one within the largest distance between two honest ones (Krum / median blind)."""
    x, layout = _flat(benign)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1).max()
    return _unflat(_scaled_to_fit(x, _direction(x), lambda m: np.linalg.norm(
        x - m, axis=1).max() <= d), layout)


def min_sum(benign: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """mu + gamma p, gamma as large as keeps the crafted update's sum of squared distances
    to the honest ones within the largest such sum of an honest one."""
    x, layout = _flat(benign)
    sums = (np.linalg.norm(x[:, None] - x[None], axis=-1) ** 2).sum(1).max()
    return _unflat(_scaled_to_fit(x, _direction(x), lambda m: (np.linalg.norm(
        x - m, axis=1) ** 2).sum() <= sums), layout)


def pick_attackers(num_devices: int, fraction: float, rng: np.random.Generator) -> list[int]:
    """round(fraction x K) device indices, at least one, drawn without replacement (the
    issue asks for 10-30% of devices)."""
    if not 0.0 < fraction < 0.5:
        raise ValueError(f"attack fraction {fraction} must be in (0, 0.5): robust "
                         f"aggregation assumes an honest majority")
    count = max(1, round(fraction * num_devices))
    return sorted(rng.choice(num_devices, size=count, replace=False).tolist())
