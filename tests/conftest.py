"""Shared fixtures: offline hub, the shared data folder, tiny models built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from flower_e2e import local_superlink  # noqa: E402
from tiny_models import make_tiny_bert, make_tiny_llama  # noqa: E402


def shared_data_dir() -> Path:
    """../shared/data beside the checkout (EDGE_LAM_SHARED_DATA overrides)."""
    return Path(os.environ.get("EDGE_LAM_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def agnews() -> Path:
    path = shared_data_dir() / "agnews"
    if not (path / "train.tsv").is_file():
        pytest.fail(f"AG News not found at {path}: put ../shared beside the checkout or set "
                    "EDGE_LAM_SHARED_DATA")
    return path


@pytest.fixture()
def agnews_short(agnews, tmp_path):
    """agnews_short(test_rows) -> a folder with AG News's training split and its first
    `test_rows` test texts (a test split the server evaluates whole), made once per test."""

    def make(test_rows: int) -> Path:
        data = tmp_path / f"agnews-{test_rows}"
        if not data.exists():
            data.mkdir(parents=True)
            (data / "train.tsv").symlink_to(agnews / "train.tsv")
            lines = (agnews / "test.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
            (data / "test.tsv").write_text("".join(lines[:test_rows + 1]), encoding="utf-8")
        return data

    return make


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def learnable_llama(tmp_path_factory) -> Path:
    """A tiny Llama initialised wide enough (std 0.2, seeded) for LoRA to memorise a few
    instruction responses (see tiny_models.make_tiny_llama)."""
    return make_tiny_llama(tmp_path_factory.mktemp("learnable-llama"), initializer_range=0.2,
                           seed=0)


@pytest.fixture(scope="session")
def mixed_tasks(agnews, tmp_path_factory) -> dict[str, Path]:
    """Small AG News and SST-2 folders (the first rows of ../shared/data) for FedKD tests."""
    out = {}
    for name, files in (("agnews", {"train.tsv": 320, "test.tsv": 120}),
                        ("sst2", {"train.tsv": 320, "validation.tsv": 120})):
        src, dst = agnews.parent / name, tmp_path_factory.mktemp(name)
        for file, rows in files.items():
            lines = (src / file).read_text(encoding="utf-8").splitlines(keepends=True)
            (dst / file).write_text("".join(lines[: rows + 1]), encoding="utf-8")
        out[name] = dst
    return out


@pytest.fixture(scope="module")
def flower_env(tmp_path_factory):
    """Environment for `flwr run` against a private local SuperLink (see tests/flower_e2e.py)."""
    with local_superlink(tmp_path_factory.mktemp("flwr-home")) as env:
        yield env


# ---------------------------------------------------------------------------------------
# Timings that a test wants in CI's output (e.g. each part of the emulated arm64 job):
# `timings.append("text")`; printed in a section at the end of the run, passed or failed.
TIMINGS: list[str] = []


@pytest.fixture(scope="session")
def timings() -> list[str]:
    return TIMINGS


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.section("timings")
        for line in TIMINGS:
            terminalreporter.write_line(line)
