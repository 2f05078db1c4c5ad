"""The proof-of-forgetting benchmark's own pieces: backdoor planting and the MIA AUC."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from edge_lam.data.text import Examples

_spec = importlib.util.spec_from_file_location(
    "unlearning_benchmark", Path(__file__).parents[1] / "benchmarks" / "unlearning.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_backdoor_flips_only_triggered_texts_of_other_classes():
    texts = [f"story number {i} about things" for i in range(40)]
    labels = [i % 4 for i in range(40)]
    poisoned, count = bench.plant_backdoor(Examples(texts, labels, []), 0.5, "cf", 2, seed=0)
    assert count == 20
    for before, after, y_before, y_after in zip(texts, poisoned.texts, labels,
                                                poisoned.labels):
        triggered = "cf" in after.split()
        assert triggered == (after != before)
        assert y_after == (2 if triggered else y_before)
        assert not (triggered and y_before == 2)  # only other classes are flipped
        if triggered:
            assert sorted(after.split()) == sorted(before.split() + ["cf"])
    test = bench.triggered_test(Examples(texts, labels, []), "cf", 2, seed=0)
    assert len(test) == 30 and 2 not in test.labels
    assert all("cf" in t.split() for t in test.texts)


def test_mia_auc_is_the_probability_members_have_lower_loss():
    rng = np.random.default_rng(0)
    members, unseen = rng.exponential(1.0, 50), rng.exponential(2.0, 60)
    members[:5] = unseen[:5]  # ties count half
    brute = np.mean([(m < u) + 0.5 * (m == u) for m in members for u in unseen])
    assert bench.auc_members_lower_loss(members, unseen) == pytest.approx(brute, abs=1e-12)
    assert bench.auc_members_lower_loss(np.zeros(3), np.ones(3)) == 1.0
    assert bench.auc_members_lower_loss(np.ones(4), np.ones(5)) == 0.5



def test_benchmark_runs_end_to_end_on_a_tiny_model(tmp_path, agnews, tiny_bert):
    """The whole study (train with the backdoor, retrain, S4, baselines, variants) on a
    2-layer random BERT: every setup is measured, its rounds and bytes are exactly what its
    devices sent, and the report is written from the JSON."""
    import json
    import subprocess
    import sys

    from edge_lam.config.run_config import RunConfig

    out = tmp_path / "out"
    cmd = [sys.executable, str(Path(bench.__file__)), "--model", str(tiny_bert), "--data",
           str(agnews), "--rounds", "2", "--devices", "3", "--local-steps", "1",
           "--poison-steps", "2", "--unlearn-rounds", "1", "--recovery-rounds", "2",
           "--forget-device", "1", "--grad-batches", "1", "--test-examples", "40",
           "--mia-examples", "20", "--max-length", "32", "--variants", "fedosd:0.5:1:0",
           "--studies", "plain", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((out / "unlearning.json").read_text())
    assert run["machine"]["cores"] >= 1 and "unlearning.py" in run["command"]
    study = run["studies"]["without differential privacy"]
    results = study["results"]
    assert set(results) == {"trained (with backdoor)", "retrain without it (a)",
                            "S4 unlearning (ours)", "continue without it (b)",
                            "gradient ascent (c)"}
    # payload bytes of one device's module at its rank, sent down and returned up each round:
    # tiny BERT, 2 layers x (query, value) x (A: r x 32, B: 32 x r) + the 4 x 32 head, float32
    cfg = RunConfig.from_run_config({"model": str(tiny_bert), "strategy": "hetlora"})
    rank = {p: cfg.rank_for(cfg.device_for(p)) for p in range(3)}
    assert list(rank.values()) == [2, 4, 8]
    both_ways = {p: 2 * (2 * 2 * 2 * 32 * r + 4 * 32 + 4) * 4 for p, r in rank.items()}
    everyone, remaining, forget = sum(both_ways.values()), both_ways[0] + both_ways[2], \
        both_ways[1]
    R, U, R_rec = 2, 1, 2
    expected = {  # setup: (rounds, bytes)
        "trained (with backdoor)": (R, R * everyone),
        "retrain without it (a)": (R, R * remaining),
        # unlearning rounds: every device sends a gradient the size of its module
        "S4 unlearning (ours)": (U + R_rec, U * everyone + R_rec * remaining),
        "continue without it (b)": (U + R_rec, (U + R_rec) * remaining),
        # ascent: only the forgotten device's gradient, then ordinary recovery
        "gradient ascent (c)": (U + R_rec, U * forget + R_rec * remaining),
    }
    for name, (rounds, nbytes) in expected.items():
        row = results[name]
        assert (row["rounds"], row["bytes"]) == (rounds, nbytes), name
        assert 0.0 <= row["asr"] <= 1.0 and 0.0 <= row["mia_auc"] <= 1.0
        assert row["wall_s"] > 0
    ours, retrain = results["S4 unlearning (ours)"], results["retrain without it (a)"]
    assert study["targets"]["bytes <= 30% of retrain"] == (ours["bytes"] <= 0.3 * retrain["bytes"])
    assert study["targets"]["asr <= retrain + 0.05"] == (ours["asr"] <= retrain["asr"] + 0.05)
    assert [(v["unlearn_rounds"], v["recovery_rounds"]) for v in study["variants"]] == [(1, 0)]
    assert study["variants"][0]["bytes"] == U * everyone
    md = (out / "unlearning.md").read_text()
    assert md.count("| S4 unlearning (ours) |") == 1
    assert (out / "unlearning.png").stat().st_size > 0
    (out / "unlearning.md").unlink()
    subprocess.run([sys.executable, str(Path(bench.__file__)), "--render", "--out", str(out)],
                   check=True, capture_output=True)
    assert (out / "unlearning.md").read_text() == md
