"""`serve.kind='moe'` (S8): the training-free MoE (balanced clustering, routing, k = E equal to
the dense model) and its serving through the real ClientApp: the distributed experts give
the single-process MoE's logits, a failing device's experts move to the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from inprocess_grid import InProcessGrid
from transformers import AutoModelForCausalLM

from server_app.serve import mode
from server_app.serve.fleet import PROFILES
from server_app.serve.moe import label_logits, moe_model
from server_app.serve.moe_scheduling import GreedyScheduler, round_robin
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.training.evaluation import ServerModel
from edge_lam.serving.moe import (MoEPlan, balanced_assign, balanced_kmeans, build_plan,
                                  calibration_inputs, experts_output, ffn_flops_ratio, moefy,
                                  representatives, router_scores, top_k_mask)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "Topic of this news: World, Sports, Business or Sci/Tech?\n{text}\nAnswer:"


def test_balanced_assign_fills_each_cluster_exactly():
    # nearest clusters: 0, 0, 0, 1 -> cluster 0 would take 3 of 4; capacity is 2 each.
    # regrets: 0.9, 0.5, 0.1, 0.8 -> points 0, 3, 1 choose first (0, 1, 0), point 2 gets 1
    dist = np.array([[0.1, 1.0], [0.2, 0.7], [0.3, 0.4], [0.9, 0.1]])
    assert balanced_assign(dist).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="equal clusters"):
        balanced_assign(np.zeros((5, 2)))


def test_balanced_kmeans_finds_equal_blobs_and_uses_every_point_once():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    truth = np.repeat(np.arange(4), 6)
    points = centers[truth] + rng.normal(0, 0.3, (24, 2))
    order = rng.permutation(24)
    got = balanced_kmeans(points[order], 4, seed=1)
    assert np.bincount(got).tolist() == [6, 6, 6, 6]
    # the same partition as the blobs, up to the clusters' names
    pairs = {(int(t), int(g)) for t, g in zip(truth[order], got)}
    assert len(pairs) == 4 and len({g for _, g in pairs}) == 4
    feats = rng.normal(size=(96, 5))
    uneven = balanced_kmeans(feats, 8, seed=0)
    assert np.bincount(uneven, minlength=8).tolist() == [12] * 8 and len(uneven) == 96


def test_representatives_are_closest_to_the_centroid():
    feats = np.array([[0.0], [1.0], [5.0], [10.0], [11.0], [30.0]])
    assignment = np.array([0, 0, 0, 1, 1, 1])  # centroids 2 and 17
    assert representatives(feats, assignment, 2).tolist() == [[1, 0], [4, 3]]


def test_routing_top_k_by_representative_activation():
    relu = torch.relu
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (N=2, H=2)
    # experts 0..2, one representative each: h = relu(gate x) * (up x)
    gate = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    up = torch.tensor([[2.0, 0.0], [0.0, -3.0], [1.0, 1.0]])
    scale = torch.tensor([1.0, 1.0, 0.5])
    scores = router_scores(x, gate, up, relu, scale)
    # token 0: |1*2|, |0|, |1*1|*0.5 ; token 1: 0, |1*-3|, 0.5
    assert torch.allclose(scores, torch.tensor([[2.0, 0.0, 0.5], [0.0, 3.0, 0.5]]))
    assert top_k_mask(scores, 2).tolist() == [[True, False, True], [False, True, True]]
    assert top_k_mask(scores, 1).tolist() == [[True, False, False], [False, True, False]]


def test_experts_output_sums_only_the_chosen_experts():
    x = torch.tensor([[1.0, 2.0]])
    ident = (torch.eye(2)[:1], torch.eye(2)[:1], torch.ones(2, 1))  # y = relu(x0) x0 [1, 1]
    double = (torch.eye(2)[1:], torch.eye(2)[1:], 2 * torch.ones(2, 1))  # 2 relu(x1) x1
    y = experts_output(x, torch.tensor([[True, True]]), [ident, double], torch.relu)
    assert y.tolist() == [[9.0, 9.0]]
    y = experts_output(x, torch.tensor([[False, True]]), [ident, double], torch.relu)
    assert y.tolist() == [[8.0, 8.0]]
    assert ffn_flops_ratio(8, 2, 8, 1536) == pytest.approx(0.25 + 128 / 4608)


def _plan_and_models(tiny_llama, experts=4):
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    moe = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    ids = torch.randint(5, 30000, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    plan = build_plan(dense, calibration_inputs(dense, [batch], 1000), experts, 3)
    return dense, moe, plan, batch


def test_k_equal_to_e_is_the_dense_model(tiny_llama):
    dense, moe, plan, batch = _plan_and_models(tiny_llama)
    assert plan.assignment.shape == (2, 64) and plan.router.shape == (2, 4, 3)
    for row in plan.assignment:  # every neuron in exactly one expert of 16
        assert np.bincount(row).tolist() == [16] * 4
    layers = moefy(moe, plan, top_k=4)
    with torch.no_grad():
        want, got = dense(**batch).logits, moe(**batch).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert layers[0].last_mask.all()
    for layer in layers:
        layer.top_k = 2
    with torch.no_grad():
        half = moe(**batch).logits
    assert (layers[0].last_mask.sum(1) == 2).all()
    assert (half - want).abs().max() > 1e-3  # half the FFN dropped: not the dense model
    with pytest.raises(ConfigError, match="between 1 and serve.moe-experts=4"):
        moefy(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), plan, top_k=5)
    with pytest.raises(ConfigError, match="does not divide the FFN's 64 neurons"):
        build_plan(dense, calibration_inputs(dense, [batch], 100), 5, 2)


def test_greedy_scheduler_balances_predicted_time():
    fast, slow = PROFILES["laptop"], PROFILES["rpi4"]
    demand = np.array([100, 10, 10, 80])
    # two equal devices: 100 -> 0, then 80, 10, 10 -> 1 (90 < 110, then 100 < 110)
    same = GreedyScheduler([fast, fast], pair_seconds=1e-4, token_bytes=4 * 64)
    assert same(0, demand, np.array([True, True])).tolist() == [0, 1, 1, 1]
    # an rpi4 is ~11x slower and its Wi-Fi adds ms: even 10 tokens finish sooner on the
    # laptop after all the others (about 8 ms vs 11 ms), so it gets nothing
    mixed = GreedyScheduler([fast, slow], pair_seconds=1e-4, token_bytes=4 * 64)
    assert mixed(0, demand, np.array([True, True])).tolist() == [0, 0, 0, 0]
    assert mixed(1, demand, np.array([False, True])).tolist() == [1, 1, 1, 1]
    assert round_robin(0, demand, np.array([True, False, True])).tolist() == [0, 2, 0, 2]


@pytest.fixture()
def small_agnews(agnews, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("".join((agnews / "train.tsv").read_text().splitlines(
        keepends=True)[:60]))
    (data / "test.tsv").write_text("".join((agnews / "test.tsv").read_text().splitlines(
        keepends=True)[:13]))
    return data


def _raw(model, data, tmp_path, **extra):
    return {"mode": "serve", "serve.kind": "moe", "task": "lm-cls", "model": str(model),
            "data.path": str(data), "data.template": TEMPLATE,
            "data.label-words": "Business,Sci/Tech,Sports,World", "eval.max-examples": 0,
            "eval.batch-size": 4, "serve.moe-experts": 4, "serve.moe-top-k": 2,
            "serve.moe-calibration": 16, "serve.moe-router-neurons": 4,
            "results-dir": str(tmp_path / "r"), "min-devices": 1, **extra}


def _serve(grid, raw):
    ctx = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=raw)
    return mode.run(grid, ctx, RunConfig.from_run_config(raw))


def _local_logits(raw, run_dir):
    """The single-process MoE of the run's plan, its label logits."""
    cfg = RunConfig.from_run_config(raw)
    task = ServerModel.prepare(cfg, with_model=False)
    tokenizer, model, _ = moe_model(cfg, task.label_names)
    plan = MoEPlan.from_arrays(dict(np.load(run_dir / "moe_plan.npz")))
    layers = moefy(model, plan, cfg.serve.moe_top_k)
    return label_logits(model, layers, tokenizer, cfg, task.test), task


