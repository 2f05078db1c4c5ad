"""Exact resume (R3) through Flower: a `flwr run` whose ServerApp process is killed after
round 1 is continued by `flwr run ... resume='<its folder>'` and ends with the metrics of an
uninterrupted run of the same seed.

The ServerApp of a simulation runs in the `flwr-simulation` process the SuperLink (through its
SuperExec) starts for the run; this test's own SuperLink is found by its FLWR_HOME database and
the process killed by PID (SIGKILL: no handler runs), with any children it had.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from flower_e2e import flwr_run_app

from benchmarks.common import copy_app

ROUNDS, KILL_AFTER, NODES = 3, 1, 2


def _config(tiny_bert, data: Path) -> list[str]:
    return [f"model='{tiny_bert}'", f"data.path='{data}'", f"num-server-rounds={ROUNDS}",
            "train.local-steps=1", "train.batch-size=8", "eval.max-examples=32",
            "strategy='hetlora'", "seed=5", "train.lr=0.02"]


def _simulation_process(env: dict) -> psutil.Process | None:
    """The flwr-simulation process under this test's SuperLink (the one on its FLWR_HOME)."""
    database = str(Path(env["FLWR_HOME"]) / "state.db")
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        superlink = (any(c.endswith("flower-superlink") for c in cmd[:2])
                     or "server_app.superlink" in cmd[:3])  # tests' launcher (flower_e2e)
        if superlink and database in cmd:
            for child in proc.children(recursive=True):
                try:
                    if any(c.endswith("flwr-simulation") for c in child.cmdline()[:2]):
                        return child
                except psutil.NoSuchProcess:
                    continue
    return None


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_a_killed_run_resumes_to_the_same_metrics(flower_env, tiny_bert, agnews_short,
                                                  tmp_path):
    data = agnews_short(32)
    config = _config(tiny_bert, data)

    whole, _ = flwr_run_app(tmp_path / "whole", flower_env, config, num_supernodes=NODES)

    # the same run, its ServerApp process killed once round KILL_AFTER is checkpointed
    cut_dir = tmp_path / "cut"
    results = cut_dir / "results"
    app = copy_app(tmp_path / "cut-app")  # (flwr_run_app below copies to cut/app)
    cli = subprocess.Popen(
        ["flwr", "run", str(app), "--stream", "--run-config",
         " ".join([f"results-dir='{results}'", *config]),
         "--federation-config", f"num-supernodes={NODES}"],
        env=flower_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, killed = time.monotonic() + 240, None
        while time.monotonic() < deadline and killed is None:
            states = list(results.glob("*/checkpoint/state.json")) if results.exists() else []
            if states:
                try:
                    done = json.loads(states[0].read_text())["round"]
                except (OSError, ValueError):
                    done = -1
                if done >= KILL_AFTER:
                    sim = _simulation_process(flower_env)
                    assert sim is not None, "no flwr-simulation process found"
                    children = sim.children(recursive=True)
                    sim.kill()  # the ServerApp dies mid-run, by PID
                    for child in children:
                        try:
                            child.kill()
                        except psutil.NoSuchProcess:
                            pass
                    killed = done
            assert cli.poll() is None or killed is not None, cli.stdout.read()[-3000:]
            time.sleep(0.05)
        assert killed is not None, f"the run never checkpointed round {KILL_AFTER}"
    finally:
        if cli.poll() is None:
            cli.terminate()  # the `flwr run --stream` we started, by its PID
        try:
            cli.wait(timeout=20)
        except subprocess.TimeoutExpired:
            cli.kill()
    cut = next(results.iterdir())
    assert not (cut / "adapter").exists(), "the run ended before it was killed"
    rows = _rows(cut)
    assert killed <= rows[-1]["round"] < ROUNDS

    # resumed: a new run id, a new simulation (new node ids), the same folder going on
    resumed, out = flwr_run_app(cut_dir, flower_env, [*config, f"resume='{cut}'"],
                                num_supernodes=NODES)
    assert resumed == cut and f"after round {killed} of {ROUNDS}" in out
    got, want = _rows(cut), _rows(whole)
    assert [r["round"] for r in got] == list(range(ROUNDS + 1)) == [r["round"] for r in want]
    for a, b in zip(got, want):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6), a["round"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6), a["round"]
        la = {c["partition_id"]: c["train_loss"] for c in a["clients"]}
        lb = {c["partition_id"]: c["train_loss"] for c in b["clients"]}
        assert la.keys() == lb.keys() and len(la) == (NODES if a["round"] else 0)
        for p in la:
            assert la[p] == pytest.approx(lb[p], rel=1e-6), (a["round"], p)
    new_nodes = {c["node_id"] for c in got[-1]["clients"]}
    assert new_nodes.isdisjoint({c["node_id"] for c in got[1]["clients"]})
    assert json.loads((cut / "config.json").read_text())["resumed"][0]["after_round"] == killed
    assert (cut / "adapter" / "adapter_model.safetensors").is_file()
