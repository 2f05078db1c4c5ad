"""A device whose Python starts slower than Flower's 30 s window, with and without the lever.

Flower 1.39's SuperNode claims a task, launches a fresh `flwr-clientapp` and forgets the claim
unless that process sends its first heartbeat within HEARTBEAT_DEFAULT_INTERVAL (30 s). Two
devices whose every Python process starts 40 s late (a loaded board, a cold SD card; the
emulated Pi of tests/test_arm64_supernode.py takes minutes) join one TLS federation:

- `--runtime flower` (Flower's default): its ClientApps start after their claims expired and
  are refused (401) while the SuperNode launches more for the same task, so it never even
  answers the server's profile QUERY: the failure the issue reported, reproduced;
- `--runtime warm` (deploy/supernode.sh's default, client_app/runtime.py): it pays the slow
  start once, before claiming, answers and trains in one process.

The edge server starts its Python processes 40 s late too: its SuperLink would refuse the
run's ServerApp the same way (the run never starts: seen by hand, 10 minutes without a
round), but deploy/superlink.sh's --start-window (120 s, server_app/superlink.py) lets it in,
and the run ends `finished:completed`.
"""

from __future__ import annotations

import re

import pytest

from benchmarks.common import copy_app
from benchmarks.federation import Device, Federation, FederationError, slow_python_start

SLOW_S = 40


@pytest.mark.e2e
def test_slow_device_trains_once_per_round_only_with_the_warm_runtime(tiny_bert, agnews_short,
                                                                        tmp_path, timings):
    data = agnews_short(32)
    slow = slow_python_start(tmp_path / "slow-python", SLOW_S)
    node = f"data-dir='{data}' partition-id=0 num-partitions=1"
    devices = [Device("warm", "rpi4", node, runtime="warm", env=slow),
               Device("flower", "rpi5", node, runtime="flower", env=slow)]
    run_config = " ".join([f"model='{tiny_bert}'", f"data.path='{data}'", "num-server-rounds=1",
                           "min-devices=1", "train.local-steps=2", "train.batch-size=8",
                           "eval.max-examples=32", f"round-timeout={2 * SLOW_S + 20}.0"])
    with Federation(tmp_path / "fed", devices, server_env=slow) as fed:
        try:
            fed.wait_ready(300)
            rows, out, run_id = fed.run(copy_app(tmp_path / "app"), run_config, timeout=900)
            status = fed.run_status(run_id)
        except FederationError as err:
            pytest.fail(str(err))
        warm_log, flower_log = fed.log("warm"), fed.log("flower")

    assert [r["round"] for r in rows] == [0, 1], out[-3000:]
    warm = rows[1]["clients"]
    assert [(c["device"], int(c["process_task"])) for c in warm] == [("rpi4", 1)], rows[1]
    assert warm[0]["startup_s"] < 5.0, warm
    assert warm_log.count("[slow start] edge-lam-device") == 1, warm_log[-2000:]
    assert warm_log.count("claiming tasks at") == 1, warm_log[-2000:]
    assert "authentication failed" not in warm_log, warm_log[-2000:]
    assert status == "finished:completed", status
    # the default runtime: every ClientApp started after its claim had lapsed; the SuperNode
    # launched more for the same task and refused the late ones' calls
    launches = len(re.findall(r"\[slow start\] flwr-clientapp", flower_log))
    timings.append(f"slow start ({SLOW_S} s per Python process): the warm runtime answered and "
                   f"trained; Flower's default launched {launches} ClientApps, none answered")
    assert launches >= 2, flower_log[-3000:]
    assert "Runtime task-token authentication failed" in flower_log, flower_log[-3000:]
    assert f"is a 'rpi5' device" not in out  # it never described itself
