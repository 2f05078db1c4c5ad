"""Instruction tuning done properly on (tiny) causal LMs: prompt formats, truncation that keeps
the response, the response-only loss computed in chunks, greedy answers and GSM8K's exact
match, the memory options, and every algorithm (DP, FedKD, S4 unlearning) on an LLM family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inprocess_grid import InProcessGrid
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.data.encode import encode_pairs, fit
from edge_lam.data.text import load_split_frames, resolve_columns, to_examples
from edge_lam.training.device import DeviceInfo, local_examples, train_round
from edge_lam.training.evaluation import ServerModel
from edge_lam.models.families import chunked_response_loss, family
from edge_lam.serving.generation import answers, final_number
from edge_lam.training.lora import truncate_lora
from edge_lam.models.lora_model import (get_lora_model, load_tokenizer, resolve_model_source,
                                        set_trainable_state)
from conftest import shared_data_dir


def _pairs_dir(tmp_path, pairs, header=("prompt", "response")):
    rows = ["\t".join(header)] + ["\t".join(p) for p in pairs]
    for name in ("train.tsv", "test.tsv"):
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    return tmp_path


def _cfg(model, data, **extra):
    return RunConfig.from_run_config({
        "model": str(model), "task": "causal-lm", "data.path": str(data),
        "lora.target-modules": "q_proj,v_proj,down_proj", "strategy": "fedavg",
        "lora.fedavg-rank": 4, "data.partitioner": "iid", "train.batch-size": 4,
        "eval.max-examples": 0, **extra})


# ---------------------------------------------------------------------------- data
@pytest.mark.parametrize("prompt, response, budget, want_p, want_r", [
    (10, 20, 64, 10, 20),  # fits: untouched
    (300, 50, 128, 78, 50),  # long prompt: the response stays whole
    (10, 500, 128, 10, 118),  # long response: cut at its end, the prompt stays whole
    (500, 500, 128, 64, 64),  # both long: the response keeps half the budget
])
def test_truncation_never_cuts_the_whole_response(prompt, response, budget, want_p, want_r):
    p, r = list(range(prompt)), list(range(1000, 1000 + response))
    got_p, got_r = fit(p, r, budget)
    assert (len(got_p), len(got_r)) == (want_p, want_r)
    assert got_r == r[:want_r]  # the response is cut at its end only
    if want_p < prompt:  # the prompt loses its middle: its first quarter and its end stay
        head = want_p // 4
        assert got_p == p[:head] + p[prompt - (want_p - head):]


def test_gsm8k_and_code_alpaca_columns_are_found_and_alpaca_input_joins_the_prompt():
    cfg = RunConfig.from_run_config({"task": "causal-lm"})
    data = shared_data_dir()
    gsm = load_split_frames(str(data / "gsm8k"), "")["test"]
    cols = resolve_columns(gsm, cfg)
    assert (cols.prompt, cols.response, cols.input) == ("question", "answer", "")
    code = load_split_frames(str(data / "codealpaca"), "")["test"]
    cols = resolve_columns(code, cfg)
    assert (cols.prompt, cols.response, cols.input) == ("instruction", "output", "input")
    ex = to_examples(code, cols, ())
    with_input = next(i for i, x in enumerate(code["input"]) if x.strip())
    without = next(i for i, x in enumerate(code["input"]) if not x.strip())
    assert ex.texts[with_input] == \
        f"{code['instruction'][with_input]}\n\n{code['input'][with_input]}"
    assert ex.texts[without] == code["instruction"][without]
    with pytest.raises(ConfigError, match="data.response-column='auto' found none"):
        resolve_columns(gsm[["question"]], cfg)
    with pytest.raises(ConfigError, match="data.input-column='context' is not a column"):
        resolve_columns(code, cfg.updated("data", input_column="context"))


def test_plain_format_when_no_chat_template_and_loss_only_on_the_response(tiny_llama,
                                                                          tmp_path):
    cfg = _cfg(tiny_llama, tmp_path)
    tok = load_tokenizer(resolve_model_source(str(tiny_llama)))
    batch = encode_pairs(tok, ["what is two plus two?", "name a colour"], ["four", "red"], cfg)
    labels, ids = batch["labels"], batch["input_ids"]
    first = tok.decode(ids[0][batch["attention_mask"][0].bool()])
    # (MiniLM's BERT tokenizer splits '###' and closes the prompt with [SEP])
    assert first == "[CLS] # # # instruction : what is two plus two? # # # response : [SEP] " \
        "four [SEP]"
    for row in range(2):
        answer = ids[row][labels[row] != -100]
        assert tok.decode(answer) == ["four [SEP]", "red [SEP]"][row]
    with pytest.raises(ConfigError, match="no chat template"):
        encode_pairs(tok, ["x"], ["y"], cfg.updated("data", format="chat"))


# ---------------------------------------------------------------------------- loss, memory
def test_chunked_loss_equals_the_full_loss_and_gradient(learnable_llama, tmp_path):
    pairs = [(f"Add {i} and {i}.", f"The sum is {2 * i}.") for i in range(6)]
    cfg = _cfg(learnable_llama, _pairs_dir(tmp_path, pairs), **{"lora.dropout": 0.0})
    task = ServerModel.prepare(cfg)
    model = get_lora_model(cfg, (), 4)
    state = truncate_lora(task.initial_state(), 4)
    state = {k: v + 0.05 * np.random.default_rng(0).standard_normal(v.shape).astype(np.float32)
             for k, v in state.items()}  # B != 0: gradients reach A too
    set_trainable_state(model, state)
    tok = load_tokenizer(resolve_model_source(cfg.model))
    batch = encode_pairs(tok, [p for p, _ in pairs], [r for _, r in pairs], cfg)
    model.train()

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.requires_grad}

    full, g_full = loss_and_grads(lambda: torch.nn.functional.cross_entropy(
        *family(cfg).outputs(model, dict(batch))))
    chunked, g_chunked = loss_and_grads(lambda: chunked_response_loss(model, batch, 5))
    assert chunked == pytest.approx(full, rel=1e-5)
    for name in g_full:
        torch.testing.assert_close(g_chunked[name], g_full[name], rtol=1e-4, atol=1e-6)


def test_memory_options_train_the_same_model(learnable_llama, tmp_path):
    """Gradient checkpointing and a chunked loss change memory, not the result; bfloat16
    frozen weights change it only by rounding."""
    pairs = [(f"Add {i} and {i}.", f"The sum is {2 * i}.") for i in range(6)]
    data = _pairs_dir(tmp_path, pairs)
    info = DeviceInfo(partition_id=0, num_partitions=1)

    def trained(**extra):
        cfg = _cfg(learnable_llama, data, **{"train.local-steps": 3, "lora.dropout": 0.0,
                                             **extra})
        task = ServerModel.prepare(cfg)
        new, _, metrics = train_round(cfg, info, (), 4, truncate_lora(task.initial_state(), 4),
                                      server_round=1)
        return new, metrics["train_loss"]

    plain, loss = trained()
    for extra in ({"train.gradient-checkpointing": True}, {"train.loss-chunk": 7}):
        other, other_loss = trained(**extra)
        assert other_loss == pytest.approx(loss, rel=1e-5)
        for k in plain:
            np.testing.assert_allclose(other[k], plain[k], rtol=1e-3, atol=1e-6)
    half, half_loss = trained(**{"train.dtype": "bfloat16"})
    assert half_loss == pytest.approx(loss, rel=0.05)
    assert all(v.dtype == np.float32 for v in half.values())  # the adapter stays float32


# ---------------------------------------------------------------------------- generation
def test_final_number_reads_gsm8k_answers():
    assert final_number("She pays 3 * 4 = 12.\n#### 1,234") == "1234"
    assert final_number("so the answer is 7.50 dollars") == "7.5"
    assert final_number("#### -3") == "-3" and final_number("no number") is None


def test_batched_greedy_answers_equal_one_at_a_time(tiny_llama, tmp_path):
    cfg = _cfg(tiny_llama, tmp_path, **{"data.format": "raw"})
    model = get_lora_model(cfg, (), 2)
    tok = load_tokenizer(resolve_model_source(cfg.model))
    prompts = ["a short one", "a much longer prompt with many more words than the first",
               "middle length prompt here"]
    together = answers(model, tok, cfg, prompts, max_new_tokens=6, batch_size=3)
    alone = [answers(model, tok, cfg, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone and all(together)


def test_exact_match_is_the_metric_on_gsm8k_like_data(learnable_llama, tmp_path):
    pairs = [(f"Add {i} and {i}.", f"#### {2 * i}") for i in range(4)]
    cfg = _cfg(learnable_llama, _pairs_dir(tmp_path, pairs), **{
        "train.local-steps": 80, "train.lr": 0.01, "eval.max-new-tokens": 8,
        "lora.target-modules": "auto", "lora.fedavg-rank": 8})
    task = ServerModel.prepare(cfg)
    state = task.initial_state()
    before = task.evaluate(state)
    assert before["exact_match"] == 0.0 and before["generated"] == 4
    new, _, _ = train_round(cfg, DeviceInfo(partition_id=0, num_partitions=1), (), 8, state,
                            server_round=1)
    after = task.evaluate(new)
    assert after["exact_match"] >= 0.75 and after["perplexity"] < before["perplexity"] / 2
    nll = ServerModel.prepare(cfg.updated("eval", metric="nll")).evaluate(new)
    assert "exact_match" not in nll and nll["loss"] == pytest.approx(after["loss"])


# ---------------------------------------------------------------------------- algorithms
def test_opacus_dp_training_on_a_causal_lm(tiny_llama, tmp_path):
    from edge_lam.training.privacy import DevicePrivacy

    pairs = [(f"question {i}", f"answer {i}") for i in range(32)]
    cfg = _cfg(tiny_llama, _pairs_dir(tmp_path, pairs), **{
        "dp.enabled": True, "dp.noise-multiplier": 1.0, "train.local-steps": 2,
        "train.batch-size": 8})
    info = DeviceInfo(partition_id=0, num_partitions=1)
    privacy = DevicePrivacy(cfg, len(local_examples(cfg, info, ())))
    task = ServerModel.prepare(cfg)
    sent = truncate_lora(task.initial_state(), 4)
    new, _, metrics = train_round(cfg, info, (), 4, sent, server_round=1, privacy=privacy)
    assert metrics["private_steps"] == 2 and metrics["epsilon"] > 0
    assert any(not np.allclose(new[k], sent[k]) for k in new if "lora_B" in k)


def test_fedkd_distils_label_word_distributions_on_an_llm(tiny_llama, mixed_tasks, tmp_path):
    from strategies.fedkd.device import DeviceStore, train_modules
    from strategies.fedkd.evaluation import FedKDServer
    from strategies.fedkd.math import device_view

    cfg = RunConfig.from_run_config({
        "strategy": "fedkd", "model": str(tiny_llama), "task": "lm-cls",
        "lora.target-modules": "q_proj,v_proj", "fedkd.task.agnews.path":
        str(mixed_tasks["agnews"]), "fedkd.task.sst2.path": str(mixed_tasks["sst2"]),
        "fedkd.shared-rank": 2, "fedkd.local-rank": 4, "fedkd.state-dir": str(tmp_path),
        "fedkd.device-eval-examples": 0, "train.local-steps": 2, "train.batch-size": 4,
        "eval.max-examples": 8})
    server = FedKDServer.prepare(cfg)
    g = server.initial_state()
    assert g and not any("head" in k for k in g)  # no classifier head: label words instead
    info = DeviceInfo(partition_id=0, num_partitions=2)  # an AG News device
    shared, n, metrics = train_modules(cfg, info, DeviceStore(tmp_path / "dev0"), "agnews",
                                       server.label_names["agnews"],
                                       device_view(g, "agnews"), server_round=1)
    assert n > 0 and set(shared) == set(device_view(g, "agnews"))
    assert metrics["kd_to_shared"] > 0 and metrics["kd_to_local"] > 0
    assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["local_loss"])


def test_unlearning_flow_on_an_llm(tiny_llama, agnews, tmp_path):
    """S4 end to end (train, forget device 1, recover) with gradients of LoRA on a causal
    LM scoring label words."""
    from strategies.unlearn.server import federate, prepare_run

    raw = {"model": str(tiny_llama), "task": "lm-cls", "lora.target-modules": "q_proj,v_proj",
           "data.path": str(agnews), "results-dir": str(tmp_path / "results"),
           "strategy": "unlearn", "unlearn.clients": "1", "num-server-rounds": 1,
           "unlearn.rounds": 1, "unlearn.recovery-rounds": 1, "unlearn.grad-batches": 1,
           "train.local-steps": 1, "train.batch-size": 4, "eval.max-examples": 8,
           "data.partitioner": "iid"}
    grid = InProcessGrid(raw, num_nodes=3)
    run_dir = federate(grid, prepare_run(RunConfig.from_run_config(raw), run_id=9))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["initial", "train", "unlearn", "recover"]
    assert rows[2]["unlearning"]["max_abs_cos_projected_vs_retained"] < 1e-5
    assert json.loads((run_dir / "unlearning.json").read_text())["status"] == "done"


def test_a_character_level_gguf_tokenizer_is_refused():
    """transformers 5.17 converts Gemma-3's GGUF tokenizer without merges; training on it
    would be meaningless, so the conversion stops with what to do."""
    from edge_lam.models.sources import check_tokenizer

    class CharLevel:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    class Words:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(len(text.split())))}

    with pytest.raises(ConfigError, match="character by character.*upgrade transformers"):
        check_tokenizer(CharLevel(), "gemma.gguf")
    check_tokenizer(Words(), "fine.gguf")
