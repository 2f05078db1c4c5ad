"""Bad input as a new user makes it: each gets a message that names the file, key or flag and
says what to do; and a run's results are complete at any moment (TensorBoard too)."""

from __future__ import annotations

import json
import logging

import pytest

from inprocess_grid import InProcessGrid
from edge_lam.cli import main as cli
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.data.text import load_split_frames
from edge_lam.training.evaluation import ServerModel


def _rows(n: int = 12, labels=("a", "b")) -> list[str]:
    return [f"text number {i}\t{labels[i % len(labels)]}" for i in range(n)]


def _folder(tmp_path, train: list[str], test: list[str], name: str = "data"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "train.tsv").write_text("\n".join(["text\tlabel", *train]) + "\n")
    (folder / "test.tsv").write_text("\n".join(["text\tlabel", *test]) + "\n")
    return folder


def test_non_utf8_bytes_name_the_file_and_line_and_an_encoding_helps(tiny_bert, tmp_path):
    folder = _folder(tmp_path, _rows(), _rows())
    raw = (folder / "train.tsv").read_bytes().replace(b"text number 3", b"caf\xe9 number 3")
    (folder / "train.tsv").write_bytes(raw)
    cfg = RunConfig.from_run_config({"model": str(tiny_bert), "data.path": str(folder)})
    with pytest.raises(ConfigError, match=r"train\.tsv, line 5, byte 4: 0xe9 is not valid "
                                          r"utf-8.*data\.encoding='latin-1'"):
        ServerModel.prepare(cfg)
    task = ServerModel.prepare(cfg.updated("data", encoding="latin-1"))
    assert task.label_names == ("a", "b")
    with pytest.raises(ConfigError, match="data.encoding='klingon' is not a known encoding"):
        RunConfig.from_run_config({"data.encoding": "klingon"})


def test_a_header_only_file_says_it_has_no_rows(tmp_path):
    folder = _folder(tmp_path, _rows(), [])
    with pytest.raises(ConfigError, match=r"test\.tsv has a header but no rows"):
        load_split_frames(str(folder), "")
    (folder / "train.tsv").write_text("")
    with pytest.raises(ConfigError, match=r"train\.tsv is empty"):
        load_split_frames.cache_clear()
        load_split_frames(str(folder), "")


def test_a_label_never_seen_in_training_is_named_with_its_counts(tiny_bert, tmp_path, caplog):
    folder = _folder(tmp_path, _rows(), _rows(9, ("a", "b", "c")))
    cfg = RunConfig.from_run_config({"model": str(tiny_bert), "data.path": str(folder)})
    logging.getLogger("edge_lam").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="edge_lam"):
            task = ServerModel.prepare(cfg)
    finally:
        logging.getLogger("edge_lam").removeHandler(caplog.handler)
    assert task.label_names == ("a", "b", "c")
    warned = [r.getMessage() for r in caplog.records if "never in the training" in
              r.getMessage()]
    assert len(warned) == 1 and "['c']" in warned[0] and "c: 3" in warned[0], warned


@pytest.fixture(scope="module")
def adapter(tiny_bert, agnews, tmp_path_factory):
    """A saved adapter of a 1-round fedavg run on the tiny BERT."""
    from strategies.lora.server import federate, prepare_run

    out = tmp_path_factory.mktemp("bad-input-run")
    raw = {"model": str(tiny_bert), "data.path": str(agnews), "strategy": "fedavg",
           "lora.fedavg-rank": 4, "results-dir": str(out), "num-server-rounds": 1,
           "train.local-steps": 1, "train.batch-size": 8, "eval.max-examples": 16,
           "data.partitioner": "iid"}
    run_dir = federate(InProcessGrid(raw, num_nodes=2),
                       prepare_run(RunConfig.from_run_config(raw), run_id=5))
    return run_dir


def test_results_are_whole_files_with_tensorboard_curves(adapter):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = adapter
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert not [p.name for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".old"))]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("eval/accuracy")]
    assert accuracy == [(r["round"], pytest.approx(r["accuracy"], rel=1e-6)) for r in rows]
    assert [e.step for e in events.Scalars("comm/bytes_up")] == [1]
    assert events.Scalars("comm/bytes_up")[0].value == sum(c["bytes_up"]
                                                           for c in rows[1]["clients"])


def test_evaluate_refuses_rank_0_and_takes_this_datas_columns(adapter, agnews, tmp_path):
    with pytest.raises(ConfigError, match=r"--rank 0 must be at least 1 \(leave it out for "
                                          r"the adapter's full rank, 4\)"):
        cli.evaluate_adapter(adapter / "adapter", agnews, rank=0)
    lines = (agnews / "test.tsv").read_text().splitlines()[:21]
    other = tmp_path / "other.tsv"
    other.write_text("\n".join(["body\ttopic"] + lines[1:]) + "\n")
    with pytest.raises(ConfigError, match=r"--text-column"):
        cli.evaluate_adapter(adapter / "adapter", other)
    got = cli.evaluate_adapter(adapter / "adapter", other,
                               columns={"text_column": "body", "label_column": "topic"})
    assert got["examples"] == 20 and got["rank"] == 4
    assert cli.main(["evaluate", "--adapter", str(adapter / "adapter"), "--data", str(other),
                     "--text-column", "body", "--label-column", "topic", "--json"]) == 0


def test_a_damaged_adapter_file_is_named(adapter, tmp_path, capsys):
    import shutil

    broken = tmp_path / "adapter"
    shutil.copytree(adapter / "adapter", broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"adapter_model\.safetensors is damaged"):
        cli.load_adapter(broken)
    assert cli.main(["evaluate", "--adapter", str(broken), "--data", str(tmp_path)]) == 2
    assert "is damaged" in capsys.readouterr().err


def test_many_devices_at_a_small_dirichlet_alpha_all_get_data():
    """100 devices, alpha 0.5, 4 classes: flwr-datasets gives up on its minimum of 10 rows
    per device after 10 draws (seen with num-supernodes=100); the partition then asks for
    fewer, on every device alike, and covers every row exactly once."""
    import numpy as np

    from edge_lam.data.partition import partition_indices
    from edge_lam.data.text import Examples

    cfg = RunConfig.from_run_config({})
    labels = list(np.random.default_rng(0).integers(0, 4, 10_000))
    examples = Examples(["x"] * 10_000, labels, [], ("a", "b", "c", "d"))
    parts = [partition_indices(examples, cfg, p, 100) for p in range(100)]
    assert min(len(p) for p in parts) >= 1
    assert sorted(i for p in parts for i in p) == list(range(10_000))
    assert partition_indices(examples, cfg, 7, 100) == parts[7]  # the same on every device
