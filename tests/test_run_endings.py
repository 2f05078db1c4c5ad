"""How runs end (issue 26, item 3): a misspelled key is named with the closest known key; a
configuration error ends the run `finished:failed` with the message in `flwr ls` and one
line instead of a traceback; a `data.path` the user set that does not exist is an error
naming it; the SuperLink `flwr run .` left running is found and stopped by its PID."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.common import copy_app
from edge_lam.config.run_config import ConfigError, RunConfig


# ------------------------------------------------------------------------ misspelled keys
def test_config_check_names_the_unknown_key_and_the_closest(capsys):
    from edge_lam.cli.main import main

    assert main(["config", "--check", "lora-rnak=4"]) == 2
    err = capsys.readouterr().err
    assert "unknown run-config key(s) lora-rnak (did you mean 'lora.fedavg-rank'?)" in err
    assert "[code: 15] Invalid run configuration." in err  # what Flower will say instead


def test_config_check_of_a_recipe_file(tmp_path, capsys):
    from edge_lam.cli.main import main

    bad = tmp_path / "bad.toml"
    bad.write_text('strategy = "flexlora"\n[train]\nlrr = 0.1\n')
    assert main(["config", "--check", str(bad)]) == 2
    assert "train.lrr (did you mean 'train.lr'?)" in capsys.readouterr().err
    good = tmp_path / "good.toml"
    good.write_text('strategy = "flexlora"\n[train]\nlr = 0.1\n')
    assert main(["config", "--check", str(good)]) == 0
    assert "ok: strategy=flexlora" in capsys.readouterr().out


def test_config_check_names_a_bad_value(capsys):
    from edge_lam.cli.main import main

    assert main(["config", "--check", "num-server-rounds=0"]) == 2
    assert "num-server-rounds=0 is too small" in capsys.readouterr().err


def test_the_app_parser_suggests_the_closest_key_too():
    with pytest.raises(ConfigError, match=r"trian\.lr \(did you mean 'train\.lr'\?\)"):
        RunConfig.from_run_config({"trian.lr": 0.1})


# ------------------------------------------------------------------------ data.path
def test_a_data_path_that_does_not_exist_is_named(tmp_path):
    from edge_lam.data.text import resolve_data_path

    missing = tmp_path / "agnwes"
    cfg = RunConfig.from_run_config({"data.path": str(missing)})
    with pytest.raises(ConfigError, match=rf"data.path='{re.escape(str(missing))}' does not "
                                          "exist"):
        resolve_data_path(cfg)
    relative = RunConfig.from_run_config({"data.path": "no/such/folder"})
    with pytest.raises(ConfigError, match=r"relative to the working directory"):
        resolve_data_path(relative)
    # empty: the hub dataset, as documented
    assert resolve_data_path(RunConfig.from_run_config({"data.path": ""})) is None


# ------------------------------------------------------------------------ RunFailed: one line
def test_flower_logs_our_run_failed_without_its_traceback():
    from server_app.app import RunFailed, quiet_run_failed

    quiet_run_failed()
    flower = logging.getLogger("flwr")
    try:
        raise RunFailed("edge-lam: configuration error: data.text-column='body' is not a column")
    except RunFailed as err:
        record = flower.makeRecord("flwr", logging.ERROR, __file__, 1, "%s raised an exception",
                                   ("Simulation",), (type(err), err, err.__traceback__))
    assert flower.filter(record)
    assert record.exc_info is None
    assert logging.Formatter().format(record).count("\n") == 0
    try:
        raise ValueError("not ours")
    except ValueError as err:
        other = flower.makeRecord("flwr", logging.ERROR, __file__, 1, "%s raised", ("x",),
                                  (type(err), err, err.__traceback__))
    assert flower.filter(other) and other.exc_info is not None  # Flower's own: untouched


@pytest.mark.e2e
def test_a_config_error_fails_the_run_with_one_line(flower_env, tiny_bert, agnews, tmp_path):
    app = copy_app(tmp_path / "app")
    proc = subprocess.run(
        ["flwr", "run", str(app), "--stream", "--run-config",
         f"model='{tiny_bert}' data.path='{tmp_path / 'agnwes'}' "
         f"results-dir='{tmp_path / 'results'}'", "--federation-config", "num-supernodes=2"],
        env=flower_env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    message = f"data.path='{tmp_path / 'agnwes'}' does not exist"
    assert f"ERROR edge-lam: configuration error: {message}" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    started = re.search(r"Successfully started run (\d+)", out)
    listed = subprocess.run(["flwr", "ls", "--format", "json"], env=flower_env, cwd=app,
                            capture_output=True, text=True, timeout=120)
    mine = [r for r in json.loads(listed.stdout)["runs"] if r["run-id"] == started.group(1)]
    assert mine[0]["status"] == "finished:failed", mine
    assert message in mine[0]["status-details"], mine


# ------------------------------------------------------------------------ the local SuperLink
def test_superlink_stop_stops_only_the_one_of_this_flwr_home(tmp_path, monkeypatch):
    """Two stand-ins named flower-superlink, started as `flwr run` starts it (--log-file
    under FLWR_HOME): `stop` ends this FLWR_HOME's, by PID, and leaves the other running."""
    from edge_lam.cli import local_superlink

    def fake_superlink(home: Path) -> subprocess.Popen:
        log = local_superlink.log_file_of(home)
        return subprocess.Popen(
            ["bash", "-c", f'exec -a flower-superlink {sys.executable} -c "import time; '
             'time.sleep(120)" "$@"', "_", "--insecure", "--simulation", "--log-file", str(log)],
            cwd=tmp_path)

    mine, other = fake_superlink(tmp_path / "home"), fake_superlink(tmp_path / "elsewhere")
    try:
        deadline = time.monotonic() + 10
        while len({p.pid for p in local_superlink.superlinks()} & {mine.pid, other.pid}) < 2:
            assert time.monotonic() < deadline, "the stand-ins never showed up in /proc"
            time.sleep(0.1)
        monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
        status = local_superlink.status_lines(local_superlink.flwr_home())
        assert any(f"SuperLink PID {mine.pid} (this FLWR_HOME's)" in s and str(tmp_path) in s
                   for s in status), status
        from edge_lam.cli.main import main

        assert main(["superlink", "stop"]) == 0
        assert mine.wait(timeout=10) is not None
        assert other.poll() is None
        assert "nothing to stop" in local_superlink.stop(tmp_path / "home")
    finally:
        for proc in (mine, other):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_superlink_status_without_one(tmp_path, monkeypatch):
    from edge_lam.cli import local_superlink

    monkeypatch.setattr(local_superlink, "superlinks", lambda proc=None: [])
    assert "no SuperLink runs" in local_superlink.status_lines(tmp_path)[0]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
