"""Checkpoints written before the core was split by concern (issue 26 item 4) still resume,
and end where the run that wrote them ended uninterrupted.

`tests/data/checkpoint_v1/` holds, per scenario, the folder an interrupted run left (its
checkpoint after round 2 of 4) and the uninterrupted run's metrics and final adapter, both
written by commit a82fb57 (`tests/data/checkpoint_v1/make.py`): FedLaAvg (stored updates,
fleet members, the sampling RNG) and multi-Krum with markov availability (S6 trust, the
availability's random state). The resumed run here is a new simulation (new node ids).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "data" / "checkpoint_v1"
_spec = importlib.util.spec_from_file_location("checkpoint_v1_make", FIXTURES / "make.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)


@pytest.fixture(scope="module")
def inputs(agnews, tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny BERT the checkpoints were trained on, their data folder)."""
    tmp = tmp_path_factory.mktemp("legacy-inputs")
    return make.tiny_bert(tmp / "tiny-bert"), make.agnews_33(agnews, tmp / "data")


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _unpacked(name: str, model: Path, data: Path, tmp: Path) -> Path:
    """The fixture's interrupted run folder, its `<model>` / `<data>` made real paths."""
    run_dir = tmp / name / "results" / "12"
    shutil.copytree(FIXTURES / name / "cut", run_dir)
    for path in run_dir.rglob("*.json*"):
        path.write_text(path.read_text().replace("<model>", str(model))
                        .replace("<data>", str(data)))
    return run_dir


@pytest.mark.parametrize("name", sorted(make.SCENARIOS))
def test_an_old_checkpoint_resumes_to_the_uninterrupted_end(name, inputs, tmp_path):
    model, data = inputs
    devices, extra = make.SCENARIOS[name]
    run_dir = _unpacked(name, model, data, tmp_path)
    raw = make.raw_config(model, data, run_dir.parent, extra) | {"resume": str(run_dir)}
    out = make.run(raw, devices, run_id=13, first_node_id=7001)
    assert out == run_dir.resolve()
    got, want = _rows(out / "metrics.jsonl"), _rows(FIXTURES / name / "whole" / "metrics.jsonl")
    assert [r["round"] for r in got] == [r["round"] for r in want] == [0, 1, 2, 3, 4]
    for a, b in zip(got, want):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6), a["round"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["round"]
        ca = sorted(a["clients"], key=lambda c: c["partition_id"])
        cb = sorted(b["clients"], key=lambda c: c["partition_id"])
        assert [(c["partition_id"], c["rank"], c["num_examples"], c["bytes_up"])
                for c in ca] == [(c["partition_id"], c["rank"], c["num_examples"],
                                  c["bytes_up"]) for c in cb], a["round"]
        assert [c["train_loss"] for c in ca] == pytest.approx(
            [c["train_loss"] for c in cb], rel=1e-6)
        assert a.get("fleet", {}).get("selected") == b.get("fleet", {}).get("selected")
        if "robust" in b:  # multi-Krum's weights, in the order of the partitions
            by_node = {c["node_id"]: c["partition_id"] for c in a["clients"]}
            by_node_b = {c["node_id"]: c["partition_id"] for c in b["clients"]}
            wa = {by_node[int(n)]: w for n, w in a["robust"]["weights"].items()}
            wb = {by_node_b[int(n)]: w for n, w in b["robust"]["weights"].items()}
            assert wa == pytest.approx(wb, rel=1e-6), a["round"]
    assert {c["node_id"] for r in got[3:] for c in r["clients"]} <= set(range(7001, 7010))
    from safetensors.numpy import load_file

    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(FIXTURES / name / "whole" / "adapter" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_an_old_checkpoints_strategy_state_round_trips(inputs, tmp_path):
    """Restored from the old checkpoint and met again, every device's saved entries are
    written back under the same names and values (robust: S6 trust, availability)."""
    from strategies.lora import checkpoint
    from edge_lam.config.run_config import RunConfig

    model, data = inputs
    devices, extra = make.SCENARIOS["robust"]
    run_dir = _unpacked("robust", model, data, tmp_path)
    cfg = RunConfig.from_run_config(make.raw_config(model, data, run_dir.parent, extra)
                                    | {"resume": str(run_dir)})
    saved = checkpoint.load(cfg)
    from strategies.lora.strategy import HeterogeneousLoRA

    strategy = HeterogeneousLoRA(cfg, tuple(saved.state["label_names"]))
    strategy.restore_checkpoint(saved.strategy_state, saved.arrays)
    meta, arrays = strategy.checkpoint_state()  # nobody met again: the saved entries as-is
    old = saved.strategy_state
    assert meta["profiles"] == old["profiles"]
    assert meta["trust"] == old["trust"] and meta["exhausted"] == old["exhausted"]
    assert meta["fleet"] == old["fleet"]
    assert meta["latest"] is None and arrays == {}
