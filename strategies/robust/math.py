"""S6 robust aggregation of heterogeneous-rank LoRA replies, taken on the products B A.

Devices train different ranks r_k, so their factors live in different spaces (and even at
one rank, B R, R^-1 A is the same model as B, A): a robust statistic on B and A separately
compares nothing meaningful. Every method here works on device k's *update*

    Delta_k[layer] = B_k' A_k' - B_k A_k        (d_out x d_in, float64)
    Delta_k[dense] = x_k' - x_k                 (a head, say: its own update entries)

with (B_k, A_k) what device k was sent and (B_k', A_k') what it returned. The per-device
vector is every layer's Delta (sorted prefixes) then the dense keys, concatenated (`stack`):
distances, norms and cosines are over the whole model, as Krum (Blanchard et al., NeurIPS
2017) and FLTrust (Cao et al., NDSS 2021) define them; a device poisoning one layer is judged
on its whole update. The coordinate-wise methods (median, trimmed mean; Yin et al., ICML 2018)
are per coordinate, so concatenating changes nothing for them.

The robust aggregate update G (per layer d_out x d_in) gives the new global product
W = Bbar Abar + G, refactorised to rank r_max by truncated SVD (`strategies.lora.math.
factorize`, Eckart-Young): exact when rank(W) <= r_max, otherwise the best rank-r_max
approximation; the relative error ||B' A' - W||_F / ||W||_F is returned per layer
(`RobustResult.svd_error`). Dense keys move by their aggregate directly.

Memory: products are dense, so the updates are never stacked whole (K x D float64 would be
8.5 GB for 10 devices of SmolLM2-135M with every projection adapted, D = 106 M). `Updates`
forms one layer's K products at a time from the factors: the coordinate-wise statistics run
layer by layer, and the whole-model distances, norms and cosines of Krum, clipping and
FLTrust come from the K x K Gram matrix summed over layers. Peak memory: one layer's K
updates (10 x 576 x 1536 x 8 B = 71 MB for SmolLM2's MLP) plus the aggregate (D floats).

Every method returns `RobustResult`: per device its weight in the aggregate, an accepted
flag and a reason (None when untouched), so that every refusal is logged with its node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from strategies.lora.math import example_weights, factorize
from edge_lam.training.lora import State, factors, is_base_delta_key, is_lora_key, lora_layers
from edge_lam.config.registry import Registry, registry

Update = dict[str, np.ndarray]  # layer prefix -> d_out x d_in, dense key -> its shape


class TooFewReplies(ValueError):
    """A run-time condition, not a configuration error: this round has fewer replies than
    the rule needs (Krum: K >= 2f + 3). The robust wrapper keeps the previous global model
    for the round; any other ValueError of a rule is a bug and propagates."""


@dataclass(frozen=True)
class RobustResult:
    """What a robust aggregation produced, and how it treated each device."""
    state: State                    # the new global state, factors at rank r_max
    update: Update                  # aggregate update per layer (d_out x d_in) / dense key
    weights: np.ndarray             # (K,) share of each device in the aggregate
    accepted: np.ndarray            # (K,) bool: False = refused (log node and reason)
    reasons: list[str | None]       # why refused or altered (clipped, trimmed); None if not
    svd_error: dict[str, float]     # per layer ||B'A' - W||_F / ||W||_F of the refactorisation


# ---------------------------------------------------------------- updates, layer by layer

def update_of(sent: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray]) -> Update:
    """Delta per layer B'A' - BA (d_out x d_in) and per dense key x' - x, float64."""
    return {key: _delta(sent, trained, key) for key in update_keys(sent)}


def update_keys(state: Mapping[str, np.ndarray]) -> list[str]:
    """The coordinates' blocks in order: the adapted layers (sorted prefixes), then the dense
    keys (the head) in the state's order; base deltas are not trained."""
    return lora_layers(state) + [k for k in state
                                 if not is_lora_key(k) and not is_base_delta_key(k)]


