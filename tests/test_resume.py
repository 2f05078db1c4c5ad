"""Exact resume (R3): every finished round checkpoints the run; `resume='results/<run-id>'`
goes on from the last one and ends where an uninterrupted run of the same seed ends.

The in-process tests interrupt a run by raising from the grid as round 3's first TRAIN message
leaves (after round 2's row and checkpoint), and resume it on a grid of new node ids (as a new
simulation has). The real thing, `flwr run` killed and run again, is `test_e2e_resume.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from inprocess_grid import InProcessGrid

from strategies.lora import checkpoint
from strategies.lora.server import federate, prepare_run
from edge_lam.config.run_config import RunConfig
from edge_lam.config.options import ConfigError


class Crash(Exception):
    """Stands for the server process dying mid-round."""


def _data(agnews: Path, tmp: Path) -> Path:
    data = tmp / "data"
    if not data.exists():
        data.mkdir(parents=True)
        (data / "train.tsv").symlink_to(agnews / "train.tsv")
        lines = (agnews / "test.tsv").read_text().splitlines()
        (data / "test.tsv").write_text("\n".join(lines[:33]) + "\n")
    return data


def _raw(tiny_bert, agnews, tmp: Path, **extra) -> dict:
    # FedLaAvg: 2 of 4 devices a round, every device's latest update in each aggregate: the
    # resumed run needs the stored updates, the fleet's members and the sampling RNG
    return {"model": str(tiny_bert), "data.path": str(_data(agnews, tmp)),
            "strategy": "hetlora", "results-dir": str(tmp / "results"),
            "num-server-rounds": 4, "train.local-steps": 1, "train.batch-size": 4,
            "eval.max-examples": 0, "data.partitioner": "iid", "seed": 7,
            "fleet.selection": "fedlaavg", "fleet.per-round": 2, **extra}


def _run(raw: dict, run_id: int, first_node_id: int = 1001, crash_in_round: int = 0) -> Path:
    grid = InProcessGrid(raw, num_nodes=4, first_node_id=first_node_id)

    def before_send(msg) -> None:
        config = msg.content.config_records.get("config")
        if crash_in_round and config and config.get("server-round") == crash_in_round:
            raise Crash(f"killed in round {crash_in_round}")

    grid.before_send = before_send
    return federate(grid, prepare_run(RunConfig.from_run_config(raw), run_id))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_bert, agnews, tmp_path_factory):
    """An uninterrupted run and one interrupted in round 3 (its folder as the crash left it)."""
    tmp = tmp_path_factory.mktemp("resume")
    whole = _run(_raw(tiny_bert, agnews, tmp / "whole"), run_id=11)
    raw = _raw(tiny_bert, agnews, tmp / "cut")
    with pytest.raises(Crash):
        _run(raw, run_id=12, crash_in_round=3)
    cut = Path(raw["results-dir"]) / "12"
    return {"whole": whole, "cut": cut, "raw": raw, "tmp": tmp}


def _same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [r["round"] for r in got] == [r["round"] for r in want]
    for a, b in zip(got, want):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6), a["round"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["round"]
        assert a["phase"] == b["phase"]
        ca = sorted(a["clients"], key=lambda c: c["partition_id"])
        cb = sorted(b["clients"], key=lambda c: c["partition_id"])
        assert [(c["partition_id"], c["rank"], c["num_examples"], c["bytes_up"],
                 c["bytes_down"]) for c in ca] == \
            [(c["partition_id"], c["rank"], c["num_examples"], c["bytes_up"], c["bytes_down"])
             for c in cb], a["round"]
        assert [c["train_loss"] for c in ca] == pytest.approx([c["train_loss"] for c in cb],
                                                              rel=1e-6)
        if b.get("aggregation_error") is not None:
            assert a["aggregation_error"] == pytest.approx(b["aggregation_error"], rel=1e-5)
        assert a.get("fleet", {}).get("selected") == b.get("fleet", {}).get("selected")


def test_the_interrupted_run_left_a_checkpoint_of_its_last_finished_round(runs):
    cut = runs["cut"]
    assert [r["round"] for r in _rows(cut)] == [0, 1, 2]
    state = json.loads((cut / "checkpoint" / "state.json").read_text())
    assert state["round"] == 2 and state["run_ids"] == [12] and state["format"] == 1
    assert not (cut / ".checkpoint.tmp").exists() and not (cut / "adapter").exists()
    meta = state["strategy_state"]
    # keyed by partition, not by this run's node ids
    assert sorted(meta["profiles"]) == ["p0", "p1", "p2", "p3"]
    assert sorted(m["device"] for m in meta["fleet"]["members"]) == ["p0", "p1", "p2", "p3"]
    assert sorted(e["device"] for e in meta["latest"]) == ["p0", "p1", "p2", "p3"]
    comm = state["communication"]
    assert comm["device_rounds"] == 4 and comm["bytes_up"] == sum(
        c["bytes_up"] for r in _rows(cut) for c in r["clients"])
    assert set(state["rng"]) == {"python", "numpy", "torch"}


def test_a_resumed_run_ends_as_the_uninterrupted_one(runs):
    raw = runs["raw"] | {"resume": str(runs["cut"])}
    # a new simulation: new node ids, a new run id; the folder goes on where it stopped
    out = _run(raw, run_id=13, first_node_id=7001)
    assert out == runs["cut"]
    got, want = _rows(out), _rows(runs["whole"])
    _same_metrics(got, want)
    assert {c["node_id"] for r in got[3:] for c in r["clients"]} <= set(range(7001, 7005))
    config = json.loads((out / "config.json").read_text())
    assert config["run_id"] == 12 and config["resumed"] == [{"run_id": 13, "after_round": 2}]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["run_ids"] == [12, 13]
    # the final adapters are the same
    from safetensors.numpy import load_file
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs["whole"] / "adapter" / "adapter_model.safetensors"))
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    # num-server-rounds may grow: a finished run trains on
    longer = _run(raw | {"num-server-rounds": 5}, run_id=14, first_node_id=9001)
    assert [r["round"] for r in _rows(longer)] == [0, 1, 2, 3, 4, 5]
    _same_metrics(_rows(longer)[:5], want)


def _refused(raw: dict, match: str, folder: Path | None = None) -> None:
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder else {}
    with pytest.raises(ConfigError, match=match) as err:
        prepare_run(RunConfig.from_run_config(raw), run_id=99)
    assert "resume=" in str(err.value)
    if folder:  # a refusal changes nothing already finished
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_bad_resumes_are_refused_naming_the_key(runs, tmp_path):
    raw, cut = runs["raw"], runs["cut"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(raw | {"resume": str(empty)}, "has no checkpoint")
    _refused(raw | {"resume": str(tmp_path / "nowhere")}, "is not a folder")
    for key, value, name in (("seed", 8, "seed: 7 there, 8 now"),
                             ("train.lr", 0.5, "train.lr: 0.001 there, 0.5 now"),
                             ("strategy", "flexlora", "strategy")):
        extra = {"fleet.selection": "all"} if key == "strategy" else {}
        _refused(raw | {"resume": str(cut), key: value, **extra}, name, cut)
    _refused(raw | {"resume": str(cut), "num-server-rounds": 2}, "nothing is left", cut)
    _refused(raw | {"resume": str(cut), "strategy": "fedkd", "fleet.selection": "all"},
             "fedkd|strategy=", cut)
    # a run id under results-dir names the folder too
    cfg = RunConfig.from_run_config(raw | {"resume": "12"})
    assert checkpoint.resume_folder(cfg) == cut.resolve()


def test_fedkd_and_dp_runs_refuse_to_resume(runs, tmp_path):
    from strategies.fedkd.server import run as fedkd_run

    cfg = RunConfig.from_run_config({"strategy": "fedkd", "resume": str(runs["cut"])})
    with pytest.raises(ConfigError, match="resume=.*fedkd.*private local module"):
        fedkd_run(None, None, cfg)
    # a DP run's checkpoint (its config says dp.enabled): the accountants are on the devices
    dp_dir = tmp_path / "dp"
    (dp_dir / "checkpoint").mkdir(parents=True)
    state = json.loads((runs["cut"] / "checkpoint" / "state.json").read_text())
    raw = runs["raw"] | {"dp.enabled": True, "resume": str(dp_dir)}
    state["config"] = RunConfig.from_run_config(raw).to_dict()
    (dp_dir / "checkpoint" / "state.json").write_text(json.dumps(state))
    for name in ("global.safetensors", "strategy.safetensors"):
        (dp_dir / "checkpoint" / name).write_bytes(
            (runs["cut"] / "checkpoint" / name).read_bytes())
    _refused(raw, "dp.enabled runs cannot be resumed", dp_dir)


def test_unlearning_resumes_only_before_it_forgets(tiny_bert):
    from strategies.unlearn.strategy import FederatedUnlearning

    cfg = RunConfig.from_run_config({"strategy": "unlearn", "unlearn.clients": "1",
                                     "num-server-rounds": 2})
    strategy = FederatedUnlearning(cfg, ("a", "b"))
    meta, _ = strategy.checkpoint_state()
    assert "refuse_resume" not in meta
    strategy.before = {"x": np.zeros(1)}
    meta, _ = strategy.checkpoint_state()
    assert "strategy='unlearn'" in meta["refuse_resume"] and "resume=''" in \
        meta["refuse_resume"]


class ScrambledGrid(InProcessGrid):
    """Node ids that do not follow the partitions, listed in a shuffled order: what a real
    simulation's random node ids look like (a resumed one gets other ones)."""

    def __init__(self, raw: dict, num_nodes: int, seed: int):
        super().__init__(raw, num_nodes=num_nodes)
        rng = np.random.default_rng(seed)
        ids = rng.choice(np.arange(10_000, 99_999), size=num_nodes, replace=False)
        contexts = list(self.contexts.values())
        self.contexts = {}
        for node, context in zip(ids.tolist(), contexts):
            context.node_id = node
            self.contexts[node] = context
        order = rng.permutation(num_nodes)
        self.contexts = {list(self.contexts)[i]: list(self.contexts.values())[i]
                         for i in order}

    def send_and_receive(self, messages, *, timeout=None):
        """Replies report virtual training seconds (by partition): S2 plans with measured
        seconds, which no rerun measures again to the last digit, on a loaded machine least of
        all (a real resumed S2 run plans with what it measures then)."""
        from flwr.app import MetricRecord

        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if not reply.has_content():
                continue
            for name, record in list(reply.content.metric_records.items()):
                if "train-s" in record:
                    part = self.contexts[reply.metadata.src_node_id].node_config["partition-id"]
                    reply.content[name] = MetricRecord({**dict(record),
                                                        "train-s": 1.0 + 0.25 * part})
        return replies


