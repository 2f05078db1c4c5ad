"""A Raspberry Pi 4 as a real edge device, emulated: an aarch64 SuperNode under QEMU user mode
with a Cortex-A72 CPU, trained over gRPC + TLS with node authentication by an x86 SuperLink.

deploy/emulate-arm64.sh prepares (and caches) QEMU >= 8, a Debian arm64 sysroot and the
project's aarch64 wheels, resolved with the target's markers (it fails if they hold any
nvidia-*/CUDA package). The emulated device and an x86 twin have the same profile (rpi4, rank
2) and the same data, so the x86 twin is the reference for the aarch64 device's numbers.
Both run deploy/supernode.sh's default warm runtime (client_app/runtime.py): under emulation
the imports take minutes, far beyond Flower's 30 s start window, and the device must still
train every round exactly once.

CI runs this (it is never skipped there); EDGE_LAM_SKIP_ARM64=1 skips it on a machine without
root, apt or the network to fetch packages. EDGE_LAM_ARM64_SUITE=trixie runs Python 3.13;
EDGE_LAM_ARM64_RECORD=file.json writes what it measured (benchmarks/results/devices/).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.common import copy_app
from benchmarks.federation import DEPLOY, Device, Federation, FederationError, read_env_file

SUITE = os.environ.get("EDGE_LAM_ARM64_SUITE", "bookworm")
CPU = os.environ.get("EDGE_LAM_ARM64_CPU", "cortex-a72")  # a Raspberry Pi 4's


@pytest.fixture(scope="module")
def arm64_env(timings) -> dict:
    if os.environ.get("EDGE_LAM_SKIP_ARM64") == "1":
        pytest.skip("EDGE_LAM_SKIP_ARM64=1")
    start = time.monotonic()
    done = subprocess.run(["bash", str(DEPLOY / "emulate-arm64.sh"), "--suite", SUITE],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"deploy/emulate-arm64.sh failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    timings.extend(f"arm64 {line}" for line in done.stdout.splitlines()
                   if line.startswith("emulate-arm64:"))
    timings.append(f"arm64 setup as seen by the test: {time.monotonic() - start:.0f} s")
    return read_env_file(Path(re.search(r"ARM64_ENV=(.*)", done.stdout).group(1)))


@pytest.fixture()
def small_agnews(agnews, tmp_path) -> Path:
    """240 training and 32 test rows of AG News: tokenizing 10,000 texts under emulation
    would take minutes and prove nothing more."""
    data = tmp_path / "agnews-small"
    data.mkdir()
    for name, rows in (("train.tsv", 240), ("test.tsv", 32)):
        lines = (agnews / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (data / name).write_text("".join(lines[:rows + 1]), encoding="utf-8")
    return data


@pytest.mark.e2e
def test_emulated_pi4_supernode_trains_over_tls(arm64_env, tiny_bert, small_agnews, tmp_path,
                                                 timings):
    data = f"data-dir='{small_agnews}' partition-id=0 num-partitions=1"
    devices = [Device("pi4-emulated", "rpi4", data, emulated=True),
               Device("x86-twin", "rpi4", data)]
    results = tmp_path / "results"
    run_config = " ".join([f"model='{tiny_bert}'", f"data.path='{small_agnews}'",
                           f"results-dir='{results}'", "num-server-rounds=2", "min-devices=2",
                           "train.local-steps=3", "train.batch-size=8", "eval.max-examples=32",
                           "round-timeout=900.0", "strategy='hetlora'"])
    start = time.monotonic()
    with Federation(tmp_path, devices, arm64_env, qemu_cpu=CPU) as fed:
        try:
            ready = fed.wait_ready(1200)
            timings.append(f"arm64 device ({SUITE}, {CPU}) started, imports done: "
                           f"{ready['pi4-emulated']:.0f} s (x86 twin {ready['x86-twin']:.0f} s)")
            t_run = time.monotonic()
            rows, out, run_id = fed.run(copy_app(tmp_path / "app"), run_config, timeout=1500)
            timings.append(f"arm64 two rounds through flwr run: {time.monotonic() - t_run:.0f} s")
            status = fed.run_status(run_id)
        except FederationError as err:
            pytest.fail(str(err))
        device_log = fed.log("pi4-emulated")
    timings.append(f"arm64 test in all: {time.monotonic() - start:.0f} s")
    record = os.environ.get("EDGE_LAM_ARM64_RECORD")
    if record:
        Path(record).write_text(json.dumps({
            "suite": SUITE, "python": arm64_env["PYVER"], "qemu_cpu": CPU,
            "host": platform.processor() or platform.machine(), "host_cpus": os.cpu_count(),
            "command": f"EDGE_LAM_ARM64_SUITE={SUITE} EDGE_LAM_ARM64_CPU={CPU} python -m pytest "
                       "tests/test_arm64_supernode.py", "status": status,
            "timings": [t for t in timings if t.startswith("arm64")],
            "rounds": [{k: c.get(k) for k in ("platform", "rank", "train_loss", "startup_s",
                                               "handler_s", "train_s", "process_task")}
                       for r in rows[1:] for c in r["clients"]]}, indent=1))

    assert [r["round"] for r in rows] == [0, 1, 2], out[-3000:]
    emulated = []
    for r in rows[1:]:
        by_platform = {c.get("platform"): c for c in r["clients"]}
        assert set(by_platform) == {"aarch64", "x86_64"}, r["clients"]
        arm, x86 = by_platform["aarch64"], by_platform["x86_64"]
        assert arm["device"] == "rpi4" and arm["rank"] == 2 == x86["rank"]
        # same start, data and seed: the aarch64 device computes what the x86 twin computes
        assert arm["train_loss"] == pytest.approx(x86["train_loss"], rel=1e-4)
        assert arm["num_examples"] == x86["num_examples"] == 240
        emulated.append(arm)
        timings.append(f"arm64 round {r['round']}: startup {arm['startup_s']:.2f} s, handler "
                       f"{arm['handler_s']:.1f} s, training {arm['train_s']:.1f} s (x86 twin: "
                       f"{x86['startup_s']:.2f} / {x86['handler_s']:.1f} / {x86['train_s']:.1f} s)")
    # one long-lived ClientApp process served both rounds, each claimed and started at once
    assert [int(c["process_task"]) for c in emulated] == [1, 2]
    assert all(c["startup_s"] < 20.0 for c in emulated), emulated
    assert device_log.count("claiming tasks at") == 1, device_log[-3000:]
    assert "authentication failed" not in device_log, device_log[-3000:]
    assert status == "finished:completed", status
