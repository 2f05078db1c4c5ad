"""`edge-lam evaluate --model` (a base model, zero-shot) and `edge-lam generate`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from flower_e2e import ROOT
from edge_lam.cli.main import evaluate_model, generate, load_model
from edge_lam.config.run_config import ConfigError
from test_task import response_token_metrics

PAIRS = [(f"Add {i} and {i}.", str(2 * i)) for i in range(6)]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_lam.cli", *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_zero_shot_evaluation_is_the_base_model(learnable_llama, tmp_path):
    rows = ["prompt\tresponse"] + [f"{p}\t{r}" for p, r in PAIRS]
    (tmp_path / "test.tsv").write_text("\n".join(rows) + "\n")
    got = evaluate_model(str(learnable_llama), "causal-lm", tmp_path / "test.tsv", [])
    acc, loss = response_token_metrics(learnable_llama, {}, 1.0, PAIRS)["accuracy"], \
        response_token_metrics(learnable_llama, {}, 1.0, PAIRS)["loss"]
    assert got["accuracy"] == acc and got["loss"] == pytest.approx(loss, rel=1e-5)
    done = _cli("evaluate", "--model", str(learnable_llama), "--data",
                str(tmp_path / "test.tsv"), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1])["loss"] == pytest.approx(got["loss"])


def test_generate_is_the_greedy_continuation_of_the_prompt(learnable_llama):
    from transformers import AutoTokenizer, LlamaForCausalLM

    cfg, _, net = load_model(None, str(learnable_llama), "causal-lm", [])
    text = generate(cfg, net, "Add 3 and 3.", 6, raw=True)
    tokenizer = AutoTokenizer.from_pretrained(str(learnable_llama))
    plain = LlamaForCausalLM.from_pretrained(str(learnable_llama)).eval()
    enc = tokenizer("Add 3 and 3.", return_tensors="pt")
    ids = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        out = plain.generate(**ids, max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                    skip_special_tokens=True)


def test_generate_and_evaluate_say_what_is_missing(tiny_bert, learnable_llama):
    with pytest.raises(ConfigError, match="exactly one of --adapter"):
        load_model(None, None, "causal-lm", [])
    cfg, _, net = load_model(None, str(learnable_llama), "causal-lm", [])
    with pytest.raises(ConfigError, match="generate needs a causal LM"):
        generate(cfg.updated(task="seq-cls"), net, "hi", 2, raw=True)
    done = _cli("evaluate", "--data", "x.tsv")
    assert done.returncode == 2 and "give --adapter" in done.stderr
