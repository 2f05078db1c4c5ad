"""Device-side work in-process: classification and causal-LM training, one model per process."""

import numpy as np
import pytest
import torch

from edge_lam.training.device import DeviceInfo, local_examples, train_round
from edge_lam.training.evaluation import ServerModel
from edge_lam.config.run_config import RunConfig
from edge_lam.training.lora import lora_rank, truncate_lora
from edge_lam.models.lora_model import get_lora_model
from tiny_models import merged_llama


def test_device_trains_at_its_rank_and_shares_one_base_model(tiny_bert, agnews):
    cfg = RunConfig.from_run_config({"model": str(tiny_bert), "data.path": str(agnews),
                                     "train.local-steps": 3, "train.batch-size": 8,
                                     "eval.max-examples": 32})
    task = ServerModel.prepare(cfg)
    state = task.initial_state()
    info = DeviceInfo(partition_id=1, num_partitions=4)
    sent = truncate_lora(state, 4)
    new, n, metrics = train_round(cfg, info, task.label_names, 4, sent, server_round=1)
    assert lora_rank(new) == 4 and set(new) == set(sent)
    assert n == len(local_examples(cfg, info, task.label_names)) and 0 < n < 10_000
    assert metrics["steps"] == 3 and metrics["train_loss"] > 0
    # LoRA B starts at zero and must have moved; the head too
    assert any(new[k].any() for k in new if "lora_B" in k)
    head = [k for k in new if "classifier" in k]
    assert head and not np.allclose(new[head[0]], sent[head[0]])
    # every rank is an adapter on the same frozen base (loaded once per process)
    m4, m16 = get_lora_model(cfg, task.label_names, 4), get_lora_model(cfg, task.label_names, 16)
    assert m4 is m16 and {"rank-4", "rank-16"} <= set(m16.peft_config)


def response_token_metrics(model_dir, state, scaling, examples):
    """Next-token accuracy and mean cross-entropy over response tokens (and the final eos),
    computed without the app: LoRA merged into a plain LlamaForCausalLM by hand
    (W + scaling * B @ A), each example run alone (no padding), position t predicting t+1.
    The prompt is posed in the plain instruction format (the tiny model has no chat
    template)."""
    tokenizer, model = merged_llama(model_dir, state, scaling)
    correct = count = 0
    loss_sum = 0.0
    for prompt, response in examples:
        p = tokenizer(f"### Instruction:\n{prompt}\n\n### Response:\n")["input_ids"]
        r = tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0].double()
        pred = logits[len(p) - 1:-1]  # the positions whose next token is a response token
        target = torch.tensor(r)
        correct += int((pred.argmax(-1) == target).sum())
        loss_sum += torch.nn.functional.cross_entropy(pred, target, reduction="sum").item()
        count += len(r)
    return {"accuracy": correct / count, "loss": loss_sum / count}


def test_causal_lm_instruction_tuning(learnable_llama, tmp_path):
    pairs = [(f"Add {i} and {i}.", str(2 * i)) for i in range(8)]
    rows = ["prompt\tresponse"] + [f"{p}\t{r}" for p, r in pairs]
    # a small set it can memorise: the test split is the training split
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.tsv").write_text("\n".join(rows) + "\n")
    cfg = RunConfig.from_run_config({
        "model": str(learnable_llama), "task": "causal-lm", "data.path": str(tmp_path),
        "lora.target-modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "strategy": "fedavg", "lora.fedavg-rank": 8, "train.local-steps": 60,
        "train.lr": 0.01, "train.batch-size": 8, "data.partitioner": "iid"})
    task = ServerModel.prepare(cfg)
    assert task.label_names == ()
    state = task.initial_state()
    assert all("lora_" in k for k in state)  # no head in a causal LM adapter
    before = task.evaluate(state)
    new, n, metrics = train_round(cfg, DeviceInfo(partition_id=0, num_partitions=1), (), 8,
                                  state, server_round=1)
    after = task.evaluate(new)
    assert n == 8 and metrics["steps"] == 60
    # none of the 16 response tokens (a number + eos each) predicted before training, at
    # least 15 after (all 16 with this seed); the loss on them fell to under half (about
    # 10.3 -> 4.6: the frozen output layer bounds how low it can go)
    assert before["accuracy"] == 0.0 and after["accuracy"] >= 15 / 16
    assert after["loss"] < 0.5 * before["loss"]
    # the app's batched, padded evaluation = a per-example computation on a hand-merged model
    for got, weights in ((before, state), (after, new)):
        mine = response_token_metrics(learnable_llama, weights, cfg.lora_scaling, pairs)
        assert got["accuracy"] == mine["accuracy"]
        assert got["loss"] == pytest.approx(mine["loss"], rel=1e-5)
