"""S6 robust aggregation on LoRA products (strategies.robust.math) and the Byzantine replies
(strategies.robust.attacks): hand computations on 1 x 2 layers, robustness to one attacker of
five with mixed ranks (2, 4, 8), invariance to re-factorisations B R, R^-1 A, and the SVD
refactorisation of the new global."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.lora.math import factorize
from strategies.robust import attacks
from strategies.robust.math import (
    ROBUST_AGGREGATORS,
    TooFewReplies,
    apply_update,
    coordinate_median,
    fltrust,
    krum,
    krum_scores,
    multi_krum,
    norm_clip,
    trimmed_mean,
    update_of,
    weighted_mean,
)
from edge_lam.training.lora import lora_products, truncate_lora
from edge_lam.config.options import ConfigError

L = "layer"
B_KEY, A_KEY = f"{L}.lora_B.weight", f"{L}.lora_A.weight"


def _state(product, rank, head):
    """A state whose layer product is `product` (exact when its rank <= rank)."""
    b, a = factorize(np.asarray(product, dtype=np.float64), rank)
    return {B_KEY: b.astype(np.float32), A_KEY: a.astype(np.float32),
            "head.weight": np.asarray(head, dtype=np.float32)}


def _tiny(products, heads=None):
    """Sent = zero global (1 x 2 layer, rank 1, head of 2): the updates are the replies."""
    heads = heads if heads is not None else [[0.0, 0.0]] * len(products)
    previous = {B_KEY: np.zeros((1, 1), np.float32), A_KEY: np.ones((1, 2), np.float32),
                "head.weight": np.zeros(2, np.float32)}
    states = [_state([p], 1, h) for p, h in zip(products, heads)]
    return previous, [previous] * len(states), states


def _product(state):
    return lora_products(state)[L]


def test_median_by_hand():
    previous, sent, states = _tiny([[1, 2], [3, -1], [10, 0]], [[0, 1], [2, 2], [5, -4]])
    out = coordinate_median(previous, sent, states, [1, 1, 1], 1)
    np.testing.assert_allclose(out.update[L], [[3, 0]], atol=1e-6)
    np.testing.assert_allclose(out.update["head.weight"], [2, 1], atol=1e-6)
    np.testing.assert_allclose(_product(out.state), [[3, 0]], atol=1e-6)  # rank 1 = r_max
    np.testing.assert_allclose(out.state["head.weight"], [2, 1], atol=1e-6)
    # medians come from dev1 (3), dev2 (0), dev1 (2), dev0 (1): shares 1/4, 1/2, 1/4
    np.testing.assert_allclose(out.weights, [0.25, 0.5, 0.25])
    assert out.accepted.all() and out.reasons == [None] * 3


def test_median_even_count_averages_middle_pair():
    previous, sent, states = _tiny([[1, 0], [2, 0], [4, 0], [100, 0]])
    out = coordinate_median(previous, sent, states, [1, 1, 1, 1], 1)
    np.testing.assert_allclose(out.update[L], [[3, 0]], atol=1e-5)


def test_trimmed_mean_by_hand():
    previous, sent, states = _tiny([[1, 5], [2, -50], [3, 6], [4, 7], [90, 8]])
    out = trimmed_mean(previous, sent, states, [1] * 5, 1, beta=0.2)  # drop 1 each side
    np.testing.assert_allclose(out.update[L], [[3, 6]], atol=1e-5)  # (2+3+4)/3, (5+6+7)/3
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(previous, sent, states, [1] * 5, 1, beta=0.5)


def test_krum_picks_hand_computed_device():
    # points 0, 1, 2, 4, 100 on one axis; f = 1: sum of squared distances to 2 nearest:
    # dev0: 1 + 4 = 5, dev1: 1 + 1 = 2, dev2: 1 + 4 = 5, dev3: 4 + 9 = 13, dev4: 96^2 + 98^2
    previous, sent, states = _tiny([[0, 0], [1, 0], [2, 0], [4, 0], [100, 0]])
    out = krum(previous, sent, states, [1] * 5, 1, f=1)
    np.testing.assert_allclose(out.update[L], [[1, 0]], atol=1e-5)
    np.testing.assert_array_equal(out.accepted, [False, True, False, False, False])
    assert out.reasons[4].startswith("krum")
    matrix = np.array([[0.0], [1], [2], [4], [100]])
    np.testing.assert_allclose(krum_scores(matrix, 1), [5, 2, 5, 13, 96 ** 2 + 98 ** 2])
    multi = multi_krum(previous, sent, states, [1] * 5, 1, f=1, m=3)  # devices 1, 0, 2
    np.testing.assert_array_equal(multi.accepted, [True, True, True, False, False])
    np.testing.assert_allclose(multi.update[L], [[1, 0]], atol=1e-5)
    with pytest.raises(TooFewReplies, match="2f \\+ 3"):  # a run-time condition
        krum(previous, sent[:4], states[:4], [1] * 4, 1, f=1)
    with pytest.raises(TooFewReplies, match="2f \\+ 3"):  # before multi-Krum's m check
        multi_krum(previous, sent[:1], states[:1], [1], 1, f=1)
    assert not issubclass(TooFewReplies, ConfigError)


def test_norm_clip_by_hand():
    previous, sent, states = _tiny([[1, 0], [0, 2], [3, 0]])  # norms 1, 2, 3: tau = 2
    out = norm_clip(previous, sent, states, [1, 1, 1], 1)
    np.testing.assert_allclose(out.update[L], [[1, 2 / 3]], atol=1e-5)  # mean of 1,0 0,2 2,0
    assert out.reasons[:2] == [None, None] and "clipped" in out.reasons[2]
    np.testing.assert_allclose(out.weights, np.array([1, 1, 2 / 3]) / (8 / 3), atol=1e-6)
    with pytest.raises(ValueError, match="tau"):
        norm_clip(previous, sent, states, [1, 1, 1], 1, tau=0.0)


def test_fltrust_by_hand():
    previous, sent, states = _tiny([[2, 0], [1, 1], [-3, 0]])
    root = {L: np.array([[1.0, 0.0]]), "head.weight": np.zeros(2)}
    out = fltrust(previous, sent, states, [1, 1, 1], 1, root_update=root)
    c = 1 / np.sqrt(2)  # trust 1, 1/sqrt2, 0; updates rescaled to norm 1
    np.testing.assert_allclose(out.weights, np.array([1, c, 0]) / (1 + c), atol=1e-6)
    np.testing.assert_allclose(out.update[L], [[1.5 / (1 + c), 0.5 / (1 + c)]], atol=1e-5)
    np.testing.assert_array_equal(out.accepted, [True, True, False])
    assert "cosine" in out.reasons[2]


# ------------------------------------------------------------ five devices, ranks 2 4 8 4 2

RANKS = [2, 4, 8, 4, 2]
D_OUT, D_IN, R_MAX = 10, 9, 8


def _federation(seed=0):
    """Global with B = 0 (fresh adapter); honest updates = D + 5% rank-1 noise (rank 2)."""
    rng = np.random.default_rng(seed)
    previous = {B_KEY: np.zeros((D_OUT, R_MAX), np.float32),
                A_KEY: rng.standard_normal((R_MAX, D_IN)).astype(np.float32),
                "head.weight": np.zeros(3, np.float32)}
    u, v = rng.standard_normal(D_OUT), rng.standard_normal(D_IN)
    direction = np.outer(u, v) / np.linalg.norm(u) / np.linalg.norm(v)  # ||D|| = 1
    sent = [truncate_lora(previous, r) for r in RANKS]
    trained = []
    for r in RANKS:
        p, q = rng.standard_normal(D_OUT), rng.standard_normal(D_IN)
        noise = 0.05 * np.outer(p, q) / np.linalg.norm(p) / np.linalg.norm(q)
        trained.append(_state(direction + noise, r, 0.5 + 0.02 * rng.standard_normal(3)))
    return previous, sent, trained, direction


def _distance(result, honest):
    return np.linalg.norm(result.update[L] - honest) / np.linalg.norm(honest)


METHODS = {"median": {}, "trimmed-mean": {"beta": 0.2}, "krum": {"f": 1},
           "multi-krum": {"f": 1}, "norm-clip": {}, "fltrust": None}


def _run(name, previous, sent, states, direction):
    params = METHODS[name]
    if params is None:  # the server's root update: the honest direction, its own noise-free run
        params = {"root_update": {L: direction, "head.weight": np.full(3, 0.5)}}
    return ROBUST_AGGREGATORS[name](previous, sent, states, [1] * 5, R_MAX, **params)


@pytest.mark.parametrize("attack", ["scale", "sign_flip"])
def test_robust_methods_resist_one_attacker_of_five(attack):
    previous, sent, trained, direction = _federation()
    honest = np.mean([update_of(s, t)[L] for s, t in zip(sent[:4], trained[:4])], axis=0)
    poisoned = getattr(attacks, attack)(sent[4], trained[4])
    states = trained[:4] + [poisoned]
    plain = _distance(weighted_mean(previous, sent, states, [1] * 5, R_MAX), honest)
    assert plain > (1.5 if attack == "scale" else 0.35)  # x10: (4 + 10) / 5; flip: (4 - 1) / 5
    for name in METHODS:
        if name == "norm-clip" and attack == "sign_flip":
            continue  # a flipped update of honest norm passes clipping (checked below)
        result = _run(name, previous, sent, states, direction)
        assert _distance(result, honest) < 0.06, name  # measured: 0.00-0.044
    refused = _run("multi-krum", previous, sent, states, direction)  # keeps K - f = 4
    assert not refused.accepted[4] and refused.accepted[:4].all() and refused.reasons[4]
    if attack == "sign_flip":
        assert _run("fltrust", previous, sent, states, direction).weights[4] == 0.0
    clipped = _run("norm-clip", previous, sent, states, direction)
    # clipping bounds the attacker to norm tau: at most ~2 tau / K away (0.4 here), so a flip
    # of honest norm still moves it as far as the plain mean: use it with another method
    assert _distance(clipped, honest) < (0.06 if attack == "scale" else 0.45)


def test_rotated_factors_give_identical_aggregation():
    previous, sent, trained, direction = _federation(seed=3)
    rng = np.random.default_rng(7)
    rotated = []
    for state in trained:
        r = state[A_KEY].shape[0]
        mix = np.eye(r) + 0.3 * rng.standard_normal((r, r))  # invertible, not orthogonal
        b = state[B_KEY].astype(np.float64) @ mix
        a = np.linalg.solve(mix, state[A_KEY].astype(np.float64))
        rotated.append({**state, B_KEY: b, A_KEY: a})
        assert not np.allclose(b, state[B_KEY], atol=1e-3)  # factors really differ
    for name in METHODS:
        one = _run(name, previous, sent, trained, direction)
        two = _run(name, previous, sent, rotated, direction)
        np.testing.assert_allclose(two.update[L], one.update[L], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(two.weights, one.weights, atol=1e-5, err_msg=name)


def test_global_product_exact_when_rank_fits():
    previous, sent, trained, _ = _federation(seed=1)
    out = krum(previous, sent, trained, [1] * 5, R_MAX, f=1)  # one update: rank <= 2
    np.testing.assert_allclose(_product(out.state), out.update[L], atol=1e-5)
    assert out.svd_error[L] < 1e-6
    assert out.state[B_KEY].shape == (D_OUT, R_MAX) and out.state[A_KEY].shape == (R_MAX, D_IN)
    # the median of rank-2 products has full rank 9 > r_max: the error is reported exactly
    med = coordinate_median(previous, sent, trained, [1] * 5, R_MAX)
    target = med.update[L]
    expected = np.linalg.norm(_product(med.state) - target) / np.linalg.norm(target)
    assert med.svd_error[L] == pytest.approx(expected, rel=1e-3) and expected > 0
    state, _ = apply_update(previous, med.update, D_IN)  # r_max >= rank: exact
    np.testing.assert_allclose(_product(state), target, atol=1e-5)


# ------------------------------------------------------------ attacks

def test_attacks_keep_shapes_and_poison_the_product():
    _, sent, trained, _ = _federation(seed=2)
    honest = update_of(sent[1], trained[1])
    for poisoned, factor in ((attacks.scale(sent[1], trained[1]), 10.0),
                             (attacks.sign_flip(sent[1], trained[1]), -1.0)):
        assert {k: v.shape for k, v in poisoned.items()} == \
            {k: v.shape for k, v in trained[1].items()}
        got = update_of(sent[1], poisoned)
        np.testing.assert_allclose(got[L], factor * honest[L], atol=1e-4)
        np.testing.assert_allclose(got["head.weight"], factor * honest["head.weight"], atol=1e-4)
    noisy = attacks.gaussian(sent[0], trained[0], 1.0, np.random.default_rng(0))
    assert noisy[B_KEY].shape == trained[0][B_KEY].shape  # rank 2 kept
    assert np.linalg.norm(update_of(sent[0], noisy)["head.weight"]) > 0.1


def test_colluding_pair_sends_negated_honest_mean():
    _, sent, trained, _ = _federation(seed=4)
    out = attacks.collude(sent, trained, [3, 4], factor=2.0)
    honest = np.mean([update_of(s, t)[L] for s, t in zip(sent[:3], trained[:3])], axis=0)
    # the crafted update has rank 4: exact at rank 4 (device 3), best rank-2 at device 4
    np.testing.assert_allclose(update_of(sent[3], out[3])[L], -2.0 * honest, atol=1e-4)
    b, a = factorize(-2.0 * honest, 2)  # sent product is 0 (B = 0)
    np.testing.assert_allclose(update_of(sent[4], out[4])[L], b @ a, atol=1e-4)
    assert all(out[k] is trained[k] for k in range(3))
    with pytest.raises(ValueError, match="colluders"):
        attacks.collude(sent, trained, list(range(5)))


def test_pick_attackers_fraction():
    rng = np.random.default_rng(0)
    assert len(attacks.pick_attackers(10, 0.3, rng)) == 3
    assert len(attacks.pick_attackers(5, 0.1, rng)) == 1
    with pytest.raises(ValueError, match="fraction"):
        attacks.pick_attackers(10, 0.6, rng)


def test_trust_from_earlier_rounds_weighs_the_contribution_vote():
    """robust.trust-alpha < 1: t = this round's weights x each device's trust from the rounds
    before (its last weight x K); a device refused last round (trust 0) gets none of the
    trust share, a new device counts as an equal share."""
    from strategies.robust.aggregate import RobustRound
    from edge_lam.config.run_config import RunConfig

    cfg = RunConfig.from_run_config({"robust.contribution": "softmax",
                                     "robust.trust-alpha": 0.5})
    rnd = RobustRound(cfg, ("a", "b"))
    rnd.trust.update({1: 0.0, 2: 2.0})  # node 1 refused, node 2 twice an equal share
    rnd._trust_before = dict(rnd.trust)
    w = np.array([0.25, 0.25, 0.5])
    got = rnd._reweighted(np.zeros(3), w, [1, 2, 3])
    t = w * np.array([0.0, 2.0, 1.0])
    q = got - 0.5 * t / t.sum()  # the contribution half is what softmax of c = 0 gives: w
    np.testing.assert_allclose(q, 0.5 * w)
    np.testing.assert_allclose(got.sum(), 1.0)
    assert got[0] == pytest.approx(0.5 * 0.25)  # no trust share for the refused device


def _benign(k=6, seed=3):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(4, 5))
    return [{"l": base + 0.3 * rng.normal(size=(4, 5)), "h": rng.normal(size=3)}
            for _ in range(k)]


def test_alie_is_mean_minus_z_std_with_baruchs_z():
    # n = 10 devices, f = 2 attackers: s = floor(10/2 + 1) - 2 = 4, z = Phi^-1(6/10)
    assert attacks.alie_z(10, 2) == pytest.approx(0.2533471, abs=1e-6)
    benign = _benign()
    got = attacks.alie(benign, 10, 2)
    for key in ("l", "h"):
        x = np.stack([b[key] for b in benign])
        np.testing.assert_allclose(got[key], x.mean(0) - 0.2533471 * x.std(0), atol=1e-6)


@pytest.mark.parametrize("name", ["min_max", "min_sum"])
def test_min_max_and_min_sum_push_as_far_as_the_honest_spread_allows(name):
    benign = _benign()
    x = np.stack([np.concatenate([b["h"], b["l"].ravel()]) for b in benign])
    crafted = getattr(attacks, name)(benign)
    m = np.concatenate([crafted["h"], crafted["l"].ravel()])
    dists = np.linalg.norm(x - m, axis=1)
    pair = np.linalg.norm(x[:, None] - x[None], axis=-1)
    bound, used = ((pair.max(), dists.max()) if name == "min_max" else
                   ((pair ** 2).sum(1).max(), (dists ** 2).sum()))
    assert used <= bound * (1 + 1e-9) and used >= bound * (1 - 1e-6)  # at the boundary
    sd = x.std(0)
    direction = (m - x.mean(0)) / np.linalg.norm(m - x.mean(0))
    np.testing.assert_allclose(direction, -sd / np.linalg.norm(sd), atol=1e-9)  # the std way
