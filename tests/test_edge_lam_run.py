"""`edge-lam run` (issue 26, item 3): the run config is checked before anything is submitted
(a misspelled key exits 2 naming the closest known key), every other argument goes to `flwr
run --stream`, and the command exits with the run's final status from `flwr ls`: 0 only for
`finished:completed`, 1 with one line otherwise, 130 on Ctrl+C after `flwr stop <id>`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.common import copy_app
from edge_lam.cli import run
from flower_e2e import ROOT


# ------------------------------------------------------------------------ no Flower
def test_arguments_pass_through_to_flwr_run():
    args, rest = run.parse_args(
        ["app", "-c", "lora.alpha=32", "--run-config", "train.lr=0.1 strategy='flexlora'",
         "--federation-config", "num-supernodes=2", "--stream", "--some-new-flag", "x"])
    assert args.run_config == ["lora.alpha=32", "train.lr=0.1 strategy='flexlora'"]
    assert run.flwr_run_command(args, rest)[len(run.FLWR):] == [
        "run", "app", "--run-config", "lora.alpha=32",
        "--run-config", "train.lr=0.1 strategy='flexlora'",
        "--federation-config", "num-supernodes=2", "--some-new-flag", "x", "--stream"]
    args, rest = run.parse_args(["app", "my-link", "--federation", "@acc/fed"])
    assert run.flwr_run_command(args, rest)[len(run.FLWR):] == [
        "run", "app", "my-link", "--federation", "@acc/fed", "--stream"]
    with pytest.raises(SystemExit):
        run.parse_args([".", "--format", "json"])


def _ls(status: str, details: str = "", run_id: str = "7") -> str:
    return json.dumps({"success": True, "runs": [
        {"run-id": "3", "status": "finished:completed", "status-details": ""},
        {"run-id": run_id, "status": status, "status-details": details}]})


def test_status_parsing_and_the_final_line():
    assert run.parse_status(_ls("finished:completed"), "7") == ("finished:completed", "")
    assert run.parse_status(_ls("finished:completed", "N/A"), "7")[1] == ""  # Flower's none
    message = "edge-lam: configuration error: data.path='x' does not exist"
    status, details = run.parse_status(_ls("finished:failed", message), "7")
    assert run.final_line("7", status, details) == f"run 7 finished:failed: {message}"
    assert run.final_line("3", "finished:completed", "") == "run 3 finished:completed"
    assert run.parse_status(_ls("running"), "7") == ("running", "")
    assert run.parse_status(_ls("running"), "8")[0] == "unknown"
    assert run.parse_status("Traceback ...", "7")[0] == "unknown"
    failed = json.dumps({"success": False, "error-message": "connection refused"})
    assert run.parse_status(failed, "7") == ("unknown", "connection refused")


FAKE_FLWR = textwrap.dedent("""\
    import json, os, sys, time
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\\n")
    if sys.argv[1] == "run":
        print("Successfully started run 7", flush=True)
        print("INFO :      Starting logstream for run_id `7`", flush=True)
        time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    elif sys.argv[1] == "ls":
        print(json.dumps({"success": True, "runs": [{"run-id": "7", "status":
              os.environ["FAKE_STATUS"], "status-details": os.environ["FAKE_DETAILS"]}]}))
    elif sys.argv[1] == "stop":
        print("Run 7 stopped")
