"""Writes this folder's checkpoints: interrupted runs as the code of commit a82fb57 (before the
core was split by concern, issue 26 item 4) left them, so that tests/test_resume_legacy.py
proves later code resumes them. Run from the checkout root (it needs ../shared/data):

    python3 tests/data/checkpoint_v1/make.py

Each scenario is run twice on the InProcessGrid of tests/: uninterrupted (its metrics.jsonl
and final adapter kept as `whole/`) and interrupted as round 3's first TRAIN message leaves
(its results folder as the crash left it: `cut/`: checkpoint/, metrics.jsonl, config.json).
The run config's model and data paths are written as `<model>` and `<data>`: the test puts
there the tiny BERT of tests/tiny_models.py built after `torch.manual_seed(MODEL_SEED)`
(`tiny_bert` below) and AG News with 33 test rows (`agnews_33`).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import shared_data_dir  # noqa: E402
from inprocess_grid import InProcessGrid  # noqa: E402
from tiny_models import make_tiny_bert  # noqa: E402

from strategies.lora.server import federate, prepare_run  # noqa: E402
from edge_lam.config.run_config import RunConfig  # noqa: E402

# name -> (devices, run-config overrides); every run: tiny BERT, 4 rounds, seed 7
SCENARIOS = {
    # FedLaAvg: stored updates, fleet members, the sampling RNG, profiles
    "fedlaavg": (4, {"strategy": "hetlora", "fleet.selection": "fedlaavg",
                     "fleet.per-round": 2}),
    # S6 trust (multi-Krum weights) and a markov availability's random state
    "robust": (5, {"strategy": "hetlora", "robust.aggregator": "multi-krum", "robust.f": 1,
                   "fleet.availability": "markov"}),
}


MODEL_SEED = 26


class Crash(Exception):
    pass


def tiny_bert(path: Path) -> Path:
    """The tiny BERT the checkpoints were trained on (its weights fixed by MODEL_SEED)."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(MODEL_SEED)
        return make_tiny_bert(path)


def agnews_33(agnews: Path, data: Path) -> Path:
    """AG News's training split and its first 32 test rows (+ header)."""
    data.mkdir(parents=True)
    (data / "train.tsv").symlink_to(agnews / "train.tsv")
    lines = (agnews / "test.tsv").read_text().splitlines()
    (data / "test.tsv").write_text("\n".join(lines[:33]) + "\n")
    return data


def raw_config(model: Path, data: Path, results: Path, extra: dict) -> dict:
    return {"model": str(model), "data.path": str(data), "results-dir": str(results),
            "num-server-rounds": 4, "train.local-steps": 1, "train.batch-size": 4,
            "eval.max-examples": 0, "data.partitioner": "iid", "seed": 7, **extra}


def run(raw: dict, devices: int, run_id: int, first_node_id: int = 1001,
        crash_in_round: int = 0) -> Path:
    grid = InProcessGrid(raw, num_nodes=devices, first_node_id=first_node_id)

    def before_send(msg) -> None:
        config = msg.content.config_records.get("config")
        if crash_in_round and config and config.get("server-round") == crash_in_round:
            raise Crash(f"killed in round {crash_in_round}")

    grid.before_send = before_send
    return federate(grid, prepare_run(RunConfig.from_run_config(raw), run_id))


def placeholders(folder: Path, model: Path, data: Path) -> None:
    """Absolute scratch paths in the kept files -> `<model>`, `<data>`, `<results>`."""
    for path in folder.rglob("*.json*"):
        text = path.read_text()
        for real, name in ((str(model), "<model>"), (str(data), "<data>")):
            text = text.replace(real, name)
        path.write_text(text)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_bert(tmp / "tiny-bert")
        data = agnews_33(shared_data_dir() / "agnews", tmp / "data")
        for name, (devices, extra) in SCENARIOS.items():
            out = HERE / name
            shutil.rmtree(out, ignore_errors=True)
            whole = run(raw_config(model, data, tmp / name / "whole", extra), devices, 11)
            raw = raw_config(model, data, tmp / name / "cut", extra)
            try:
                run(raw, devices, 12, crash_in_round=3)
            except Crash:
                pass
            cut = Path(raw["results-dir"]) / "12"
            (out / "whole" / "adapter").mkdir(parents=True)
            shutil.copy(whole / "metrics.jsonl", out / "whole")
            shutil.copy(whole / "adapter" / "adapter_model.safetensors", out / "whole" / "adapter")
            shutil.copytree(cut / "checkpoint", out / "cut" / "checkpoint")
            for file in ("metrics.jsonl", "config.json"):
                shutil.copy(cut / file, out / "cut")
            placeholders(out, model, data)
            json.loads((out / "cut" / "checkpoint" / "state.json").read_text())  # still JSON


if __name__ == "__main__":
    main()
