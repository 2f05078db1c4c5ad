"""A new algorithm is one registration, no edit to the apps: a toy "median of LoRA products"
algorithm, defined in this file, runs through the real ServerApp mode and ClientApp handlers
over the in-process grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from inprocess_grid import InProcessGrid
from server_app import modes
from strategies import registry
from strategies.lora import device as lora_device
from strategies.lora.math import factorize
from strategies.lora.server import federate, prepare_run
from strategies.lora.strategy import HeterogeneousLoRA
from edge_lam.config.run_config import RunConfig, Traits
from edge_lam.training.lora import factors, lora_layers, lora_products, pad_lora
from edge_lam.records import from_record


def median_aggregate(states, r_max: int) -> dict:
    """Element-wise median of each layer's B_k A_k (robust to one wild device), refactored
    at r_max; other arrays (the head): element-wise median too."""
    padded = [pad_lora(s, r_max) for s in states]
    out = {k: np.median([s[k] for s in padded], axis=0).astype(v.dtype)
           for k, v in padded[0].items() if "lora_" not in k}
    for prefix in lora_layers(padded[0]):
        delta = np.median([lora_products(s)[prefix] for s in padded], axis=0)
        b, a = factorize(delta, r_max)
        dtype = factors(padded[0], prefix)[0].dtype
        out[prefix + ".lora_B.weight"], out[prefix + ".lora_A.weight"] = \
            b.astype(dtype), a.astype(dtype)
    return out


class MedianProducts(HeterogeneousLoRA):
    def _aggregate(self, states, counts, nodes):
        return median_aggregate(states, self.cfg.r_max)


def run(grid, context, cfg):
    return federate(grid, prepare_run(cfg, context.run_id),
                    lambda plan, recorder: MedianProducts(
                        cfg, plan.server_model.label_names, on_train_round=recorder.record_train))


@pytest.fixture
def toy():
    algorithm = registry.register(registry.Algorithm(
        "median-product", "toy: median of the LoRA products", Traits(), run=run,
        handlers={"train": lora_device.train}))
    yield algorithm
    registry.ALGORITHMS.unregister(algorithm.name)


def test_a_registered_algorithm_runs_with_no_edit_to_the_apps(toy, tiny_bert, agnews,
                                                               tmp_path):
    raw = {"model": str(tiny_bert), "data.path": str(agnews), "strategy": "median-product",
           "results-dir": str(tmp_path / "results"), "num-server-rounds": 2,
           "train.local-steps": 2, "train.batch-size": 8, "eval.max-examples": 32,
           "data.partitioner": "iid"}
    cfg = RunConfig.from_run_config(raw)  # the config knows it: strategy is a registered name
    grid = InProcessGrid(raw, num_nodes=3)
    context = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=raw)
    modes.get(cfg.mode)(grid, context, cfg)  # the ServerApp's own dispatch

    run_dir = tmp_path / "results" / "5"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(len(r["clients"]) == 3 and r["rejected"] == 0 for r in rows[1:])
    assert sorted(c["rank"] for c in rows[1]["clients"]) == [2, 4, 8]  # profile ranks
    # the saved adapter is the median of the last round's replies, as defined above
    last = [from_record(m.content["arrays"]) for (rnd, _), m in zip(grid.sent, grid.replies)
            if rnd == 2 and "arrays" in m.content]
    assert len(last) == 3
    expected = median_aggregate(last, cfg.r_max)
    saved = prepare_run(cfg, 5).server_model.load_state(run_dir / "adapter", "adapter")
    for key, value in expected.items():
        np.testing.assert_allclose(saved[key], value, rtol=1e-5, atol=1e-6)
    # and it is not what hetlora would have made of the same replies
    from strategies.lora.math import hetlora_aggregate

    het = hetlora_aggregate(last, [1, 1, 1], cfg.r_max)
    assert any(not np.allclose(het[k], expected[k]) for k in expected if "lora_B" in k)


def test_an_unknown_algorithm_is_refused_naming_the_registered_ones():
    from edge_lam.config.options import ConfigError

    with pytest.raises(ConfigError, match="strategy='median-product' is not known: use one "
                                          "of fedavg, hetlora, flexlora, rankwise, hetlora-sw, "
                                          "flexlora-delta, flora, fedex, fedkd, unlearn"):
        RunConfig.from_run_config({"strategy": "median-product"})
