"""Device-side work in-process: classification and causal-LM training, one model per process."""

import numpy as np

from client_app.device import DeviceInfo, local_examples, train_round
from server_app.evaluation import ServerTask
from task.config import RunConfig
from task.lora import lora_rank, truncate_lora
from task.model import get_lora_model


def test_device_trains_at_its_rank_and_shares_one_base_model(tiny_bert, agnews):
    cfg = RunConfig.from_run_config({"model": str(tiny_bert), "data.path": str(agnews),
                                     "train.local-steps": 3, "train.batch-size": 8,
                                     "eval.max-examples": 32})
    task = ServerTask.prepare(cfg)
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


def test_causal_lm_instruction_tuning(tiny_llama, tmp_path):
    rows = ["prompt\tresponse"] + [f"Add {i} and {i}.\t{2 * i}" for i in range(40)]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.tsv").write_text("\n".join(rows[:11]) + "\n")
    cfg = RunConfig.from_run_config({
        "model": str(tiny_llama), "task": "causal-lm", "data.path": str(tmp_path),
        "lora.target-modules": "q_proj,v_proj", "strategy": "fedavg", "lora.fedavg-rank": 4,
        "train.local-steps": 5, "train.lr": 0.01, "data.partitioner": "iid"})
    task = ServerTask.prepare(cfg)
    assert task.label_names == ()
    state = task.initial_state()
    assert all("lora_" in k for k in state)  # no head in a causal LM adapter
    before = task.evaluate(state)
    new, n, metrics = train_round(cfg, DeviceInfo(partition_id=0, num_partitions=2), (), 4,
                                  state, server_round=1)
    after = task.evaluate(new)
    assert n == 20 and 0 <= after["accuracy"] <= 1
    assert after["loss"] < before["loss"]  # it learned something about the responses
