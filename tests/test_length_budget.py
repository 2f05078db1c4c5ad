"""The length budget of prompt/response pairs (issue 27): a budget that cuts pairs says how
many, with the data's own p95; `train.max-length=0` takes the budget from the data."""

from __future__ import annotations

import logging

import pytest

from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.data import encode
from edge_lam.data.encode import budgeted, encode_pairs, length_budget, pair_lengths
from edge_lam.data.text import Examples


class WordTokenizer:
    """One token per whitespace-separated word (and '</s>' for the end of a response)."""

    eos_token = "</s>"
    pad_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        def ids(t: str) -> list[int]:
            return [1 + len(w) for w in t.replace("</s>", " </s>").split()]

        if isinstance(text, list):
            return {"input_ids": [ids(t) for t in text]}
        return {"input_ids": ids(text)}


@pytest.fixture()
def edge_lam_log(caplog):
    logger = logging.getLogger("edge_lam")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger="edge_lam"):
        yield caplog
    logger.removeHandler(caplog.handler)


def _pairs() -> Examples:
    # prompt words + response words + 1 (the end-of-sequence token): 5, 7, 9 and 21 tokens
    prompts = ["a b", "a b c", "a b c d", "a b c d e f g h i j"]
    responses = ["x x", "x x x", "x x x x", " ".join(["x"] * 10)]
    return Examples(prompts, [], responses)


def _cfg(max_length: int) -> RunConfig:
    return RunConfig.from_run_config({"task": "causal-lm", "data.format": "raw",
                                      "train.max-length": max_length})


def test_pair_lengths_count_the_posed_prompt_the_response_and_eos():
    assert pair_lengths(WordTokenizer(), _pairs(), _cfg(128)).tolist() == [5, 7, 9, 21]


def test_budget_from_the_data_is_the_95th_percentile_rounded_up_to_8():
    import numpy as np

    assert length_budget(np.array([5, 7, 9, 21])) == 24  # p95 = 19.2 -> 20 -> 24
    assert length_budget(np.array([100] * 19 + [1000])) == 152  # p95 = 145: one long pair
    assert length_budget(np.array([8, 16]), quantile=1.0) == 16


def test_a_budget_that_cuts_says_how_many_and_what_to_set(edge_lam_log):
    encode._BUDGETS.clear()
    cfg = budgeted(_cfg(8), WordTokenizer(), _pairs(), "partition 3")
    assert cfg.train.max_length == 8
    warnings = [r.getMessage() for r in edge_lam_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "partition 3: 4 prompt/response pairs of median 8, p95 19, longest 21" in warnings[0]
    assert "train.max-length=8 cuts 2 of them (50%" in warnings[0]
    assert "Set train.max-length=24 (this data's p95) or 0" in warnings[0]
    budgeted(_cfg(8), WordTokenizer(), _pairs(), "partition 3")  # once per process
    assert sum(r.levelno == logging.WARNING for r in edge_lam_log.records) == 1


def test_zero_takes_the_budget_from_the_data(edge_lam_log):
    encode._BUDGETS.clear()
    cfg = budgeted(_cfg(0), WordTokenizer(), _pairs(), "partition 0")
    assert cfg.train.max_length == 24
    assert not [r for r in edge_lam_log.records if r.levelno == logging.WARNING]
    assert "a budget of 24 tokens from the data, 0 cut" in edge_lam_log.text
    # the evaluation keeps every pair whole: the longest
    assert budgeted(_cfg(0), WordTokenizer(), _pairs(), "the test split",
                    quantile=1.0).train.max_length == 24  # 21 rounded up to 8
    # a budget nothing exceeds says nothing
    edge_lam_log.clear()
    assert budgeted(_cfg(64), WordTokenizer(), _pairs(), "partition 1").train.max_length == 64
    assert not edge_lam_log.records


def test_zero_unresolved_cuts_nothing_and_too_short_is_refused():
    batch = encode_pairs(WordTokenizer(), _pairs().texts, _pairs().responses, _cfg(0))
    assert batch["input_ids"].shape == (4, 21)
    with pytest.raises(ConfigError, match="train.max-length=5 is too short"):
        _cfg(5)


def test_classification_configs_pass_through():
    cfg = RunConfig.from_run_config({"train.max-length": 64})
    assert budgeted(cfg, WordTokenizer(), Examples(["t"], [0], []), "x") is cfg
