"""`task='lm-cls'`: classification posed to a causal LM as an instruction, answered by the
most likely label word; trained and scored by the app, checked against a hand computation."""

from __future__ import annotations

import pytest
import torch

from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.training.device import DeviceInfo, train_round
from edge_lam.training.evaluation import ServerModel
from tiny_models import merged_llama

ROWS = [("the team won the cup final", "Sports"), ("shares fell on the stock market", "Business"),
        ("a new chip doubles the speed", "Sci/Tech"), ("the minister met the president", "World"),
        ("the striker scored twice", "Sports"), ("the bank raised its rates", "Business"),
        ("the probe landed on mars", "Sci/Tech"), ("the summit ended in a treaty", "World")]
TEMPLATE = "Topic of: {text}\nAnswer:"


def label_word_metrics(model_dir, state, scaling, rows, words):
    """Accuracy and mean cross-entropy over the label words' first tokens after the prompt,
    without the app: LoRA merged by hand into a plain LlamaForCausalLM, one example at a
    time (no padding)."""
    tokenizer, model = merged_llama(model_dir, state, scaling)
    ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]
    names = sorted(words)
    correct, loss = 0, 0.0
    for text, label in rows:
        prompt = tokenizer(TEMPLATE.format(text=text), return_tensors="pt")
        with torch.no_grad():
            logits = model(**prompt).logits[0, -1].double()[ids]
        target = names.index(label)
        correct += int(logits.argmax()) == target
        loss += torch.nn.functional.cross_entropy(logits[None], torch.tensor([target])).item()
    return correct / len(rows), loss / len(rows)


def _data(tmp_path):
    lines = ["text\tlabel"] + [f"{t}\t{label}" for t, label in ROWS]
    for split in ("train.tsv", "test.tsv"):  # a set it can memorise: test = train
        (tmp_path / split).write_text("\n".join(lines) + "\n")
    return tmp_path


def test_label_word_classification_learns_and_matches_a_hand_computation(learnable_llama,
                                                                          tmp_path):
    cfg = RunConfig.from_run_config({
        "model": str(learnable_llama), "task": "lm-cls", "data.path": str(_data(tmp_path)),
        "data.template": TEMPLATE, "data.partitioner": "iid",
        "lora.target-modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "strategy": "fedavg", "lora.fedavg-rank": 8, "train.local-steps": 40,
        "train.lr": 0.01, "train.batch-size": 8})
    task = ServerModel.prepare(cfg)
    assert task.label_names == ("Business", "Sci/Tech", "Sports", "World")
    state = task.initial_state()
    assert all("lora_" in k for k in state)  # no classification head: the LM answers
    before = task.evaluate(state)
    new, n, metrics = train_round(cfg, DeviceInfo(partition_id=0, num_partitions=1),
                                  task.label_names, 8, state, server_round=1)
    after = task.evaluate(new)
    assert n == 8 and metrics["steps"] == 40
    assert after["accuracy"] >= 0.75 and after["loss"] < 0.5 * before["loss"], (before, after)
    words = [label for _, label in ROWS[:4]]  # label words = label names by default
    for got, weights in ((before, state), (after, new)):
        acc, loss = label_word_metrics(learnable_llama, weights, cfg.lora_scaling, ROWS,
                                       sorted(set(words)))
        assert got["accuracy"] == acc and got["loss"] == pytest.approx(loss, rel=1e-5)


def test_label_words_must_fit_the_labels(learnable_llama, tmp_path):
    base = {"model": str(learnable_llama), "task": "lm-cls", "data.path": str(_data(tmp_path))}
    with pytest.raises(ConfigError, match="3 words for 4 labels"):
        ServerModel.prepare(RunConfig.from_run_config({**base, "data.label-words": "a,b,c"}))
    with pytest.raises(ConfigError, match="do not all start with different tokens"):
        ServerModel.prepare(RunConfig.from_run_config(
            {**base, "data.label-words": "sport,sport,news,tech"}))
