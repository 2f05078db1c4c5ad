"""Scoring prompt/response pairs in chunks of response tokens (the evaluation's memory stays
bounded by the chunk, not by eval.batch-size x answer length x vocabulary) gives the same
loss sum, correct tokens and count as scoring the whole batch's logits at once."""

from __future__ import annotations

import pytest
import torch

from edge_lam.config.run_config import RunConfig
from edge_lam.data.encode import encode_pairs
from edge_lam.models.families import _response_outputs, score, score_responses
from edge_lam.models.lora_model import get_lora_model, load_tokenizer


def test_chunked_scoring_equals_whole_batch_scoring(tiny_llama):
    cfg = RunConfig.from_run_config({"model": str(tiny_llama), "task": "causal-lm",
                                     "strategy": "fedavg", "lora.fedavg-rank": 4})
    model = get_lora_model(cfg, (), 4)
    model.eval()
    tokenizer = load_tokenizer(str(tiny_llama))
    prompts = ["What is two plus two?", "Name a colour.", "Count to five, please, slowly."]
    responses = ["Four.", "Blue, or perhaps green.", "One, two, three, four, five."]
    batch = encode_pairs(tokenizer, prompts, responses, cfg)
    with torch.no_grad():
        whole = score(*_response_outputs(model, dict(batch)))
    for chunk in (1, 3, 7, 10_000):
        loss, correct, count = score_responses(model, batch, chunk)
        assert count == whole[2] == int((batch["labels"][:, 1:] != -100).sum())
        assert correct == whole[1]
        assert loss == pytest.approx(whole[0], rel=1e-5)
