"""`serve.kind='cot'` (S8): the step placement against brute force and hand-computed costs,
the chain's stopping rule, and the CoT flow end to end on a tiny random Llama through the real
ClientApp (steps go to the placed devices, the chain is their concatenation, it stops at
'#### <n>' or the step budget), plus the benchmark script end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from inprocess_grid import InProcessGrid
from server_app import modes
from server_app.serve.fleet import ServeDevice
from server_app.serve.placement import (ChainSteps, Problem, brute_force, chain_problem,
                                        chain_seconds, solve, viterbi)
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.config.options import RunAborted
from edge_lam.serving.steps import chain_done
from test_benchmarks import check_provenance, check_render, run_bench


def _random_problem(rng, s_count, d_count) -> Problem:
    node = rng.uniform(0.1, 10.0, (s_count, d_count))
    node[rng.random((s_count, d_count)) < 0.15] = np.inf  # steps that do not fit
    edge = rng.uniform(0.0, 3.0, (max(s_count - 1, 0), d_count, d_count))
    if rng.random() < 0.5:  # the relay: no hand-over costs (the ILP has no flow variables)
        edge[:] = 0.0
    return Problem(node, edge, rng.integers(1, 4, d_count))


def test_exact_placement_matches_brute_force_and_heuristics_never_beat_it():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(150):
        problem = _random_problem(rng, int(rng.integers(1, 5)), int(rng.integers(1, 5)))
        try:
            _, best_s = brute_force(problem)
            got = {m: solve(problem, m, seed=1) for m in ("exact", "heuristic", "greedy",
                                                          "random")}
        except (ConfigError, RunAborted):
            continue  # infeasible: no step fits (run-time), or too few slots (config)
        if not np.isfinite(best_s):
            continue
        checked += 1
        assert got["exact"].seconds == pytest.approx(best_s, abs=1e-9)
        assert chain_seconds(problem, got["exact"].devices) == pytest.approx(best_s)
        for m, p in got.items():
            counts = np.bincount(p.devices, minlength=problem.shape[1])
            assert (counts <= problem.capacity).all(), m
            assert np.isfinite(problem.node[np.arange(len(p.devices)), p.devices]).all(), m
            assert p.seconds >= best_s - 1e-9, m
    assert checked > 60


def test_the_ilp_is_exact_on_assignment_cases_the_heuristics_get_wrong():
    # capacity 1: greedy gives the cheap first step the fast device and pays for it later
    node = np.array([[1.0, 2.0], [10.0, 30.0]])
    problem = Problem(node, np.zeros((1, 2, 2)), np.array([1, 1]))
    assert solve(problem, "exact").devices == (1, 0)  # 2 + 10 = 12
    assert solve(problem, "greedy").devices == (0, 1)  # 1 + 30 = 31
    assert solve(problem, "exact").seconds == 12.0
    # without capacities the DP stays put when hand-overs are dear: each step's own best
    # (0 then 1: 1 + 1) would pay 5 to hand over; staying on 0 costs 1 + 2
    node, edge = np.array([[1.0, 3.0], [2.0, 1.0]]), np.array([[[0.0, 5.0], [5.0, 0.0]]])
    assert viterbi(node, edge) == [0, 0]
    assert viterbi(node, np.zeros_like(edge)) == [0, 1]
    assert solve(Problem(node, edge, np.array([2, 2])), "exact").seconds == 3.0


def test_chain_problem_costs_each_step_on_each_device_and_refuses_what_cannot_fit():
    fast = ServeDevice("fast", speed=4.0, memory_mib=1000, up_mbps=8, down_mbps=16,
                       latency_s=0.01)
    small = ServeDevice("small", speed=1.0, memory_mib=100, up_mbps=8, down_mbps=8,
                        latency_s=0.0)
    steps = ChainSteps(compute_s=np.array([2.0, 4.0]), in_bytes=np.array([1e6, 2e6]),
                       out_bytes=np.array([1e6, 1e6]), memory_mib=np.array([50.0, 150.0]))
    problem = chain_problem(steps, [fast, small], device_steps=1)
    # fast, step 1: 0.01 + 8e6 / 16e6 down, 2 / 4 compute, 0.01 + 8e6 / 8e6 up
    assert problem.node[0, 0] == pytest.approx(0.51 + 0.5 + 1.01)
    assert problem.node[0, 1] == pytest.approx(1.0 + 2.0 + 1.0)
    assert problem.node[1, 1] == np.inf  # 150 MiB > 100 MiB
    assert solve(problem, "exact").devices == (1, 0)
    # direct links: only step 1's input goes down and the last text up; the chain passes
    # device to device over the slower link (8 Mbit/s: 2e6 bytes = 2 s) or stays put
    direct = chain_problem(steps, [fast, small], device_steps=2, links="direct")
    assert direct.node[0, 0] == pytest.approx(0.51 + 0.5)
    assert direct.node[1, 0] == pytest.approx(1.0 + 1.01)
    assert direct.edge[0, 0, 0] == 0.0 and direct.edge[0, 0, 1] == pytest.approx(0.01 + 2.0)
    assert direct.edge[0, 1, 0] == pytest.approx(0.01 + 2.0)
    assert solve(direct, "exact").devices == (0, 0)
    with pytest.raises(ConfigError, match="serve.cot-device-steps"):
        solve(chain_problem(ChainSteps(*(np.ones(3) for _ in range(4))), [fast, small], 1),
              "exact")
    with pytest.raises(RunAborted, match="fits on no device"):
        solve(chain_problem(ChainSteps(np.ones(1), np.ones(1), np.ones(1),
                                       np.array([5000.0])), [fast, small], 1), "heuristic")


def test_a_chain_is_done_when_it_ended_or_its_final_number_is_complete():
    assert chain_done("so 3 + 4 = 7\n#### 7\n", ended=False)
    assert chain_done("#### 1,234.5 dollars", ended=False)
    assert not chain_done("so the answer is\n#### 12", ended=False)  # may go on: 123
    assert not chain_done("no answer yet", ended=False)
    assert chain_done("no answer yet", ended=True)


@pytest.fixture()
def small_gsm8k(tmp_path):
    rows = ["prompt\tresponse"] + [f"What is {i} plus {i + 1}?\t{i} + {i + 1} = {2 * i + 1}"
                                    f"\\n#### {2 * i + 1}" for i in range(10)]
    data = tmp_path / "gsm"
    data.mkdir()
    for name in ("train.tsv", "test.tsv"):
        (data / name).write_text("\n".join(rows) + "\n")
    return data


def _raw(model, data, tmp_path, **extra):
    return {"mode": "serve", "serve.kind": "cot", "task": "causal-lm", "model": str(model),
            "data.path": str(data), "eval.max-examples": 0, "serve.cot-step-tokens": 3,
            "serve.cot-max-steps": 3, "serve.fleet": "rpi4,rpi5,laptop",
            "serve.cot-batch-size": 4, "results-dir": str(tmp_path / "r"), **extra}


def _run(grid, raw):
    ctx = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=raw)
    return modes.get("serve")(grid, ctx, RunConfig.from_run_config(raw))


def _step_queries(grid):
    return [m for _, m in grid.sent if m.metadata.message_type == "query.serve"
            and m.content["config"]["op"] == "step"]


def test_cot_steps_go_to_the_placed_devices_and_the_chain_is_their_concatenation(
        tiny_llama, small_gsm8k, tmp_path):
    raw = _raw(tiny_llama, small_gsm8k, tmp_path)
    grid = InProcessGrid(raw, num_nodes=3)
    run_dir = _run(grid, raw)
    report = json.loads((run_dir / "serve_cot.json").read_text())
    assert report["questions"] == 10 and report["placement"] == "exact"
    names = [d["name"] for d in report["fleet"]]
    placed = [names.index(n) for n in report["cot"]["devices"]]
    assert sorted(placed) == [0, 1, 2]  # serve.cot-device-steps=1: three different devices
    assert report["methods"]["exact"]["planned_s"] <= min(
        m["planned_s"] for m in report["methods"].values()) + 1e-12
    # a random model never writes '#### n': every chain runs the whole step budget;
    # batches of 4, 4, 2 questions, three steps each, step s to the node placed for it
    queries, nodes = _step_queries(grid), report["nodes"]
    assert len(queries) == 3 * 3 + 3  # then the monolithic baseline: one step per batch
    best = nodes[names.index(report["monolithic"]["devices"][0])]
    assert names[nodes.index(best)].startswith("laptop")  # the fastest: least latency
    assert [(q.metadata.dst_node_id, q.content["config"]["max-tokens"])
            for q in queries[9:]] == [(best, 9)] * 3
    queries = queries[:9]
    assert [q.metadata.dst_node_id for q in queries] == 3 * [nodes[d] for d in placed]
    assert [len(q.content["config"]["questions"]) for q in queries] == [4] * 6 + [2] * 3
    rows = [json.loads(x) for x in (run_dir / "serve_cot_questions.jsonl").read_text()
            .splitlines()]
    replies = [r for r in grid.replies if "steps" in r.content]
    for i, row in enumerate(rows):
        assert [s["node"] for s in row["steps"]] == [nodes[d] for d in placed]
        assert all(1 <= s["new_tokens"] <= 3 for s in row["steps"])
        b, j = divmod(i, 4)
        texts = [list(replies[3 * b + s].content["steps"]["texts"])[j] for s in range(3)]
        assert row["chain"] == "".join(texts)
        # the next step's query carried the chain so far
        assert list(queries[3 * b + 2].content["config"]["chains"])[j] == "".join(texts[:2])
    cot, mono = report["cot"], report["monolithic"]
    assert cot["steps"] == 3.0 and mono["steps"] == 1.0 and mono["tokens"] == cot["tokens"]
    assert cot["memory"]["devices"] == 3 and mono["memory"]["devices"] == 1
    assert cot["memory"]["sum_mib"] > 2.9 * mono["memory"]["sum_mib"]  # each holds the model
    assert cot["bytes_down"] > mono["bytes_down"]  # the chain goes down again each step


class FinishingGrid(InProcessGrid):
    """Question 1's first step states its final answer in full."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            steps = reply.content.config_records.get("steps")
            asked = list(self.sent[-1][1].content["config"].get("questions", []))
            if steps is not None and "What is 1 plus 2?" in asked and \
                    int(self.sent[-1][1].content["config"]["step"]) == 0:
                texts = list(steps["texts"])
                texts[asked.index("What is 1 plus 2?")] = " 1 + 2 = 3\n#### 3\n"
                steps["texts"] = texts
        return replies


