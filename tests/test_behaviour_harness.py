"""The before/after comparison of benchmarks/behaviour.py (its logic only, not the scenarios):
equal snapshots give 0; a changed number, a missing row, an extra key, a changed string and
a missing scenario are all reported; excluded timing keys are not compared."""

from __future__ import annotations

import copy
import json
import math

from benchmarks.behaviour import EXCLUDED_KEYS, compare, run_compare


def snapshot() -> dict:
    rows = [{"round": 0, "accuracy": 0.25, "loss": 1.38, "wall_s": 0.5, "clients": []},
            {"round": 1, "accuracy": 0.5, "loss": 1.2, "wall_s": 0.7, "phase": "train",
             "clients": [{"node_id": 1001, "rank": 2, "train_loss": 1.3},
                         {"node_id": 1002, "rank": 4, "train_loss": float("nan")}]}]
    return {"machine": {"git_commit": "abc"}, "threads": 1, "scenarios": {
        "default": {"results": {"metrics.jsonl": rows, "adapter": [{"a.safetensors": "ff"}]}},
        "infer": {"results": {"infer.json": [{"members": [{"accuracy": 0.3}]}]}}}}


def changed(result: dict, name: str) -> dict:
    return {m: e for m, e in result[name]["metrics"].items()
            if e["max_abs_diff"] or e["mismatches"] or e["missing"] or e["extra"]}


def test_equal_snapshots_give_zero_everywhere():
    result = compare(snapshot(), snapshot())  # NaN equals NaN
    for r in result.values():
        assert r["status"] == "identical" and r["max_abs_diff"] == 0
        assert r["mismatches"] == r["missing"] == r["extra"] == 0 and r["compared"] > 0


def test_a_changed_number_is_reported_with_its_difference():
    after = snapshot()
    after["scenarios"]["default"]["results"]["metrics.jsonl"][1]["loss"] = 1.2 + 1e-12
    after["scenarios"]["default"]["results"]["metrics.jsonl"][1]["clients"][0]["rank"] = 3
    result = compare(snapshot(), after)
    bad = changed(result, "default")
    assert set(bad) == {"metrics.jsonl: loss", "metrics.jsonl: clients[].rank"}
    assert 0 < bad["metrics.jsonl: loss"]["max_abs_diff"] < 1e-11
    assert bad["metrics.jsonl: clients[].rank"]["max_abs_diff"] == 1
    assert result["default"]["status"] == "different"
    assert result["infer"]["status"] == "identical"


def test_nan_against_a_number_and_changed_strings_are_differences():
    after = snapshot()
    rows = after["scenarios"]["default"]["results"]["metrics.jsonl"]
    rows[1]["clients"][1]["train_loss"] = 1.0
    rows[1]["phase"] = "recover"
    after["scenarios"]["default"]["results"]["adapter"] = [{"a.safetensors": "00"}]
    bad = changed(compare(snapshot(), after), "default")
    assert math.isinf(bad["metrics.jsonl: clients[].train_loss"]["max_abs_diff"])
    assert bad["metrics.jsonl: phase"]["mismatches"] == 1
    assert bad["adapter: a.safetensors"]["mismatches"] == 1


def test_a_missing_row_and_an_extra_key_are_reported_not_ignored():
    after = snapshot()
    rows = after["scenarios"]["default"]["results"]["metrics.jsonl"]
    rows.pop()  # round 1 gone
    rows[0]["new_metric"] = 7
    result = compare(snapshot(), after)
    bad = changed(result, "default")
    assert bad["metrics.jsonl: row"]["missing"] == 1
    assert bad["metrics.jsonl: new_metric"]["extra"] == 1
    assert bad["metrics.jsonl: clients[].rank"]["missing"] == 2
    assert result["default"]["missing"] > 0 and result["default"]["extra"] == 1
    # and the other way round: a row only AFTER has is extra
    reverse = changed(compare(after, snapshot()), "default")
    assert reverse["metrics.jsonl: row"]["extra"] == 1


def test_missing_scenario_and_file_are_reported():
    after = snapshot()
    del after["scenarios"]["infer"]
    after["scenarios"]["default"]["results"]["unlearning.json"] = [{"status": "done"}]
    result = compare(snapshot(), after)
    assert result["infer"]["status"] == "missing"
    assert changed(result, "default")["unlearning.json: row"]["extra"] == 1
    assert compare(after, snapshot())["infer"]["status"] == "extra"


def test_excluded_timing_keys_are_not_compared(tmp_path):
    after = snapshot()
    for row in after["scenarios"]["default"]["results"]["metrics.jsonl"]:
        row["wall_s"] += 100.0
    assert "wall_s" in EXCLUDED_KEYS
    result = compare(snapshot(), after)
    assert result["default"]["status"] == "identical"
    assert not any("wall_s" in m for m in result["default"]["metrics"])
    # the command line form writes compare.json / compare.md and exits 0 / 1
    (tmp_path / "a.json").write_text(json.dumps(snapshot()))
    (tmp_path / "b.json").write_text(json.dumps(after))
    assert run_compare(str(tmp_path / "a.json"), str(tmp_path / "b.json"), tmp_path / "o") == 0
    written = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert written["scenarios"]["default"]["status"] == "identical"
    assert "| default | identical |" in (tmp_path / "o" / "compare.md").read_text()
    worse = copy.deepcopy(after)
    worse["scenarios"]["default"]["results"]["metrics.jsonl"][0]["accuracy"] = 0.3
    (tmp_path / "c.json").write_text(json.dumps(worse))
    assert run_compare(str(tmp_path / "a.json"), str(tmp_path / "c.json"), tmp_path / "o") == 1
