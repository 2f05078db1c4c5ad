"""Differential privacy through Opacus on the PEFT LoRA model (S4 privacy).

Opacus sees only the trainable LoRA factors and head and clips per example; the gradients
sent for unlearning carry noise of scale sigma = z C; epsilon from the accountant rises round
by round and a device stops, and says so, before it would pass dp.target-epsilon.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from client_app.app import app as client_app
from strategies.unlearn.math import unlearning_objective
from edge_lam.training.device import DeviceInfo, gradient_round, local_examples
from inprocess_grid import InProcessGrid
from inprocess_grid import federate, prepare_run
from edge_lam.training.evaluation import ServerModel
from edge_lam.config.run_config import RunConfig
from edge_lam.training.lora import truncate_lora
from edge_lam.models.lora_model import get_lora_model
from edge_lam.training.privacy import DevicePrivacy


def _cfg(tiny_bert, agnews, **extra):
    return RunConfig.from_run_config({
        "model": str(tiny_bert), "data.path": str(agnews), "eval.max-examples": 16,
        "train.batch-size": 8, "train.local-steps": 2, "data.partitioner": "iid",
        "dp.enabled": True, **extra})


def test_opacus_clips_per_example_on_trainable_lora_params_only(tiny_bert, agnews):
    cfg = _cfg(tiny_bert, agnews, **{"dp.noise-multiplier": 0.3, "dp.max-grad-norm": 1e-3,
                                     "dp.target-epsilon": 1e9})
    # the model as a fresh device process has it: after test_lora_aggregators' fedex/flora
    # runs in the same process the plain gradient below came out at 0.04-0.09 instead of
    # > 0.1 (the shared cached model keeps some history; not yet pinned down)
    from edge_lam.models import lora_model
    lora_model._MODELS.clear()
    lora_model._INITIAL.clear()
    task = ServerModel.prepare(cfg)
    model = get_lora_model(cfg, task.label_names, 4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n and "rank-4" in n) or "classifier" in n
                             for n in trainable)
    info = DeviceInfo(partition_id=0, num_partitions=4)
    privacy = DevicePrivacy(cfg, len(local_examples(cfg, info, task.label_names)))
    state = truncate_lora(task.initial_state(), 4)
    state["base_model.model.classifier.weight"] *= 50  # large plain gradients
    grads, _, metrics = gradient_round(cfg, info, task.label_names, 4, state, 1,
                                       cfg.unlearn.grad_batches, privacy=privacy)
    plain, _, _ = gradient_round(cfg, info, task.label_names, 4, state, 1,
                                 cfg.unlearn.grad_batches)
    norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    plain_norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in plain.values()))
    # mean of per-example gradients clipped to C = 1e-3 (Poisson batch ~ 8 examples), plus
    # noise of std 0.3 C / 8 per entry, averaged over 4 batches
    assert metrics["batches"] == metrics["private_steps"] == cfg.unlearn.grad_batches
    assert plain_norm > 0.1 and 0 < norm < 3e-3, (norm, plain_norm)
    assert metrics["epsilon"] > 0
    # frozen weights untouched, Opacus hooks gone: the cached model is plain again
    for name, p in model.named_parameters():
        assert not hasattr(p, "grad_sample")
        if name in frozen:
            torch.testing.assert_close(p, frozen[name])
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == hooks


def test_unlearning_gradients_carry_noise_of_scale_z_times_c(tiny_bert, agnews):
    z, clip = 4.0, 0.5
    cfg = _cfg(tiny_bert, agnews, **{"dp.noise-multiplier": z, "dp.max-grad-norm": clip,
                                     "dp.target-epsilon": 1e9, "unlearn.grad-batches": 1})
    task = ServerModel.prepare(cfg)
    info = DeviceInfo(partition_id=2, num_partitions=4)
    privacy = DevicePrivacy(cfg, len(local_examples(cfg, info, task.label_names)))
    state = truncate_lora(task.initial_state(), 8)
    grads, _, _ = gradient_round(cfg, info, task.label_names, 8, state, 1,
                                 cfg.unlearn.grad_batches,
                                 unlearning_objective(cfg.unlearn.loss, cfg.unlearn.eps),
                                 privacy=privacy)
    flat = np.concatenate([g.ravel() for g in grads.values()])  # (p,)
    # S4: g~ = g + N(0, sigma^2 I), sigma = z C on the sum of a batch of expected size B;
    # the clipped signal is at most C / B in norm, so the entries' spread is the noise's
    expected_std = z * clip / int(privacy.num_examples * privacy.sample_rate)  # Opacus's B
    assert flat.std() == pytest.approx(expected_std, rel=0.1)


def _epsilon_after(steps: int, z: float, sample_rate: float, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=z, sample_rate=sample_rate)
    accountant.history = [(z, sample_rate, steps)]
    return accountant.get_epsilon(delta)


def test_epsilon_rises_per_round_and_a_device_stops_past_its_budget(tiny_bert, agnews,
                                                                    tmp_path, caplog):
    z = 1.0
    raw = {"model": str(tiny_bert), "data.path": str(agnews), "eval.max-examples": 16,
           "train.batch-size": 8, "train.local-steps": 2, "data.partitioner": "iid",
           "strategy": "fedavg", "lora.fedavg-rank": 2, "num-server-rounds": 3,
           "results-dir": str(tmp_path), "dp.enabled": True, "dp.noise-multiplier": z}
    cfg = RunConfig.from_run_config(raw)
    task = ServerModel.prepare(cfg)
    sample_rate = DevicePrivacy(cfg, len(local_examples(
        cfg, DeviceInfo(partition_id=0, num_partitions=2), task.label_names))).sample_rate
    # budget: 3 steps fit, a 4th does not -> round 1: 2 steps, round 2: 1 step then stop
    budget = (_epsilon_after(3, z, sample_rate, 1e-5) + _epsilon_after(4, z, sample_rate,
                                                                       1e-5)) / 2
    raw["dp.target-epsilon"] = budget
    grid = InProcessGrid(raw, num_nodes=2)
    with caplog.at_level(logging.WARNING, logger="edge_lam"):
        logging.getLogger("edge_lam").addHandler(caplog.handler)
        try:
            run_dir = federate(grid, prepare_run(RunConfig.from_run_config(raw), run_id=1))
        finally:
            logging.getLogger("edge_lam").removeHandler(caplog.handler)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_round = {r["round"]: {c["node_id"]: c for c in r["clients"]} for r in rows}
    for node in grid.contexts:
        first, second = by_round[1][node], by_round[2][node]
        assert 0 < first["epsilon"] < second["epsilon"] <= budget
        assert (first["private_steps"], second["private_steps"]) == (2, 3)
        assert not first["budget_exhausted"] and second["budget_exhausted"]
        assert first["epsilon"] == pytest.approx(_epsilon_after(2, z, sample_rate, 1e-5),
                                                 rel=1e-3)
    assert by_round[3] == {} and rows[3]["budget_exhausted"] == sorted(grid.contexts)
    assert sum("privacy budget exhausted" in r.getMessage() for r in caplog.records) == 2
    # the device itself refuses once its ledger is spent, and says so in its reply
    node, context = next(iter(grid.contexts.items()))
    assert json.loads(str(context.state["privacy"]["ledger"]))["history"][0][2] == 3
    msg = grid.sent[-1][1]  # a round-2 TRAIN message to some node
    reply = client_app(msg, grid.contexts[msg.metadata.dst_node_id])
    assert "arrays" not in reply.content
    assert reply.content["metrics"]["budget-exhausted"] == 1
    assert reply.content["metrics"]["epsilon"] <= budget
