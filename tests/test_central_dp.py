"""Central DP through Flower's DP wrapper strategies (`dp.central`, issue 28 item 3): the
devices' updates are clipped (by Flower's fixedclipping_mod on the device, or by the server),
the uniform mean gets Gaussian noise z C / m, it composes with secure aggregation, and the
epsilon in metrics.jsonl is the RDP composition of the rounds' Gaussian releases."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.common import run_inprocess
from edge_lam.config.options import ConfigError
from edge_lam.config.run_config import RunConfig


def _raw(tiny_bert, agnews_short, tmp_path, **extra) -> dict:
    return {"model": str(tiny_bert), "data.path": str(agnews_short(40)), "strategy": "hetlora",
            "results-dir": str(tmp_path / "r"), "num-server-rounds": 2,
            "train.local-steps": 3, "train.batch-size": 4, "eval.max-examples": 0,
            "data.partitioner": "iid", "train.lr": 5e-2, **extra}


def _gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    """(epsilon, delta) of `rounds` Gaussian mechanisms of noise multiplier z, from their
    RDP alpha rounds / (2 z^2), converted as Balle et al. 2020 (what Opacus uses), minimised
    over a fine grid of orders."""
    a = np.linspace(1.001, 512, 400_000)
    rdp = rounds * a / (2 * z * z)
    eps = rdp + np.log1p(-1 / a) - (np.log(delta) + np.log(a)) / (a - 1)
    return float(eps.min())


def _global_change(tiny_bert, agnews_short, tmp_path, **extra) -> tuple[list, float]:
    """(metrics rows, the largest per-round change of the global adapter, as one vector)."""
    import strategies.lora.strategy as lora_strategy

    changes = []
    original = lora_strategy.HeterogeneousLoRA.aggregate_train

    def spy(self, server_round, replies):
        arrays, metrics = original(self, server_round, replies)
        if arrays is not None:
            from edge_lam.records import from_record

            new, old = from_record(arrays), self._round_start
            changes.append(float(np.sqrt(sum(((new[k].astype(np.float64) - old[k]) ** 2).sum()
                                             for k in new if ".lora_" in k))))
        return arrays, metrics

    lora_strategy.HeterogeneousLoRA.aggregate_train = spy
    try:
        rows, _ = run_inprocess(_raw(tiny_bert, agnews_short, tmp_path, **extra), 5, run_id=11)
    finally:
        lora_strategy.HeterogeneousLoRA.aggregate_train = original
    return rows, max(changes)


@pytest.mark.parametrize("extra", [{"dp.central": "client", "strategy": "fedavg"},
                                   {"dp.central": "client", "strategy": "fedavg",
                                    "secure.enabled": True},
                                   {"dp.central": "server", "strategy": "fedavg"}])
def test_clipping_bounds_each_rounds_change_and_epsilon_composes(extra, tiny_bert,
                                                                 agnews_short, tmp_path):
    clip = 1e-3
    rows, moved = _global_change(tiny_bert, agnews_short, tmp_path, **{
        **extra, "dp.central-clip": clip, "dp.central-noise": 1e-6})
    # every device at r_max: the mean of updates clipped to C moves the adapter by at most
    # C (+ noise ~ 1e-9). (With hetlora the zero-padding also resets the components above a
    # device's rank: a public function of the ranks, not of any device's data.)
    assert 0 < moved <= clip * (1 + 1e-4)
    _, free = _global_change(tiny_bert, agnews_short, tmp_path / "free",
                             **{k: v for k, v in extra.items() if k != "dp.central"})
    assert free > 20 * clip  # without DP the same rounds move it far more
    train = [r for r in rows if r["round"] > 0]
    for t, row in enumerate(train, start=1):
        entry = row["central_dp"]
        assert entry["sampled"] == 5 and entry["releases"] == t
        assert entry["noise_std"] == pytest.approx(1e-6 * clip / 5)
        if extra.get("secure.enabled"):
            assert row["secure"]["survived"] and row["aggregation_error"] is None


def test_epsilon_is_the_gaussian_composition(tiny_bert, agnews_short, tmp_path):
    rows, _ = run_inprocess(_raw(tiny_bert, agnews_short, tmp_path, **{
        "dp.central": "client", "dp.central-noise": 1.3, "num-server-rounds": 3}), 4,
        run_id=12)
    eps = [r["central_dp"]["epsilon"] for r in rows if r["round"] > 0]
    for t, e in enumerate(eps, start=1):
        assert e == pytest.approx(_gaussian_epsilon(1.3, t, 1e-5), rel=2e-3)
    assert eps[0] < eps[1] < eps[2]
    assert all(r["central_dp"]["noise_std"] == pytest.approx(1.3 * 0.5 / 4) for r in rows[1:])


def test_central_dp_refusals():
    for extra, why in (({"strategy": "flexlora"}, "uniform mean"),
                       ({"strategy": "hetlora", "dp.central": "server"}, "r_max"),
                       ({"strategy": "fedavg", "dp.central": "server", "secure.enabled": True},
                        "masked"),
                       ({"dp.enabled": True}, "pick one"),
                       ({"lora.server-optimizer": "fedadam"}, "rescales"),
                       ({"robust.aggregator": "median"}, "unequally")):
        with pytest.raises(ConfigError, match=why):
            RunConfig.from_run_config({"dp.central": "client", **extra})
