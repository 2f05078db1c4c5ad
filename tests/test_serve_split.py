"""`serve.kind='split'` (S8 layer partitioning): ranges of units run on devices give the
whole model's logits exactly; the memory-aware DP equals brute force; the plain S8 DP
equals brute force over every assignment; the planner falls back to one device when
splitting does not pay and gives no device more than fits; the benchmark runs end to end
and renders its markdown from its JSON alone."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from transformers import AutoModelForCausalLM

from inprocess_grid import InProcessGrid
from server_app import modes
from server_app.serve.fleet import ServeDevice
from server_app.serve.split_plan import (MIB, Segment, UnitCosts, best_single, chain_dp,
                                         choose, fits, parse_plan, plan_seconds,
                                         segment_seconds, split_dp)
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.config.options import RunAborted
from edge_lam.serving.layers import held_param_bytes, load_units, monolithic_logits, run_units
from test_benchmarks import check_provenance, check_render, run_bench


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0  # right padding, as edge_lam.data.text pads
    mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("cuts", [(0, 4), (0, 1, 4), (0, 2, 3, 4), (0, 1, 2, 3, 4)])
def test_ranges_of_units_give_the_whole_models_logits(tiny_llama, cuts):
    whole = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    ids, mask = _batch()
    vocab = torch.tensor([7, 99, 1000])
    for keep in (None, vocab):
        x, held = ids, 0
        for a, b in itertools.pairwise(cuts):
            part = load_units(str(tiny_llama), a, b)
            held += held_param_bytes(part)
            x = run_units(part, a, b, x, mask, keep)
        ref = monolithic_logits(whole, ids, mask, keep)
        assert x.shape == ref.shape == (3, 3 if keep is not None else whole.config.vocab_size)
        assert torch.allclose(x, ref, atol=1e-5, rtol=0)
        assert held == held_param_bytes(whole)  # the ranges hold the model once, no more


def test_gemma3_ranges_with_sliding_windows_and_a_tied_head_are_exact(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=16, sliding_window=4, max_position_embeddings=64,
                              layer_types=["sliding_attention", "sliding_attention",
                                           "full_attention", "sliding_attention"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Gemma3ForCausalLM(config).save_pretrained(str(tmp_path))
    whole = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert whole.config.tie_word_embeddings
    ids, mask = _batch()
    ref = monolithic_logits(whole, ids, mask)
    for cuts in [(0, 2, 4, 6), (0, 1, 5, 6)]:
        x = ids
        for a, b in itertools.pairwise(cuts):
            x = run_units(load_units(str(tmp_path), a, b), a, b, x, mask)
        assert torch.allclose(x, ref, atol=1e-5, rtol=0)
    head_only = load_units(str(tmp_path), 5, 6)  # the tied embedding, read for the head
    assert held_param_bytes(head_only) == 1000 * 32 * 4 + 32 * 4


def test_a_range_outside_the_model_is_refused(tiny_llama):
    with pytest.raises(ConfigError, match="not inside the model's 4 units"):
        load_units(str(tiny_llama), 2, 5)


def _device(name, speed, mem=1e6, up=100.0, down=100.0, lat=0.002):
    return ServeDevice(name, speed, mem, up, down, lat)


def _random_case(rng, n, memory_mib):
    kinds = [_device("a", 1.0, memory_mib[0], 50, 80), _device("b", 0.4, memory_mib[1], 300, 300),
             _device("c", 2.0, memory_mib[2], 5, 10, 0.01)]
    devices = [kinds[i] for i in rng.integers(0, 3, size=rng.integers(2, 5))]
    costs = UnitCosts(tuple(rng.uniform(0.01, 0.2, n)),
                      tuple(int(x) for x in rng.integers(1, 6, n) * MIB),
                      tuple(int(x) for x in rng.integers(1_000, 2_000_000, n + 1)),
                      tied_bytes=int(MIB) if rng.random() < 0.5 else 0, work_bytes=int(MIB),
                      call_s=float(rng.choice([0.0, 0.05])))
    return costs, devices


def _brute_force(costs, devices):
    """min over every ordered choice of distinct devices and every cut of the units."""
    best = np.inf
    for k in range(1, len(devices) + 1):
        for order in itertools.permutations(range(len(devices)), k):
            for cuts in itertools.combinations(range(1, costs.n), k - 1):
                edges = (0, *cuts, costs.n)
                segs = [Segment(d, a, b) for d, a, b in zip(order, edges, edges[1:])]
                if all(fits(costs, devices[s.device], s.start, s.end) for s in segs):
                    best = min(best, plan_seconds(costs, devices, tuple(segs)))
    return best


def test_memory_aware_dp_equals_brute_force():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        costs, devices = _random_case(rng, int(rng.integers(2, 7)),
                                      rng.uniform(3, 14, size=3))
        truth = _brute_force(costs, devices)
        if not np.isfinite(truth):
            with pytest.raises(RunAborted, match="does not fit the fleet's memory"):
                split_dp(costs, devices)
            continue
        plan = split_dp(costs, devices)
        assert plan.seconds == pytest.approx(truth, rel=1e-12)
        assert plan_seconds(costs, devices, plan.segments) == pytest.approx(plan.seconds)
        assert all(fits(costs, devices[s.device], s.start, s.end) for s in plan.segments)
        assert len({s.device for s in plan.segments}) == len(plan.segments)
        checked += 1
    assert checked > 30


def test_plain_s8_dp_equals_brute_force_over_assignments():
    rng = np.random.default_rng(1)
    for _ in range(40):
        costs, devices = _random_case(rng, int(rng.integers(1, 6)), [1e6] * 3)
        best = np.inf
        for owner in itertools.product(range(len(devices)), repeat=costs.n):
            t = devices[owner[0]].send_s(costs.boundary_bytes[0], up=False) + costs.call_s
            for l, d in enumerate(owner):
                if l and owner[l - 1] != d:
                    t += devices[owner[l - 1]].send_s(costs.boundary_bytes[l], up=True) + \
                        devices[d].send_s(costs.boundary_bytes[l], up=False) + costs.call_s
                t += devices[d].compute_s(costs.seconds[l])
            best = min(best, t + devices[owner[-1]].send_s(costs.boundary_bytes[-1]))
        plan = chain_dp(costs, devices)
        assert plan.seconds == pytest.approx(best, rel=1e-12)
        # revisits allowed, no memory: never worse than the one-range-per-device DP
        assert plan.seconds <= split_dp(costs, devices).seconds + 1e-12


def _costs(n=10, layer_mib=10, hidden=100_000):
    return UnitCosts((0.001,) + (0.05,) * (n - 2) + (0.01,),
                     (int(40 * MIB),) + (int(layer_mib * MIB),) * (n - 2) + (int(MIB),),
                     (2_000,) + (hidden,) * (n - 1) + (4_000,), 0, int(MIB))


def test_splitting_that_does_not_pay_falls_back_to_one_device():
    costs = _costs()
    fleet = [_device("slow", 0.35), _device("fast", 4.0), _device("mid", 0.8)]
    plan, compared = choose(costs, fleet, "dp")
    assert plan.segments == (Segment(1, 0, costs.n),) and plan.how == "single"
    assert compared["fallback"] and compared["single"] == pytest.approx(plan.seconds)
    assert plan.seconds == pytest.approx(segment_seconds(costs, fleet[1], 0, costs.n))
    # identical devices: more of them never helps one request's latency
    plan, _ = choose(costs, [_device("rpi4", 0.35)] * 8, "dp")
    assert len(plan.segments) == 1
    # a fixed split over the same fleet is predicted slower than the fallback
    fixed, _ = choose(costs, fleet, "1:0-5,0:5-10")
    assert fixed.how == "fixed" and fixed.seconds > plan_seconds(
        costs, fleet, (Segment(1, 0, costs.n),))


def test_no_device_gets_more_units_than_fit():
    costs = _costs()  # 40 + 8 x 10 + 1 MiB of parameters, 1 MiB of activations
    fleet = [_device(f"small{i}", 1.0, mem=60) for i in range(4)]
    assert best_single(costs, fleet) is None
    plan, compared = choose(costs, fleet, "dp")
    assert compared["single"] is None and len(plan.segments) == 3
    for seg in plan.segments:
        assert costs.segment_bytes(seg.start, seg.end) <= 60 * MIB
    assert next(s.end - s.start for s in plan.segments) == 2  # embedding + 1 layer = 51 MiB
    with pytest.raises(ConfigError, match="give it fewer units"):
        choose(costs, fleet, "0:0-3,1:3-10")
    with pytest.raises(RunAborted, match="does not fit the fleet's memory"):
        choose(costs, fleet[:2], "dp")
    with pytest.raises(RunAborted, match="no device of the fleet holds the whole model"):
        choose(costs, fleet, "single")
    # a faster device with room takes the most units
    mixed = [_device("pi", 0.35, mem=60), _device("laptop", 4.0, mem=75),
             _device("pi2", 0.35, mem=60)]
    plan, _ = choose(costs, mixed, "dp")
    held = {mixed[s.device].name: s.end - s.start for s in plan.segments}
    assert held["laptop"] == max(held.values())


@pytest.mark.parametrize("text,match", [("0:0-5,0:5-10", "more than one range"),
                                        ("0:0-5,1:6-10", "starts at unit 6"),
                                        ("0:0-5", "ends at unit 5"), ("0-5", "must read"),
                                        ("3:0-10", "names device 3")])
def test_bad_fixed_plans_are_refused(text, match):
    fleet = [_device("a", 1.0), _device("b", 1.0)]
    with pytest.raises(ConfigError, match=match):
        choose(_costs(), fleet, text)
    assert parse_plan("1:0-4, 0:4-10") == [Segment(1, 0, 4), Segment(0, 4, 10)]


def _serve(model, tmp_path, plan, task="causal-lm", **extra):
    raw = {"mode": "serve", "serve.kind": "split", "model": str(model), "task": task,
           "results-dir": str(tmp_path / "r"), "serve.split-plan": plan,
           "serve.split-batch": 4, "serve.split-tokens": 16, "serve.split-batches": 3,
           "serve.split-repeats": 1, "serve.fleet": "rpi4,rpi5,laptop", **extra}
    grid = InProcessGrid(raw, num_nodes=3)
    ctx = Context(run_id=3, node_id=0, node_config={}, state=RecordDict(), run_config=raw)
    run_dir = modes.get("serve")(grid, ctx, RunConfig.from_run_config(raw))
    return grid, json.loads((run_dir / "serve_split.json").read_text())


def test_split_inference_over_flower_messages_is_exact(tiny_llama, tmp_path):
    grid, rep = _serve(tiny_llama, tmp_path, "2:0-2,0:2-3,1:3-4")
    assert rep["max_abs_logit_diff"] < 1e-5 and rep["batches"] == 3
    segs = rep["plan"]["segments"]
    assert [(s["device"], s["units"]) for s in segs] == [
        ("laptop-2", "embed..layer.0"), ("rpi4-0", "layer.1..layer.1"),
        ("rpi5-1", "head..head")]
    # each device holds its units' parameters only; together the model, once
    assert [s["param_bytes_held"] for s in segs] == [s["param_bytes_planned"] for s in segs]
    assert sum(s["param_bytes_held"] for s in segs) == rep["whole_model_param_bytes"]
    hidden = 4 * 16 * 32 * 4  # (B, T, H) float32 between devices
    assert hidden < segs[0]["bytes_out"] < hidden + 400 < segs[1]["bytes_in"] + 400
    assert segs[1]["bytes_in"] == rep["boundary_bytes"][2]  # the planner weighed real bytes
    assert segs[2]["bytes_out"] == rep["boundary_bytes"][-1]
    assert rep["plan"]["predicted_s"] == pytest.approx(sum(s["predicted_s"] for s in segs))
    measured = rep["measured"]
    assert 0 < measured["hop_overhead_s"] < measured["split_s"]
    sent = [m for _, m in grid.sent if m.metadata.message_type == "query.serve"]
    assert len(sent) == 3 * 3 and {m.content["config"]["kind"] for m in sent} == {"split"}


def test_a_model_no_device_holds_is_split_by_the_dp(tiny_llama, tmp_path):
    small = {"speed": 1.0, "memory_mib": 5.0, "up_mbps": 100, "down_mbps": 100}
    fleet_file = tmp_path / "fleet.json"  # 7.5 MiB of parameters; 5 MiB per device
    fleet_file.write_text(json.dumps([{"name": f"small-{i}", **small} for i in range(3)]))
    _, rep = _serve(tiny_llama, tmp_path, "dp", **{"serve.fleet": str(fleet_file)})
    segs = rep["plan"]["segments"]
    assert rep["compared"]["single"] is None and len(segs) == 2
    assert all(s["param_bytes_held"] <= 5 * MIB - rep["work_bytes"] for s in segs)
    assert sum(s["param_bytes_held"] for s in segs) == rep["whole_model_param_bytes"]
    assert rep["max_abs_logit_diff"] < 1e-5


def test_dp_run_scores_labels_on_one_device_when_splitting_does_not_pay(tiny_llama, agnews,
                                                                        tmp_path):
    _, rep = _serve(tiny_llama, tmp_path, "dp", task="lm-cls", **{
        "data.path": str(agnews), "data.label-words": "Business,Sci/Tech,Sports,World",
        "eval.max-examples": 12})
    segs = rep["plan"]["segments"]
    assert len(segs) == 1 and segs[0]["device"] == "laptop-2" and rep["compared"]["fallback"]
    assert segs[0]["bytes_out"] < 200  # (B, K) label logits only come back
    assert rep["max_abs_logit_diff"] < 1e-5 and 0 <= rep["accuracy"] <= 1


def test_serve_split_benchmark(tiny_llama, tmp_path):
    out = tmp_path / "bench"
    run_bench("serve_split.py", "--model", str(tiny_llama), "--shapes", "2x8", "--repeats",
              "1", "--batches", "2", "--out", str(out), timeout=120)
    res = json.loads((out / "serve_split.json").read_text())
    check_provenance(res, "serve_split.py")
    rows = [r for shape in res["shapes"] for r in shape["fleets"]]
    assert {r["fleet"] for r in rows} >= {"4 x rpi4", "rpi4 + rpi5 + laptop", "tight memory"}
    for r in rows:
        assert r["max_abs_logit_diff"] < 1e-4 and r["measured_split_s"] > 0
        assert 0 < r["measured_hop_overhead_s"] < r["measured_split_s"]
        assert r["dp_s"] is None or r["chosen_s"] <= r["dp_s"] + 1e-12
    tight = next(r for r in rows if r["fleet"] == "tight memory")
    assert tight["single_s"] is None and len(tight["segments"]) >= 2
    assert max(tight["held_bytes"]) < tight["whole_model_bytes"]
    check_render("serve_split.py", out, "serve_split.md")


def test_split_generation_with_kv_caches_equals_generate_token_for_token(tiny_llama,
                                                                        tmp_path):
    """Three devices, each keeping its layers' keys and values for the request in its Flower
    context: after the prompt, a step sends one hidden state per row through each hop, and
    the greedy tokens equal the whole model's `generate`, token for token."""
    grid, rep = _serve(tiny_llama, tmp_path, "2:0-2,0:2-3,1:3-4",
                       **{"serve.split-generate": 6, "serve.split-batches": 2})
    gens = rep["generation"]
    assert len(gens) == 2 and all(g["equal_to_generate"] for g in gens)
    g = gens[0]
    # a decode step carries (B, 1) ids, then (B, 1, H) hidden states: far less than the
    # prefill's (B, T, H)
    assert g["step_bytes"] * 8 < g["prefill_bytes"]
    steps = [m for _, m in grid.sent if m.metadata.message_type == "query.serve"
             and "request" in m.content["config"]]
    assert len(steps) == 2 * 6 * 3  # batches x tokens x hops
    # a device keeps only its own layers' cache: node of units [2, 3) holds layer 1 only
    node = rep["plan"]["segments"][1]["node"]
    kept = grid.contexts[node].state.array_records["split-kv"]
    assert sorted(kept) == ["k.1", "v.1"]
    assert kept["k.1"].numpy().shape[2] == 16 + 6 - 1  # prompt + tokens fed back


def test_a_step_that_does_not_match_the_kept_cache_is_refused(tiny_llama, tmp_path):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from client_app.serve.split import handle
    from edge_lam.records import to_record

    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    cfg = RunConfig.from_run_config({"model": str(tiny_llama), "task": "causal-lm"})

    def step(past, request="r1", x=np.zeros((1, 3), np.int64)):
        return handle(Message(RecordDict({"config": ConfigRecord({
            "kind": "split", "model": str(tiny_llama), "start": 0, "end": 2,
            "request": request, "past": past}), "arrays": to_record({"x": x})}),
            dst_node_id=5, message_type="query.serve"), ctx, cfg)

    step(0)
    with pytest.raises(ValueError, match="holds r1 at 3"):
        step(5)
    with pytest.raises(ValueError, match="request r2"):
        step(3, request="r2")
    step(3, x=np.zeros((1, 1), np.int64))  # the right next step goes through