def test_a_chain_stops_at_its_final_answer_and_is_scored(tiny_llama, small_gsm8k, tmp_path):
    raw = _raw(tiny_llama, small_gsm8k, tmp_path, **{"serve.cot-baseline": False,
                                                     "serve.cot-placement": "greedy"})
    grid = FinishingGrid(raw, num_nodes=3)
    run_dir = _run(grid, raw)
    rows = [json.loads(x) for x in (run_dir / "serve_cot_questions.jsonl").read_text()
            .splitlines()]
    assert len(rows[1]["steps"]) == 1 and rows[1]["correct"]
    assert all(len(r["steps"]) == 3 and not r["correct"] for i, r in enumerate(rows) if i != 1)
    report = json.loads((run_dir / "serve_cot.json").read_text())
    assert report["cot"]["exact_match"] == pytest.approx(0.1) and "monolithic" not in report
    assert [len(q.content["config"]["questions"]) for q in _step_queries(grid)][:3] == [4, 3, 3]


def test_cot_refuses_what_it_cannot_serve(tiny_llama, small_gsm8k, tmp_path):
    raw = _raw(tiny_llama, small_gsm8k, tmp_path, task="lm-cls")
    with pytest.raises(ConfigError, match="task='causal-lm'"):
        _run(InProcessGrid(raw, num_nodes=3), raw)
    raw = _raw(tiny_llama, small_gsm8k, tmp_path, **{"serve.cot-max-steps": 4})
    with pytest.raises(ConfigError, match="serve.cot-device-steps"):
        _run(InProcessGrid(raw, num_nodes=3), raw)


