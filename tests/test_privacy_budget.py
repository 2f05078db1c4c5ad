"""The DP budget, checked against Opacus's own RDP accountant (docs/unlearning-dp.md, its DP
section).

- dp.noise-multiplier=0: the noise multiplier z a device derives from dp.target-epsilon /
  dp.delta spends at most the target over the run's planned releases, and close to it
  (Opacus's get_noise_multiplier stops its search within epsilon_tolerance = 0.01 below
  the target); in an in-process train -> unlearn -> recover run the devices end there.
- node-config privacy-ledger: a device's epsilon continues across runs from the ledger
  file (a restarted device, fresh context.state), and the budget counts both runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader

from edge_lam.training.device import DeviceInfo, local_examples
from inprocess_grid import InProcessGrid
from inprocess_grid import federate, prepare_run
from edge_lam.training.evaluation import ServerModel
from edge_lam.config.run_config import RunConfig
from edge_lam.training.privacy import DevicePrivacy

DELTA = 1e-5
PARTITIONS = 100  # flow tests: iid partitions of AG News' 10,000 training texts (100 each)
TOLERANCE = 0.01  # opacus.accountants.utils.get_noise_multiplier's epsilon_tolerance

# Opacus warns while its binary search probes large sigmas (the best RDP order is then the
# largest one): a bracket point, not the answer.
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    """Epsilon of (noise multiplier, sample rate, steps) releases, by Opacus's accountant."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def loader_sample_rate(num_examples: int, batch_size: int) -> float:
    """The rate Opacus's Poisson loader samples at: DPDataLoader uses 1 / len(loader)."""
    return 1.0 / len(DataLoader(range(num_examples), batch_size=batch_size))


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------- derived noise multiplier
@pytest.mark.parametrize("target, raw", [
    (8.0, {"strategy": "hetlora", "num-server-rounds": 20, "train.local-steps": 10,
           "train.batch-size": 16}),
    (1.0, {"strategy": "fedavg", "num-server-rounds": 3, "train.local-steps": 10,
           "train.batch-size": 64}),
    (3.0, {"strategy": "unlearn", "unlearn.clients": "3", "num-server-rounds": 4,
           "unlearn.rounds": 2, "unlearn.recovery-rounds": 3, "train.local-steps": 10,
           "unlearn.grad-batches": 4, "train.batch-size": 16}),
])
@pytest.mark.parametrize("num_examples", [100, 1000])
def test_derived_noise_multiplier_spends_the_budget_over_the_planned_steps(target, raw,
                                                                          num_examples):
    cfg = RunConfig.from_run_config({**raw, "dp.enabled": True, "dp.noise-multiplier": 0,
                                     "dp.target-epsilon": target, "dp.delta": DELTA})
    planned = cfg.planned_private_steps
    if cfg.strategy == "unlearn":  # (T + R) local steps + U gradient batches
        assert planned == (4 + 3) * 10 + 2 * 4
    else:
        assert planned == cfg.num_rounds * 10
    privacy = DevicePrivacy(cfg, num_examples)
    z, q = privacy.noise_multiplier, privacy.sample_rate
    assert q == loader_sample_rate(num_examples, cfg.train.batch_size)
    spent = opacus_epsilon([(z, q, planned)])
    assert target - TOLERANCE <= spent <= target, (z, spent)
    # the device's own look-ahead agrees: every planned step fits, and (for these budgets,
    # where the 0.01 search tolerance is less than one step's epsilon) not one more
    assert privacy.steps_left(planned + 1000) == planned
    # and a noticeably smaller z would overspend: the derived one is not too generous
    assert opacus_epsilon([(0.95 * z, q, planned)]) > target


def test_devices_end_the_planned_rounds_at_the_derived_budget(tiny_bert, agnews, tmp_path):
    """train (1 round x 2 steps) -> unlearn (1 round x 1 gradient batch) -> recover (1 x 2):
    5 planned releases; z derived from dp.target-epsilon=3 on every device."""
    target, forget = 3.0, 1
    raw = {"model": str(tiny_bert), "data.path": str(agnews),
           "results-dir": str(tmp_path / "results"), "strategy": "unlearn",
           "unlearn.clients": str(forget), "num-server-rounds": 1, "unlearn.rounds": 1,
           "unlearn.recovery-rounds": 1, "unlearn.grad-batches": 1, "train.local-steps": 2,
           "train.batch-size": 8, "eval.max-examples": 16, "eval.batch-size": 16,
           "data.partitioner": "iid", "dp.enabled": True, "dp.noise-multiplier": 0,
           "dp.target-epsilon": target, "dp.delta": DELTA}
    cfg = RunConfig.from_run_config(raw)
    assert cfg.planned_private_steps == 5
    grid = InProcessGrid(raw, num_nodes=4)
    for context in grid.contexts.values():  # 100 texts a device: q = 1/13, not 1/313
        context.node_config["num-partitions"] = PARTITIONS
    run_dir = federate(grid, prepare_run(cfg, run_id=1))
    rows = _rows(run_dir)
    assert [r["phase"] for r in rows] == ["initial", "train", "unlearn", "recover"]
    last = {c["node_id"]: c for r in rows[1:] for c in r["clients"]}  # latest entry per node
    per_round = {node: [c["epsilon"] for r in rows[1:] for c in r["clients"]
                        if c["node_id"] == node] for node in grid.contexts}

    label_names = ServerModel.prepare(cfg).label_names
    for node, context in grid.contexts.items():
        partition = context.node_config["partition-id"]
        n = len(local_examples(cfg, DeviceInfo(partition_id=partition,
                                               num_partitions=PARTITIONS), label_names))
        q = loader_sample_rate(n, cfg.train.batch_size)
        ledger = json.loads(str(context.state["privacy"]["ledger"]))
        z = ledger["noise_multiplier"]
        # what Opacus itself recorded, step by step, during the run
        assert {(h[0], h[1]) for h in ledger["history"]} == {(z, q)}
        steps = sum(h[2] for h in ledger["history"])
        reported = last[node]["epsilon"]
        assert last[node]["private_steps"] == steps
        assert reported == pytest.approx(opacus_epsilon([(z, q, steps)]), rel=1e-9)
        assert per_round[node] == sorted(per_round[node]) and len(set(per_round[node])) \
            == len(per_round[node])  # rising round by round
        if partition == forget:  # no recovery round for it: 2 + 1 of its 5 releases
            assert steps == 3 and len(per_round[node]) == 2
            assert reported < opacus_epsilon([(z, q, 5)]) - 0.1
        else:
            assert steps == 5 and len(per_round[node]) == 3
            assert target - TOLERANCE <= reported <= target, reported
            assert opacus_epsilon([(z, q, 5)]) <= target  # the independent check
        print(f"partition {partition}: n={n} q={q:.3g} z={z:.4f} steps={steps} "
              f"epsilon per round {np.round(per_round[node], 4).tolist()} (target {target})")