def test_distributed_experts_give_the_single_process_logits(tiny_llama, small_agnews,
                                                            tmp_path):
    raw = _raw(tiny_llama, small_agnews, tmp_path)
    grid = InProcessGrid(raw, num_nodes=3)
    run_dir = _serve(grid, raw)
    got = np.load(run_dir / "serve_moe_logits.npy")
    want, task = _local_logits(raw, run_dir)
    assert got.shape == (12, 4) and np.allclose(got, want, atol=1e-5, rtol=0)
    rep = json.loads((run_dir / "serve_moe.json").read_text())
    truth = np.asarray(task.test.labels)
    assert rep["accuracy"] == pytest.approx(float((want.argmax(1) == truth).mean()))
    assert rep["queries"] == 12 and rep["failures"] == [] and rep["alive"] == [True] * 3
    # 3 batches x 2 layers = 6 slots; round robin: experts 0, 3 on device 0, 1 on 1, 2 on 2
    assert rep["slots"] == 6 and all(t > 0 for t in rep["tokens_per_device"])
    serve = [m for _, m in grid.sent if m.metadata.message_type == "query.serve"]
    assert len(serve) == rep["messages"] <= 6 * 3
    assert sum("plan" in m.content for m in serve) == 3  # the plan goes once to each device
    assert all(str(m.content["config"]["kind"]) == "moe" for m in serve)
    hidden_bytes = 4 * 32
    assert hidden_bytes * 2 <= rep["bytes_per_layer_token"] <= hidden_bytes * 2 * 3 + 8
    assert rep["ffn_flops_ratio"] == pytest.approx(0.5 + 2 * 4 * 4 / (3 * 64))
    # wire bytes: the (2, 64) int32 plan plus its .npy header, once per device
    assert 3 * 2 * 64 * 4 < rep["plan_bytes"] <= 3 * (2 * 64 * 4 + 128)
    assert rep["predicted_expert_s"] > 0