def test_serve_cot_benchmark(tiny_llama, small_gsm8k, tmp_path):
    out = tmp_path / "bench"
    run_bench("serve_cot.py", "--model", str(tiny_llama), "--data", str(small_gsm8k),
              "--questions", "4", "--budget", "8", "--step-tokens", "2,4",
              "--fleet-sizes", "3,5", "--fleet-trials", "2", "--out", str(out))
    res = json.loads((out / "serve_cot.json").read_text())
    check_provenance(res, "serve_cot.py")
    runs = {r["step_tokens"]: r for r in res["runs"]}
    assert set(runs) == {8, 4, 2} and runs[8]["max_steps"] == 1 and runs[2]["max_steps"] == 4
    assert runs[2]["result"]["memory"]["sum_mib"] > 3.9 * runs[8]["result"]["memory"]["sum_mib"]
    assert runs[8]["result"]["same_text_as_monolithic"] == 1.0
    assert {(p["links"], p["devices"]) for p in res["placement"]} == {
        (links, d) for links in ("relay", "direct") for d in (3, 5)}
    for p in res["placement"]:  # exact is a lower bound of every other method's latency
        assert all(p[m]["gap"] >= -1e-12 and p[m]["gap_max"] >= p[m]["gap"] - 1e-12
                   for m in ("heuristic", "greedy", "random"))
        assert p["exact"]["seconds"] <= min(p[m]["seconds"] for m in ("heuristic", "greedy",
                                                                      "random")) + 1e-9
    # and not a degenerate comparison: random placement loses somewhere
    assert max(p["random"]["gap_max"] for p in res["placement"]) > 0.0
    check_render("serve_cot.py", out, "serve_cot.md")
    assert (out / "serve_cot.png").is_file()
    run_bench("serve_cot.py", "--placement-only", "--fleet-sizes", "4", "--fleet-trials", "1",
              "--step-tokens", "2,4", "--out", str(out))
    again = json.loads((out / "serve_cot.json").read_text())
    assert again["runs"] == res["runs"] and [p["devices"] for p in again["placement"]] == [4, 4]
    assert "--placement-only" in (out / "serve_cot.md").read_text()