# ------------------------------------------------------------- privacy-ledger across runs
def test_privacy_ledger_carries_epsilon_and_the_budget_across_runs(tiny_bert, agnews,
                                                                   tmp_path):
    """Run 1 (2 steps), then run 2 with fresh device processes (new contexts): the device
    with a ledger file continues from run 1's epsilon, the one without starts at 0.

    Devices hold 100 texts each (partitions of 100; batch 8: q = 1/13), where a step moves
    epsilon visibly (2 steps 2.12, 4 steps 2.37 at z = 1).
    """
    z = 1.0
    raw = {"model": str(tiny_bert), "data.path": str(agnews), "eval.max-examples": 16,
           "train.batch-size": 8, "train.local-steps": 2, "data.partitioner": "iid",
           "strategy": "fedavg", "lora.fedavg-rank": 2, "num-server-rounds": 1,
           "results-dir": str(tmp_path / "results"), "dp.enabled": True,
           "dp.noise-multiplier": z, "dp.target-epsilon": 1e3, "dp.delta": DELTA}
    ledger_file = tmp_path / "device-0" / "privacy.json"
    ledger_file.parent.mkdir()

    def run(raw, run_id):
        grid = InProcessGrid(raw, num_nodes=2)
        for context in grid.contexts.values():
            context.node_config["num-partitions"] = PARTITIONS
        node_of = {c.node_config["partition-id"]: n for n, c in grid.contexts.items()}
        grid.contexts[node_of[0]].node_config["privacy-ledger"] = str(ledger_file)
        run_dir = federate(grid, prepare_run(RunConfig.from_run_config(raw), run_id))
        clients = {c["partition_id"]: c for c in _rows(run_dir)[1]["clients"]}
        return clients, grid

    cfg = RunConfig.from_run_config(raw)
    label_names = ServerModel.prepare(cfg).label_names
    q, q_1 = (loader_sample_rate(len(local_examples(
        cfg, DeviceInfo(partition_id=p, num_partitions=PARTITIONS), label_names)),
        cfg.train.batch_size) for p in (0, 1))
    assert q == q_1 == 1 / 13

    first, _ = run(raw, 1)
    run_1 = [(z, q, 2)]
    assert first[0]["private_steps"] == first[1]["private_steps"] == 2
    assert first[0]["epsilon"] == pytest.approx(opacus_epsilon(run_1), rel=1e-9)
    assert json.loads(ledger_file.read_text())["history"] == [[z, q, 2]]

    # run 2: 3 local steps, budget between 4 and 5 steps of both runs together: the device
    # with the ledger takes 2 steps and stops; a fresh one would (and does) take all 3
    budget = (opacus_epsilon([(z, q, 4)]) + opacus_epsilon([(z, q, 5)])) / 2
    assert opacus_epsilon([(z, q, 3)]) < budget
    second, grid = run(raw | {"train.local-steps": 3, "dp.target-epsilon": budget}, 2)
    both_runs = run_1 + [(z, q, 2)]  # Opacus accountant fed both runs' history
    assert second[0]["private_steps"] == 4 and second[0]["budget_exhausted"]
    assert second[0]["epsilon"] == pytest.approx(opacus_epsilon(both_runs), rel=1e-9)
    assert second[0]["epsilon"] > first[0]["epsilon"] + 0.2  # not restarted at 0
    assert first[0]["epsilon"] < second[0]["epsilon"] <= budget
    assert json.loads(ledger_file.read_text())["history"] == [[z, q, 4]]
    # without a ledger file a device restarts: its epsilon is that of run 2 alone
    assert second[1]["private_steps"] == 3 and not second[1]["budget_exhausted"]
    assert second[1]["epsilon"] == pytest.approx(opacus_epsilon([(z, q_1, 3)]), rel=1e-9)
    print(f"q={q:.3g}: run 1 epsilon {first[0]['epsilon']:.4f}; run 2: with ledger "
          f"{second[0]['epsilon']:.4f} (4 steps, budget {budget:.4f}), without "
          f"{second[1]['epsilon']:.4f} (3 steps)")