""")


@pytest.fixture()
def fake_flwr(tmp_path, monkeypatch):
    """`flwr` replaced by a script that records its calls and answers `ls` as told."""
    script = tmp_path / "flwr.py"
    script.write_text(FAKE_FLWR)
    monkeypatch.setattr(run, "FLWR", [sys.executable, str(script)])
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls"))
    return lambda: (tmp_path / "calls").read_text().splitlines()


@pytest.mark.parametrize("status, details, code", [
    ("finished:completed", "", 0),
    ("finished:failed", "edge-lam: configuration error: num-server-rounds", 1),
    ("finished:stopped", "", 1),
])
def test_the_exit_status_is_the_runs(fake_flwr, monkeypatch, capsys, status, details, code):
    monkeypatch.setenv("FAKE_STATUS", status)
    monkeypatch.setenv("FAKE_DETAILS", details)
    assert run.main([str(ROOT)]) == code
    out = capsys.readouterr().out
    assert "Successfully started run 7" in out  # streamed
    assert out.splitlines()[-1] == run.final_line("7", status, details)
    assert fake_flwr()[1] == "ls --run-id 7 --format json"


def test_a_run_still_running_is_polled_then_fails(fake_flwr, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_STATUS", "running")
    monkeypatch.setenv("FAKE_DETAILS", "")
    assert run.main([str(ROOT), "--status-wait", "1.5"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "run 7 running"
    assert 2 <= len([c for c in fake_flwr() if c.startswith("ls")]) <= 3  # bounded


def test_ctrl_c_stops_the_run(fake_flwr, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SLEEP", "60")

    def interrupted_stream(cmd, state):
        state["proc"] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True)
        state["run_id"] = run.STARTED.search(state["proc"].stdout.readline()).group(1)
        raise KeyboardInterrupt  # as Ctrl+C during the stream

    monkeypatch.setattr(run, "stream", interrupted_stream)
    assert run.main([str(ROOT)]) == 130
    assert fake_flwr()[-1] == "stop 7"
    assert "stopping run 7" in capsys.readouterr().err


# ------------------------------------------------------------------------ checked first
def test_a_misspelled_key_exits_2_before_anything_is_submitted(monkeypatch, capsys):
    from edge_lam.cli import local_superlink
    from edge_lam.cli.main import main

    def no_process(*args, **kwargs):
        raise AssertionError(f"started a process: {args}")

    before = {p.pid for p in local_superlink.superlinks()}
    monkeypatch.setattr(run.subprocess, "Popen", no_process)
    monkeypatch.setattr(run.subprocess, "run", no_process)
    assert main(["run", str(ROOT), "--run-config", "lora-rnak=4"]) == 2
    err = capsys.readouterr().err
    assert "unknown run-config key(s) lora-rnak (did you mean 'lora.fedavg-rank'?)" in err
    assert {p.pid for p in local_superlink.superlinks()} <= before
    assert main(["run", str(ROOT / "no-such-app")]) == 2
    assert "no-such-app is not a Flower app folder" in capsys.readouterr().err


# ------------------------------------------------------------------------ a real SuperLink
def _edge_lam_run(env: dict, app: Path, run_config: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_lam.cli", "run", str(app), "--run-config", run_config,
         "--federation-config", "num-supernodes=2"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_edge_lam_run_exits_with_the_runs_status(flower_env, tiny_bert, agnews_short,
                                                  tmp_path):
    app = copy_app(tmp_path / "app")
    results = tmp_path / "results"
    missing = tmp_path / "agnwes"
    failed = _edge_lam_run(flower_env, app, f"model='{tiny_bert}' data.path='{missing}' "
                                            f"results-dir='{results}'")
    out = failed.stdout + failed.stderr
    print("\n".join(failed.stdout.splitlines()[-3:]), f"\n(exit {failed.returncode})")
    assert failed.returncode == 1, out[-3000:]
    last = failed.stdout.splitlines()[-1]
    assert last.startswith("run ") and " finished:failed: " in last, out[-3000:]
    assert f"data.path='{missing}' does not exist" in last, last

    ok = _edge_lam_run(flower_env, app, f"model='{tiny_bert}' num-server-rounds=1 "
                                        f"data.path='{agnews_short(32)}' train.local-steps=1 "
                                        f"train.batch-size=4 eval.max-examples=32 "
                                        f"results-dir='{results}'")
    out = ok.stdout + ok.stderr
    print("\n".join(ok.stdout.splitlines()[-3:]), f"\n(exit {ok.returncode})")
    assert ok.returncode == 0, out[-4000:]
    assert ok.stdout.splitlines()[-1].endswith(" finished:completed"), out[-3000:]
    assert "Starting logstream" in out  # the run's log was streamed


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