class DroppingGrid(InProcessGrid):
    """Node 1002 stops answering after its second expert call; `dead` answer no expert
    call."""

    def __init__(self, *args, dead=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.dead = 0, set(dead)

    def send_and_receive(self, messages, *, timeout=None):
        keep = []
        for m in messages:
            if m.metadata.dst_node_id == 1002 and m.metadata.message_type == "query.serve":
                self.calls += 1
                if self.calls > 2:
                    continue
            if m.metadata.dst_node_id not in self.dead or \
                    m.metadata.message_type != "query.serve":
                keep.append(m)
        return super().send_and_receive(keep, timeout=timeout)


@pytest.mark.parametrize("scheduler", ["greedy", "lyapunov"])
def test_a_failing_device_has_its_experts_reassigned(tiny_llama, small_agnews, tmp_path,
                                                     scheduler):
    raw = _raw(tiny_llama, small_agnews, tmp_path, **{"serve.moe-scheduler": scheduler,
                                                      "serve.fleet": "laptop,laptop,laptop"})
    run_dir = _serve(DroppingGrid(raw, num_nodes=3), raw)
    rep = json.loads((run_dir / "serve_moe.json").read_text())
    assert rep["alive"] == [True, False, True]
    assert [(f["node"], f["reason"]) for f in rep["failures"]] == [(1002, "no answer in time")]
    want, _ = _local_logits(raw, run_dir)
    assert np.allclose(np.load(run_dir / "serve_moe_logits.npy"), want, atol=1e-5, rtol=0)


def test_no_device_left_is_an_error(tiny_llama, small_agnews, tmp_path):
    raw = _raw(tiny_llama, small_agnews, tmp_path)
    grid = DroppingGrid(raw, num_nodes=2, dead={1001, 1002})
    with pytest.raises(RuntimeError, match="every device failed"):
        _serve(grid, raw)


def test_bad_moe_config_is_refused(tiny_llama, small_agnews, tmp_path):
    for extra, match in (({"task": "causal-lm"}, "use task='lm-cls'"),
                         ({"serve.moe-top-k": 5}, "exceeds serve.moe-experts=4"),
                         ({"serve.moe-experts": 3, "serve.moe-top-k": 1},
                          "does not divide the FFN's 64")):
        raw = _raw(tiny_llama, small_agnews, tmp_path, **extra)
        with pytest.raises(ConfigError, match=match):
            _serve(InProcessGrid(raw, num_nodes=2), raw)


def test_moe_benchmark_end_to_end(tiny_llama, small_agnews, tmp_path):
    out = tmp_path / "bench"

    def bench(*args):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_moe.py"),
                               *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                              check=False)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    bench("--model", str(tiny_llama), "--data", str(small_agnews), "--queries", "12",
          "--experts", "4", "--calibration", "16", "--router-neurons", "4", "--devices", "2",
          "--serve-queries", "8", "--out", str(out))
    res = json.loads((out / "serve_moe.json").read_text())
    assert res["machine"]["cores"] >= 1 and "serve_moe.py" in res["command"]
    rows = {r["top_k"]: r for r in res["quality"] if r["router"] == "representatives"}
    assert set(rows) == {1, 2, 4} and rows[4]["max_logit_diff_vs_dense"] < 1e-4
    assert {r["router"] for r in res["quality"]} == {"representatives", "random",
                                                      "oracle (output norm)"}
    assert rows[4]["accuracy"] == res["dense"]["accuracy"]
    assert res["serving"]["max_logit_diff_vs_local"] < 1e-4
    assert [s["scheduler"] for s in res["serving"]["schedulers"]] == ["round-robin", "greedy",
                                                                      "lyapunov"]
    md = (out / "serve_moe.md").read_text()
    (out / "serve_moe.md").unlink()
    bench("--render", "--out", str(out))
    assert (out / "serve_moe.md").read_text() == md