@pytest.mark.parametrize("selection", ["random", "s2"])
def test_partial_participation_resumes_exactly(selection, tiny_bert, agnews, tmp_path):
    """fraction-train=0.5 of 6 devices, Markov availability, random or S2 selection: killed
    in round 3 and resumed on other node ids in another order, the run ends as the
    uninterrupted one, round by round."""
    extra = {"fraction-train": 0.5, "fleet.selection": selection, "fleet.per-round": 2,
             "fleet.availability": "markov", "num-server-rounds": 5, "min-devices": 2}

    def run(raw, run_id, grid_seed, crash_in_round=0):
        grid = ScrambledGrid(raw, 6, grid_seed)

        def before_send(msg) -> None:
            config = msg.content.config_records.get("config")
            if crash_in_round and config and config.get("server-round") == crash_in_round:
                raise Crash(f"killed in round {crash_in_round}")

        grid.before_send = before_send
        return federate(grid, prepare_run(RunConfig.from_run_config(raw), run_id))

    whole = run(_raw(tiny_bert, agnews, tmp_path / "whole", **extra), 21, grid_seed=1)
    raw = _raw(tiny_bert, agnews, tmp_path / "cut", **extra)
    with pytest.raises(Crash):
        run(raw, 22, grid_seed=2, crash_in_round=3)
    out = run(raw | {"resume": str(Path(raw["results-dir"]) / "22")}, 23, grid_seed=3)
    got, want = _rows(out), _rows(whole)
    _same_metrics(got, want)
    # not vacuous: rounds train different subsets of the partitions
    subsets = {tuple(sorted(c["partition_id"] for c in r["clients"])) for r in want[1:]}
    assert len(subsets) > 1 and all(len(s) <= 3 for s in subsets)