def test_a_one_step_chain_is_the_monolithic_greedy_answer(tiny_llama):
    from edge_lam.serving.answer import Member, _member_model
    from edge_lam.serving.generation import scored_answers
    from edge_lam.serving.steps import continue_chains

    cfg = RunConfig.from_run_config({"model": str(tiny_llama), "task": "causal-lm"})
    model, tokenizer, mcfg = _member_model(cfg, Member(str(tiny_llama)), ())
    questions = [f"What is {i} plus {i + 1}?" for i in range(5)]
    steps = continue_chains(model, tokenizer, mcfg, questions, [""] * 5, 6, batch_size=2)
    whole = scored_answers(model, tokenizer, mcfg, questions, 6, batch_size=2, logprobs=False)
    assert [s.text for s in steps] == [t for t, _ in whole]
    assert all(s.new_tokens == 6 and not s.ended for s in steps)
    # a later step sees the question and the chain so far: more context, at most 4 new tokens
    more = continue_chains(model, tokenizer, mcfg, questions, [s.text for s in steps], 4)
    assert all(m.context_tokens > s.context_tokens and m.new_tokens <= 4
               for m, s in zip(more, steps))


def test_bounded_context_steps_see_only_the_previous_step(tiny_llama, small_gsm8k, tmp_path):
    """serve.cot-context='last': step s > 0 gets the question and step s - 1's text only, so
    its context is bounded by question + cot-step-tokens whatever the chain's length; the
    server still answers with the whole chain."""
    raw = _raw(tiny_llama, small_gsm8k, tmp_path, **{"serve.cot-context": "last",
                                                     "serve.cot-baseline": False,
                                                     "serve.cot-max-steps": 4,
                                                     "serve.cot-device-steps": 2})
    grid = InProcessGrid(raw, num_nodes=3)
    run_dir = _run(grid, {**raw})
    queries = _step_queries(grid)
    replies = [r for r in grid.replies if "steps" in r.content]
    rows = [json.loads(x) for x in (run_dir / "serve_cot_questions.jsonl").read_text()
            .splitlines()]
    from edge_lam.data.encode import pose
    from edge_lam.models.lora_model import load_tokenizer
    from edge_lam.serving.steps import chain_ids

    cfg = RunConfig.from_run_config(raw)
    tok = load_tokenizer(str(tiny_llama))
    for i, row in enumerate(rows):
        b, j = divmod(i, 4)
        texts = [list(replies[4 * b + s].content["steps"]["texts"])[j] for s in range(4)]
        assert row["chain"] == "".join(texts)  # the answer is the whole chain
        seen = [list(queries[4 * b + s].content["config"]["chains"])[j] for s in range(4)]
        assert seen == [""] + texts[:3]  # each step: the previous step's text only
        prompt = len(pose(tok, cfg, list(queries[4 * b].content["config"]["questions"])[j]))
        for s, step in enumerate(row["steps"]):  # the question + the previous step, no more
            assert step["context_tokens"] == prompt + len(chain_ids(tok, seen[s]))
    report = json.loads((run_dir / "serve_cot.json").read_text())
    assert report["run_config"]["serve_cot_context"] == "last"
