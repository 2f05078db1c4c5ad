"""The warm device runtime's pieces (client_app/runtime.py, edge_lam/training/overhead.py) in isolation;
the runtime itself runs in tests/test_slow_start.py, test_deploy_netns.py and
test_arm64_supernode.py against real SuperNodes."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client_app.runtime import build_parser, forget_app_modules, preload
from edge_lam.training import overhead

ROOT = Path(__file__).resolve().parents[1]


def _app(folder, value: int):
    (folder / "demoapp").mkdir(parents=True)
    (folder / "demoapp" / "__init__.py").write_text("")
    (folder / "demoapp" / "mod.py").write_text(f"VALUE = {value}\n")
    (folder / "demo_top.py").write_text(f"VALUE = {value}\n")
    return folder


def test_a_new_fab_replaces_the_apps_modules_but_not_the_libraries(tmp_path, monkeypatch):
    old, new = _app(tmp_path / "fab-1", 1), _app(tmp_path / "fab-2", 2)
    monkeypatch.setattr(sys, "path", [str(old), *sys.path])
    assert importlib.import_module("demoapp.mod").VALUE == 1
    assert importlib.import_module("demo_top").VALUE == 1
    torch_module = importlib.import_module("torch")

    gone = forget_app_modules(new, old)
    sys.path.insert(0, str(new))
    assert set(gone) == {"demoapp", "demoapp.mod", "demo_top"}
    assert str(old) not in sys.path
    assert importlib.import_module("demoapp.mod").VALUE == 2
    assert importlib.import_module("demo_top").VALUE == 2
    assert sys.modules["torch"] is torch_module  # the preloaded libraries stay


def test_startup_counts_from_the_claim_in_the_warm_runtime(monkeypatch):
    monkeypatch.setenv(overhead.CLAIMED_AT_ENV, repr(1000.0))
    assert overhead.startup_s(now=1002.5) == pytest.approx(2.5)


def test_startup_counts_from_the_process_start_in_a_fresh_clientapp(monkeypatch):
    """The start time lies between the moment before the process was spawned and its own
    first line (/proc's clock ticks: 10 ms; psutil's create_time is no reference, its boot
    time is whole seconds)."""
    before = time.time()
    done = _python("import time; first = time.time()\n"
                   "from edge_lam.training import overhead\n"
                   "print(first, overhead.process_started_at())")
    assert done.returncode == 0, done.stderr
    first, started = map(float, done.stdout.split())
    assert before - 0.05 <= started <= first + 0.05, (before, started, first)
    monkeypatch.delenv(overhead.CLAIMED_AT_ENV, raising=False)
    now = time.time()
    assert overhead.startup_s(now) == pytest.approx(now - overhead.process_started_at(),
                                                    abs=0.02)


def test_handled_metrics_count_the_tasks_of_one_process(monkeypatch):
    monkeypatch.setenv(overhead.CLAIMED_AT_ENV, repr(time.time() - 1.0))
    first = overhead.handled(time.time() - 0.25)
    second = overhead.handled(time.time())
    assert second["process-task"] == first["process-task"] + 1
    assert first["startup-s"] == pytest.approx(0.75, abs=0.2)
    assert first["handler-s"] == pytest.approx(0.25, abs=0.2)


def test_cli_defaults_and_preload_errors():
    args = build_parser().parse_args(["--insecure"])
    assert args.runtime_api_address == "127.0.0.1:9094" and args.max_tasks == 0
    assert preload("") == pytest.approx(0.0, abs=0.05)
    with pytest.raises(ModuleNotFoundError):
        preload("json, no_such_module_here")
    with pytest.raises(SystemExit):  # TLS and --insecure together make no sense
        build_parser().parse_args(["--insecure", "--root-certificates", "ca.crt"])


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT)


def test_the_superlinks_start_window_reaches_flowers_state_modules():
    done = _python("from server_app.superlink import set_start_window\n"
                   "print(set_start_window(90))\n"
                   "import flwr.supercore.corestate.in_memory_corestate as a\n"
                   "import flwr.supercore.corestate.sql_corestate as b\n"
                   "print(a.HEARTBEAT_DEFAULT_INTERVAL, b.HEARTBEAT_DEFAULT_INTERVAL)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["90.0", "90.0", "90.0"]
    never_shorter = _python("from server_app.superlink import set_start_window\n"
                            "print(set_start_window(5))")
    assert never_shorter.stdout.split() == ["30"]
    too_late = _python("import flwr.supercore.corestate.in_memory_corestate\n"
                       "from server_app.superlink import set_start_window\n"
                       "set_start_window(90)")
    assert too_late.returncode != 0 and "already read Flower's start window" in too_late.stderr