def _delta(sent: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray],
           key: str) -> np.ndarray:
    if key + ".lora_A.weight" in sent:
        (b0, a0), (b1, a1) = factors(sent, key), factors(trained, key)
        return (b1.astype(np.float64) @ a1.astype(np.float64)
                - b0.astype(np.float64) @ a0.astype(np.float64))
    return trained[key].astype(np.float64) - sent[key].astype(np.float64)


def _shape(state: Mapping[str, np.ndarray], key: str) -> tuple:
    if key + ".lora_A.weight" in state:
        b, a = factors(state, key)
        return (b.shape[0], a.shape[1])
    return tuple(state[key].shape)


class Updates:
    """The K devices' updates, one block (layer or dense key) at a time: block(key) is the
    (K, size) float64 matrix of that block's flattened updates, formed from the factors on
    demand and never kept."""

    def __init__(self, sent: Sequence[Mapping[str, np.ndarray]],
                 states: Sequence[Mapping[str, np.ndarray]]):
        if len(sent) != len(states) or not states:
            raise ValueError(f"got {len(states)} replies for {len(sent)} sent states: pass "
                             "one sent state per reply, in the same order")
        self.sent, self.states = list(sent), list(states)
        self.keys = update_keys(sent[0])
        self.shapes = [_shape(sent[0], key) for key in self.keys]
        for k in range(len(states)):
            for which in (sent[k], states[k]):
                if update_keys(which) != self.keys or any(
                        _shape(which, key) != shape for key, shape in zip(self.keys,
                                                                         self.shapes)):
                    raise ValueError(f"device {k}'s update has other layers or shapes than "
                                     "device 0's: check that every reply was validated "
                                     "(check_reply) first")

    def __len__(self) -> int:
        return len(self.states)

    @property
    def size(self) -> int:
        """D: the number of coordinates."""
        return int(sum(np.prod(s) for s in self.shapes))

    def block(self, key: str) -> np.ndarray:
        return np.stack([_delta(s, t, key).ravel() for s, t in zip(self.sent, self.states)])

    def blocks(self):
        """(key, shape, (K, size) block) for every block, in order."""
        for key, shape in zip(self.keys, self.shapes):
            yield key, shape, self.block(key)

    def gram(self, extra: Update | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(K x K inner products of the updates, (K,) inner products with `extra`, an update
        of the same blocks (FLTrust's root update), or zeros)."""
        k = len(self)
        gram, cross = np.zeros((k, k)), np.zeros(k)
        for key, _, block in self.blocks():
            gram += block @ block.T
            if extra is not None:
                cross += block @ extra[key].ravel()
        return gram, cross

    def combine(self, weights: np.ndarray) -> Update:
        """sum_k weights_k Delta_k, per block."""
        return {key: (weights @ block).reshape(shape) for key, shape, block in self.blocks()}

    def matrix(self) -> np.ndarray:
        """(K, D) all blocks side by side: small federations and tests only."""
        return np.concatenate([block for _, _, block in self.blocks()], axis=1)


def stack(updates: Sequence[Update]) -> tuple[np.ndarray, list[str], list[tuple]]:
    """(K, D) matrix of flattened updates, with the key order and shapes to undo it."""
    keys = list(updates[0])
    for k, u in enumerate(updates):
        if list(u) != keys or any(u[x].shape != updates[0][x].shape for x in keys):
            raise ValueError(f"device {k}'s update has other layers or shapes than device 0's:"
                             f" check that every reply was validated (check_reply) first")
    shapes = [updates[0][x].shape for x in keys]
    matrix = np.stack([np.concatenate([u[x].ravel() for x in keys]) for u in updates])
    return matrix, keys, shapes


def unstack(vector: np.ndarray, keys: list[str], shapes: list[tuple]) -> Update:
    """The (D,) vector back to {key: array of its shape}."""
    out, start = {}, 0
    for key, shape in zip(keys, shapes):
        size = int(np.prod(shape))
        out[key] = vector[start:start + size].reshape(shape)
        start += size
    return out


def apply_update(previous: State, update: Update, r_max: int) -> tuple[State, dict[str, float]]:
    """W = Bbar Abar + G per layer, refactorised at r_max (truncated SVD); dense keys + G.

    Returns the new state (dtypes of `previous`) and per layer the relative SVD error
    ||B'A' - W||_F / ||W||_F (0 when rank(W) <= r_max)."""
    out: State = {}
    errors: dict[str, float] = {}
    for key, value in previous.items():
        if not is_lora_key(key):
            shift = update.get(key, 0.0)
            out[key] = (value.astype(np.float64) + shift).astype(value.dtype)
    for prefix in lora_layers(previous):
        b0, a0 = factors(previous, prefix)
        target = b0.astype(np.float64) @ a0.astype(np.float64) + update[prefix]  # d_out x d_in
        b, a = factorize(target, r_max)  # (d_out x r_max), (r_max x d_in)
        norm = np.linalg.norm(target)
        errors[prefix] = float(np.linalg.norm(b @ a - target) / norm) if norm > 0 else 0.0
        out[prefix + ".lora_B.weight"] = b.astype(b0.dtype)
        out[prefix + ".lora_A.weight"] = a.astype(a0.dtype)
    return out, errors


def finish(previous: State, update: Update, weights: np.ndarray, accepted: np.ndarray,
           reasons: list[str | None], r_max: int) -> RobustResult:
    """The RobustResult of an aggregate update: the new state refactorised at r_max."""
    state, errors = apply_update(previous, update, r_max)
    return RobustResult(state, update, weights, accepted, reasons, errors)


# ---------------------------------------------------------------- the statistics

def _trimmed(matrix: np.ndarray, trim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per coordinate: mean of the values ranked trim..K-trim-1; and per device the number
    of coordinates where its value was kept. matrix: (K, D)."""
    k = matrix.shape[0]
    order = np.argsort(matrix, axis=0, kind="stable")        # (K, D)
    kept_rows = order[trim:k - trim]                          # (K - 2 trim, D)
    aggregate = np.take_along_axis(matrix, kept_rows, axis=0).mean(axis=0)  # (D,)
    kept = np.bincount(kept_rows.ravel(), minlength=k)                      # (K,)
    return aggregate, kept


def _coordinate_result(previous, sent, states, r_max, trim: int, name: str) -> RobustResult:
    updates = Updates(sent, states)
    k = len(updates)
    update, kept = {}, np.zeros(k)
    for key, shape, block in updates.blocks():  # coordinate-wise: block by block
        aggregate, used = _trimmed(block, trim)
        update[key] = aggregate.reshape(shape)
        kept += used
    share = kept / updates.size
    expected = (k - 2 * trim) / k  # a device's share if ranks were random
    accepted = share >= 0.5 * expected
    reasons = [None if ok else f"{name}: value used in {100 * s:.0f}% of coordinates, under "
               f"half the {100 * expected:.0f}% expected" for ok, s in zip(accepted, share)]
    return finish(previous, update, share / share.sum(), accepted, reasons, r_max)


def coordinate_median(previous: State, sent: Sequence[State], states: Sequence[State],
                      num_examples: Sequence[int], r_max: int) -> RobustResult:
    """Coordinate-wise median of the updates (Yin et al., ICML 2018), unweighted: the middle
    value (K odd) or the mean of the two middle values (K even) of every entry of every
    layer's Delta. Weight = share of coordinates where the device's value was used."""
    trim = (len(states) - 1) // 2
    return _coordinate_result(previous, sent, states, r_max, trim, "median")


def trimmed_mean(previous: State, sent: Sequence[State], states: Sequence[State],
                 num_examples: Sequence[int], r_max: int, beta: float = 0.1) -> RobustResult:
    """Coordinate-wise beta-trimmed mean (Yin et al., ICML 2018): per entry drop the
    floor(beta K) largest and smallest values, average the rest (unweighted)."""
    k = len(states)
    trim = int(np.floor(beta * k))
    if not 0.0 <= beta < 0.5 or k - 2 * trim < 1:
        raise ValueError(f"robust trimmed-mean beta={beta} must be in [0, 0.5) and leave at "
                          f"least one of the {k} devices: lower beta")
    return _coordinate_result(previous, sent, states, r_max, trim, "trimmed mean")


def krum_scores(matrix: np.ndarray, f: int, gram: np.ndarray | None = None) -> np.ndarray:
    """Krum score per device (Blanchard et al., NeurIPS 2017): the sum of squared distances
    to its K - f - 2 nearest other updates. matrix: (K, D) -> (K,); or gram: the (K, K)
    inner products (then matrix may be None)."""
    gram = matrix @ matrix.T if gram is None else gram
    k = gram.shape[0]
    _enough_for_krum(k, f)
    sq = np.diag(gram)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)             # (K, K)
    np.fill_diagonal(dist, np.inf)
    nearest = np.sort(dist, axis=1)[:, :k - f - 2]                               # (K, K-f-2)
    return nearest.sum(axis=1)


def _enough_for_krum(k: int, f: int) -> None:
    if f < 0:
        raise ValueError(f"Krum's f={f} Byzantine devices must be >= 0")
    if k < 2 * f + 3:
        raise TooFewReplies(f"Krum with f={f} Byzantine devices needs K >= 2f + 3 replies, "
                            f"got {k}: lower robust f or wait for more replies")


def multi_krum(previous: State, sent: Sequence[State], states: Sequence[State],
               num_examples: Sequence[int], r_max: int, f: int = 1,
               m: int | None = None) -> RobustResult:
    """Multi-Krum (El Mhamdi et al., ICML 2018): the m devices of lowest Krum score are kept
    and their updates averaged by example counts; the others are refused. m defaults to
    K - f; m = 1 is Krum."""
    updates = Updates(sent, states)
    k = len(states)
    m = k - f if m is None else m
    _enough_for_krum(k, f)
    if not 1 <= m <= k:
        raise ValueError(f"multi-Krum m={m} must be between 1 and the {k} replies")
    scores = krum_scores(None, f, gram=updates.gram()[0])
    chosen = np.argsort(scores, kind="stable")[:m]
    accepted = np.zeros(k, dtype=bool)
    accepted[chosen] = True
    weights = np.where(accepted, example_weights(num_examples), 0.0)
    weights /= weights.sum()
    reasons = [None if ok else f"krum: score {s:.4g} not among the {m} lowest"
               for ok, s in zip(accepted, scores)]
    return finish(previous, updates.combine(weights), weights, accepted, reasons, r_max)


def krum(previous: State, sent: Sequence[State], states: Sequence[State],
         num_examples: Sequence[int], r_max: int, f: int = 1) -> RobustResult:
    """Krum: the single update of lowest Krum score is the aggregate."""
    return multi_krum(previous, sent, states, num_examples, r_max, f=f, m=1)


def norm_clip(previous: State, sent: Sequence[State], states: Sequence[State],
              num_examples: Sequence[int], r_max: int, tau: float | None = None) -> RobustResult:
    """Norm clipping (Sun et al., 2019, "Can you really backdoor FL?"): each update is
    scaled by min(1, tau / ||Delta_k||), then averaged by example counts. tau defaults to the
    median of the update norms (whole-model norm, all layers and dense keys)."""
    updates = Updates(sent, states)
    norms = np.sqrt(np.maximum(np.diag(updates.gram()[0]), 0.0))             # (K,)
    tau = float(np.median(norms)) if tau is None else tau
    if not tau > 0:
        raise ValueError(f"robust norm-clip tau={tau} must be > 0 (leave it unset for the "
                         f"median update norm)")
    scale = np.minimum(1.0, tau / np.maximum(norms, 1e-300))                # (K,)
    weights = example_weights(num_examples)
    reasons = [None if c >= 1.0 else f"clipped: norm {n:.4g} > tau {tau:.4g}"
               for c, n in zip(scale, norms)]
    share = weights * scale
    return finish(previous, updates.combine(weights * scale), share / share.sum(),
                  np.ones(len(states), dtype=bool), reasons, r_max)


def fltrust(previous: State, sent: Sequence[State], states: Sequence[State],
            num_examples: Sequence[int], r_max: int, root_update: Update) -> RobustResult:
    """FLTrust (Cao et al., NDSS 2021): with g0 the server's update on its small root set
    (`update_of(global, root-trained)`), TS_k = ReLU(cos(Delta_k, g0)); each Delta_k is
    rescaled to ||g0||, and G = sum_k TS_k (||g0|| / ||Delta_k||) Delta_k / sum_k TS_k.
    Example counts are not used (as in the paper). A device with TS_k = 0 is refused; if
    every device is, the global model does not move."""
    updates = Updates(sent, states)
    if list(root_update) != updates.keys or any(
            tuple(root_update[key].shape) != shape for key, shape in zip(updates.keys,
                                                                       updates.shapes)):
        raise ValueError("root_update must have the devices' layers and dense keys: build it "
                         "with update_of(global state, state trained on the root set)")
    g0_norm = float(np.sqrt(sum(float(np.sum(v * v)) for v in root_update.values())))
    if g0_norm == 0:
        raise ValueError("FLTrust root update is zero: train the server's root set first")
    gram, cross = updates.gram(root_update)
    norms = np.maximum(np.sqrt(np.maximum(np.diag(gram), 0.0)), 1e-300)     # (K,)
    cosine = cross / (norms * g0_norm)
    trust = np.maximum(0.0, cosine)                                          # (K,)
    total = trust.sum()
    weights = trust / total if total > 0 else np.zeros_like(trust)
    update = updates.combine(weights * g0_norm / norms) if total > 0 else \
        {key: np.zeros(shape) for key, shape in zip(updates.keys, updates.shapes)}
    accepted = trust > 0
    reasons = [None if ok else f"fltrust: cosine to root update {c:.3g} <= 0"
               for ok, c in zip(accepted, cosine)]
    return finish(previous, update, weights, accepted, reasons, r_max)


def weighted_mean(previous: State, sent: Sequence[State], states: Sequence[State],
                  num_examples: Sequence[int], r_max: int) -> RobustResult:
    """The plain (non-robust) example-weighted mean of the product updates: the baseline."""
    updates = Updates(sent, states)
    weights = example_weights(num_examples)
    return finish(previous, updates.combine(weights), weights,
                  np.ones(len(states), dtype=bool), [None] * len(states), r_max)


@dataclass(frozen=True)
class RobustRule:
    """One robust rule (`robust.aggregator`): `fn(previous, sent, states, num_examples,
    r_max, **params) -> RobustResult` (calling the rule calls it), `params(robust)`: its
    keyword arguments from the `robust.*` section; `needs_root_update`: it also takes
    `root_update`, the update the server trains on its own root set (FLTrust)."""

    fn: Callable[..., RobustResult]
    params: Callable[..., dict] = lambda robust: {}
    needs_root_update: bool = False

    def __call__(self, *args, **kwargs) -> RobustResult:
        return self.fn(*args, **kwargs)


# The robust rules (`robust.aggregator`; 'none' leaves the strategy's own aggregation): a
# `edge_lam.config.registry.Registry`, kind "robust rule" (a third-party rule registers through the
# `edge_lam.robust_rule` entry points, a RobustRule or a bare function of no parameters).
ROBUST_AGGREGATORS: Registry[RobustRule] = registry("robust rule", key="robust.aggregator")
for _name, _rule in (
        ("mean", RobustRule(weighted_mean)), ("median", RobustRule(coordinate_median)),
        ("trimmed-mean", RobustRule(trimmed_mean, lambda r: {"beta": r.beta})),
        ("krum", RobustRule(krum, lambda r: {"f": r.f})),
        ("multi-krum", RobustRule(multi_krum, lambda r: {"f": r.f})),
        ("norm-clip", RobustRule(norm_clip, lambda r: {"tau": r.tau or None})),
        ("fltrust", RobustRule(fltrust, needs_root_update=True))):
    ROBUST_AGGREGATORS.register(_name, _rule)
