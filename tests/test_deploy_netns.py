"""Real deployment across hosts: Linux network namespaces as an edge server and three devices.

    laptop (this namespace) --10.78.0.0/24 (control API, HTTPS)--> edge server namespace
    device namespaces d1..d3 --10.77.0.0/24 bridge (Fleet API, gRPC + TLS)--> edge server

The SuperLink runs with TLS, SuperNode authentication and a database on disk, started by
deploy/superlink.sh; devices run deploy/supernode.sh; keys come from deploy/gen-certs.sh and
are registered by deploy/connect.sh; the app is submitted with `flwr run . edge`.
Everything this test starts is stopped by process group (PID), namespaces are deleted, even
when it fails. No traffic leaves the machine: all addresses live in namespaces made here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_public_key,
)
from flower_e2e import copy_app

from benchmarks.federation import slow_python_start

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SERVER, CONTROL, FLEET_PORT, CONTROL_PORT = "10.77.0.1", "10.78.0.1", 9092, 9093
DEVICES = {"d1": ("rpi4-a", "rpi4"), "d2": ("jetson-a", "jetson-orin-nano"),
           "d3": ("laptop-a", "laptop")}
# Every Python process of d2 starts this much later (a loaded board, a cold SD card): beyond
# Flower's 30 s window between a task's claim and its ClientApp's first heartbeat
SLOW_DEVICE, SLOW_START_S = "d2", 40
ROUNDS = 6
# extra device keys for the intruders: two are registered (for devices that stay offline, so
# the SuperLink WOULD activate them), one is not
SPARE_NO_CA, SPARE_PLAIN, ROGUE = "spare-noca", "spare-plain", "rogue"

# Flower's own SuperNode connection code (what `flower-supernode` runs after parsing its flags)
# with the SuperNode's client-side guard "--insecure + auth key => exit 303" left out: it puts a
# registered key on the wire in plaintext (CA '-') or, as the control, over TLS with the CA.
# It stays connected until SIGTERM, then deactivates its node like a SuperNode does.
FLEET_CONNECT = r"""
import signal, sys, time
from pathlib import Path
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.supernode.start_client_internal import _init_connection
address, key, ca = sys.argv[1:4]
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
private = load_ssh_private_key(Path(key).read_bytes(), None)
with _init_connection(transport="grpc-rere", server_address=address, insecure=ca == "-",
                      root_certificates=None if ca == "-" else Path(ca).read_bytes(),
                      authentication_keys=(private, private.public_key()),
                      max_retries=2, max_wait_time=15) as conn:
    print(f"JOINED node_id={conn[0]}", flush=True)
    time.sleep(600)
"""


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, **kw)


class Hosts:
    """Namespaces, links and the processes started in them; all undone by `close`."""

    def __init__(self, prefix: str, tmp: Path):
        self.prefix, self.tmp = prefix, tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.namespaces: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def build(self) -> None:
        srv = self.ns("srv")
        self._add_ns(srv)
        sh("ip", "-n", srv, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", srv, "addr", "add", f"{SERVER}/24", "dev", "br0")
        sh("ip", "-n", srv, "link", "set", "br0", "up")
        for i, dev in enumerate(DEVICES, start=1):
            ns, a, b = self.ns(dev), f"{self.prefix}{dev}a", f"{self.prefix}{dev}b"
            self._add_ns(ns)
            sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            sh("ip", "link", "set", a, "netns", ns)
            sh("ip", "link", "set", b, "netns", srv)
            sh("ip", "-n", ns, "addr", "add", f"10.77.0.1{i}/24", "dev", a)
            sh("ip", "-n", ns, "link", "set", a, "up")
            sh("ip", "-n", srv, "link", "set", b, "master", "br0")
            sh("ip", "-n", srv, "link", "set", b, "up")
        a, b = f"{self.prefix}adma", f"{self.prefix}admb"
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        sh("ip", "link", "set", b, "netns", srv)
        sh("ip", "addr", "add", "10.78.0.2/24", "dev", a)
        sh("ip", "link", "set", a, "up")
        sh("ip", "-n", srv, "addr", "add", f"{CONTROL}/24", "dev", b)
        sh("ip", "-n", srv, "link", "set", b, "up")

    def _add_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def start(self, key: str, host: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.tmp / f"{key}.log", "w")
        wrapped = ["ip", "netns", "exec", self.ns(host), "env", *[f"{k}={v}" for k, v in env.items()],
                   *cmd] if host else cmd
        proc = subprocess.Popen(wrapped, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **env})
        self.procs[key] = proc
        return proc

    def stop(self, key: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(key, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)  # the process group we started, by its PID
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log(self, key: str) -> str:
        return (self.tmp / f"{key}.log").read_text(errors="replace")

    def close(self) -> None:
        for key in list(self.procs):
            self.stop(key)
        for ns in reversed(self.namespaces):  # leftovers we did not start: by PID too
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", f"{self.prefix}adma", check=False)


@pytest.fixture
def hosts(tmp_path):
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.fail("the multi-host test needs root and iproute2's `ip` to create network "
                    "namespaces (apt-get install iproute2; run as root)")
    h = Hosts(f"el{os.getpid() % 100000}", tmp_path)
    try:
        try:
            h.build()
        except subprocess.CalledProcessError as err:
            pytest.fail(f"cannot create network namespaces here: {err.cmd}: {err.stderr}")
        yield h
    finally:
        h.close()


def reachable(h: Hosts, host: str, addr: str, port: int) -> str:
    """'open', 'refused' or 'unreachable'/'timeout' for a TCP connect from a namespace."""
    code = ("import socket,sys\ns=socket.socket();s.settimeout(3)\ntry:\n s.connect((sys.argv[1],"
            "int(sys.argv[2])));print('open')\nexcept ConnectionRefusedError:print('refused')\n"
            "except OSError as e:print('unreachable' if e.errno==101 else 'timeout')")
    return sh("ip", "netns", "exec", h.ns(host), "python3", "-c", code, addr, str(port)).stdout.strip()


PLAINTEXT_PROBE = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + bytes(9))
try:
    data = s.recv(7)
except ConnectionResetError:
    data = b""
print(data.hex() if data else "closed")
"""


def wait_for(what: str, predicate, timeout: float, h: Hosts, logs: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    tails = "\n".join(f"--- {k}:\n{h.log(k)[-2000:]}" for k in logs)
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def online_nodes(env: dict) -> set[str]:
    out = sh("flwr", "supernode", "list", "edge", "--format", "json", env=env, check=False,
             cwd=env["FLWR_HOME"]).stdout
    try:
        return {n["node-id"] for n in json.loads(out)["nodes"] if n["status"] == "online"}
    except (ValueError, KeyError):
        return set()


@pytest.mark.e2e
def test_tls_authenticated_deployment_over_grpc(hosts, tiny_bert, agnews, tmp_path):
    h = hosts
    certs, laptop = tmp_path / "certs", tmp_path / "laptop"
    base_env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    names = [DEVICES[d][0] for d in DEVICES] + [SPARE_NO_CA, SPARE_PLAIN, ROGUE]
    sh(str(DEPLOY / "gen-certs.sh"), "--out", str(certs), "--server-address", SERVER,
       "--server-address", CONTROL, *[a for n in names for a in ("--device", n)])

    # edge server: SuperLink with TLS + SuperNode auth + state on disk
    h.start("superlink", "srv", [str(DEPLOY / "superlink.sh"), "--certs", str(certs),
                                 "--state", str(tmp_path / "state"),
                                 "--fleet", f"{SERVER}:{FLEET_PORT}",
                                 "--control", f"{CONTROL}:{CONTROL_PORT}"],
            {**base_env, "FLWR_HOME": str(tmp_path / "server-home")})
    wait_for("the SuperLink", lambda: reachable(h, "d1", SERVER, FLEET_PORT) == "open", 60, h,
             ["superlink"])
    assert (tmp_path / "state" / "state.db").is_file()

    # laptop: connection + registration of the three devices' public keys and of the two spare
    # keys (devices that stay offline); 'rogue' is not registered
    env = {**os.environ, **base_env, "FLWR_HOME": str(laptop)}
    laptop.mkdir()
    registered = [DEVICES[d][0] for d in DEVICES] + [SPARE_NO_CA, SPARE_PLAIN]
    out = sh(str(DEPLOY / "connect.sh"), "--name", "edge", "--control", f"{CONTROL}:{CONTROL_PORT}",
             "--ca", str(certs / "ca.crt"),
             *[a for n in registered for a in ("--register", str(certs / "devices" / f"{n}.pub"))],
             env=env).stdout
    ids = re.findall(r"SuperNode (\d+) registered successfully", out)
    assert len(ids) == len(registered), out
    node_id = dict(zip(registered, ids))

    # devices: SuperNodes with their profile and their share of the data
    slow = dict(slow_python_start(tmp_path / "slow-python", SLOW_START_S))

    def start_device(dev: str) -> None:
        key, profile = DEVICES[dev]
        i = list(DEVICES).index(dev)
        extra_env = slow if dev == SLOW_DEVICE else {}
        h.start(dev, dev, [str(DEPLOY / "supernode.sh"), "--superlink", f"{SERVER}:{FLEET_PORT}",
                           "--ca", str(certs / "ca.crt"), "--key", str(certs / "devices" / key),
                           "--node-config", f"device='{profile}' data-dir='{agnews}' "
                                            f"partition-id={i} num-partitions=3"],
                {**base_env, "FLWR_HOME": str(tmp_path / f"home-{dev}"), **extra_env})

    for dev in DEVICES:
        start_device(dev)
    devices_online = {node_id[DEVICES[d][0]] for d in DEVICES}
    wait_for("three online SuperNodes", lambda: online_nodes(env) == devices_online,
             90 + SLOW_START_S, h, ["superlink", *DEVICES])

    # only the Fleet API port of the server is reachable from devices
    assert reachable(h, "d1", SERVER, FLEET_PORT) == "open"
    assert reachable(h, "d1", CONTROL, CONTROL_PORT) in ("unreachable", "timeout")
    assert reachable(h, "d1", SERVER, CONTROL_PORT) == "refused"
    listeners = [ln.split()[3] for ln in sh("ip", "netns", "exec", h.ns("srv"), "ss",
                                            "-ltnH").stdout.splitlines() if ln.strip()]
    exposed = [a for a in listeners if SERVER in a or a.startswith(("0.0.0.0:", "*:", "[::]:"))]
    assert exposed == [f"[::ffff:{SERVER}]:{FLEET_PORT}"] or exposed == [f"{SERVER}:{FLEET_PORT}"], \
        listeners
    # ... and the devices' connections to the server go to that port alone
    for dev in DEVICES:
        conns = sh("ip", "netns", "exec", h.ns(dev), "ss", "-tnH", "state", "established").stdout
        peers = {ln.split()[-1].replace("[::ffff:", "").replace("]", "")
                 for ln in conns.splitlines() if SERVER in ln}
        assert peers == {f"{SERVER}:{FLEET_PORT}"}, conns

    # Intruders: each has exactly one defect, and the refusal's cause is asserted from the
    # SuperNode's exit status / log and the SuperLink's log. The SuperLink activates only keys
    # that are registered and offline, so (a) and (b) use registered keys of devices that are
    # offline: without their defect they WOULD join, and the control after each shows that the
    # same key does join (a 4th online node, its registered node ID) with the CA over TLS.
    key = certs / "devices"
    fleet = f"{SERVER}:{FLEET_PORT}"

    def intruder_env(name: str) -> dict:
        return {**base_env, "FLWR_HOME": str(tmp_path / f"home-{name}")}

    def intrude(name: str, cmd: list[str], registered_as: str | None = None) -> tuple[str, str]:
        """Run an intruder on d1 to its exit; return (its log, what the SuperLink logged)."""
        mark = len(h.log("superlink"))
        proc = h.start(name, "d1", cmd, intruder_env(name))
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"intruder {name} did not give up: {h.log(name)[-1500:]}")
        log = h.log(name)
        assert proc.returncode == 1, f"{name} exited {proc.returncode}: {log[-1500:]}"
        assert online_nodes(env) == devices_online, f"{name} joined: {log[-1500:]}"
        h.stop(name)
        server = h.log("superlink")[mark:]
        if registered_as:  # the SuperLink never got as far as activating the key
            assert f"Activated node_id={node_id[registered_as]}" not in server, server
            assert "ApiError" not in server, server
        return log, server

    def control(name: str, cmd: list[str], spare: str) -> None:
        """The same registered key with the CA over TLS is accepted, then leaves again."""
        h.start(name, "d1", cmd, intruder_env(name))
        wait_for(f"control {name} online", lambda: online_nodes(env) == devices_online
                 | {node_id[spare]}, 90, h, [name, "superlink"])
        h.stop(name)  # SIGTERM: the node deactivates itself
        wait_for(f"control {name} offline", lambda: online_nodes(env) == devices_online, 90, h,
                 [name, "superlink"])

    # (a) a registered key, but no CA: the system trust store does not vouch for the server's
    # certificate, so the SuperNode refuses the TLS handshake (no RPC reaches the SuperLink)
    log, _ = intrude("no-ca", ["flower-supernode", "--superlink", fleet,
                               "--auth-supernode-private-key", str(key / SPARE_NO_CA),
                               "--max-retries", "2", "--max-wait-time", "15", "--port", "9195"],
                     registered_as=SPARE_NO_CA)
    assert "Using system certificates for TLS connection" in log, log
    assert "SSL/TLS handshake error detected." in log, log
    assert "Exit Code: 305" in log, log
    assert re.search(rf"ipv4:{re.escape(fleet)}: Tls handshake failed \(TSI_PROTOCOL_FAILURE\): "
                     r"SSL_ERROR_SSL: .*CERTIFICATE_VERIFY_FAILED", log), log
    control("no-ca-control", [str(DEPLOY / "supernode.sh"), "--superlink", fleet,
                              "--ca", str(certs / "ca.crt"), "--key", str(key / SPARE_NO_CA),
                              "--port", "9195"], SPARE_NO_CA)

    # (b) a registered key, but plaintext. `flower-supernode --insecure` with an auth key refuses
    # to start (exit 303) before dialing; so the same key also goes on the wire in plaintext
    # through Flower's connection code, and the SuperLink's TLS port refuses the handshake
    log, server = intrude("plaintext-cli", ["flower-supernode", "--superlink", fleet, "--insecure",
                                            "--auth-supernode-private-key", str(key / SPARE_PLAIN),
                                            "--max-retries", "2", "--max-wait-time", "15",
                                            "--port", "9195"], registered_as=SPARE_PLAIN)
    assert "Exit Code: 303" in log and "SuperNode authentication requires a secure TLS " \
        "connection with the SuperLink" in log, log
    assert "WRONG_VERSION_NUMBER" not in server, server  # it did not dial
    mark = len(h.log("superlink"))
    log, _ = intrude("plaintext", ["python3", "-c", FLEET_CONNECT, fleet, str(key / SPARE_PLAIN),
                                   "-"], registered_as=SPARE_PLAIN)
    assert "Exit Code: 305" in log, log
    assert re.search(rf"UNAVAILABLE: ipv4:{re.escape(fleet)}: (Socket closed|.*Connection reset)",
                     log), log
    assert "handshake" not in log.lower(), log  # the client spoke no TLS at all
    # why it was refused: the Fleet port speaks only TLS. Plaintext HTTP/2 (what an insecure
    # gRPC channel sends first) is answered with a TLS alert record (type 21) or a close, never
    # with HTTP/2. (gRPC core's own "WRONG_VERSION_NUMBER" line in the SuperLink log is an
    # INFO message it does not always print, so the test asks the port itself.)
    answer = sh("ip", "netns", "exec", h.ns("d1"), "python3", "-c", PLAINTEXT_PROBE, SERVER,
                str(FLEET_PORT)).stdout.strip()
    assert answer == "closed" or answer.startswith("15"), answer
    assert f"Activated node_id={node_id[SPARE_PLAIN]}" not in h.log("superlink")[mark:]
    control("plaintext-control", ["python3", "-c", FLEET_CONNECT, fleet, str(key / SPARE_PLAIN),
                                  str(certs / "ca.crt")], SPARE_PLAIN)
    assert f"JOINED node_id={node_id[SPARE_PLAIN]}" in h.log("plaintext-control")

    # (c) the CA and TLS, but an unregistered key: TLS succeeds, the SuperLink refuses to
    # activate a public key it does not know
    log, _ = intrude("rogue", [str(DEPLOY / "supernode.sh"), "--superlink", fleet,
                               "--ca", str(certs / "ca.crt"), "--key", str(key / ROGUE),
                               "--max-retries", "2", "--max-wait-time", "15", "--port", "9195"])
    assert "Exit Code: 305" in log and "[code: 2004] Failed to activate SuperNode." in log, log
    assert "handshake" not in log.lower(), log
    rogue_pem = load_ssh_public_key((key / f"{ROGUE}.pub").read_bytes()).public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    refusal = (f"[/flwr.proto.Fleet/ActivateNode][ApiError:2004] Attempted to register SuperNode "
               f"with public key: {rogue_pem!r}, exception: No SuperNode found with the given "
               "public key.")
    wait_for("the SuperLink's refusal of the rogue key", lambda: refusal in h.log("superlink"),
             30, h, ["superlink", "rogue"])
    assert online_nodes(env) == devices_online

    # the job: 6 hetlora rounds, at least 2 devices a round (the restarted device needs a few
    # seconds to import and come online again while the short rounds go on)
    app = copy_app(tmp_path / "app")
    results = tmp_path / "results"
    run_config = " ".join([f"model='{tiny_bert}'", f"data.path='{agnews}'",
                           f"results-dir='{results}'", f"num-server-rounds={ROUNDS}", "min-devices=2",
                           "train.local-steps=2", "train.batch-size=8", "eval.max-examples=64",
                           "round-timeout=90.0", "strategy='hetlora'"])
    run = h.start("flwr-run", "", ["flwr", "run", str(app), "edge", "--stream",
                                   "--run-config", run_config], {**base_env, "FLWR_HOME": str(laptop)})

    def rows() -> list[dict]:
        files = list(results.glob("*/metrics.jsonl"))
        return [json.loads(x) for x in files[0].read_text().splitlines()] if files else []

    # kill the laptop device (a crash: SIGKILL) once round 1 is in, restart it after round 2
    wait_for("round 1", lambda: len(rows()) >= 2, 240, h, ["flwr-run", "superlink"])
    h.stop("d3", signal.SIGKILL)
    wait_for("round 2", lambda: len(rows()) >= 3, 240, h, ["flwr-run", "superlink"])
    start_device("d3")
    try:
        run.wait(timeout=400)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish:\n{h.log('flwr-run')[-3000:]}")
    out = h.log("flwr-run")
    assert run.returncode == 0, out[-3000:]

    data = rows()
    assert [r["round"] for r in data] == list(range(ROUNDS + 1))
    profile_rank = {"rpi4": 2, "jetson-orin-nano": 8, "laptop": 16}
    for r in data[1:]:
        for c in r["clients"]:  # each device trained at the rank of its own profile
            assert c["rank"] == profile_rank[c["device"]]
    assert {c["device"] for c in data[1]["clients"]} == set(profile_rank)
    laptop_node = next(c["node_id"] for c in data[1]["clients"] if c["device"] == "laptop")
    gone = [r for r in data[2:] if "laptop" not in {c["device"] for c in r["clients"]}]
    assert gone, "the killed device still replied in every round"
    for r in gone:  # those rounds completed with the others
        assert len(r["clients"]) >= 2
    # the failure is in the metrics (no reply, or an error reply) and in the logs
    failed = [r for r in gone if laptop_node in set(r["missing"])
              | {x["node_id"] for x in r.get("rejections", [])}]
    assert failed, [(r["round"], r["missing"], r.get("rejections")) for r in gone]
    assert f"node {laptop_node}" in out and ("no reply from node" in out
                                             or "rejected reply of node" in out)
    rejoined = [r["round"] for r in data[3:] if "laptop" in {c["device"] for c in r["clients"]}]
    assert rejoined and rejoined[-1] == ROUNDS, "restarted device did not rejoin"
    assert (results.glob("*/adapter/adapter_model.safetensors").__next__()).is_file()

    # The slow device (every Python start 40 s late) trained every round, exactly once, in
    # one long-lived ClientApp process (deploy/supernode.sh's warm runtime); it was never
    # relaunched nor refused. Every device reports what a round cost around its training.
    slow_profile = DEVICES[SLOW_DEVICE][1]
    slow_rows = [c for r in data[1:] for c in r["clients"] if c["device"] == slow_profile]
    assert [int(c["process_task"]) for c in slow_rows] == list(range(1, ROUNDS + 1)), slow_rows
    assert all(c["startup_s"] < SLOW_START_S / 4 for c in slow_rows), slow_rows
    slow_log = h.log(SLOW_DEVICE)
    assert "[slow start]" in slow_log and slow_log.count("claiming tasks at") == 1, slow_log[-2000:]
    assert "authentication failed" not in slow_log, slow_log[-3000:]
    for r in data[1:]:
        assert {c["platform"] for c in r["clients"]} == {"x86_64"}
        assert all(c["handler_s"] >= c["train_s"] > 0 for c in r["clients"]), r["clients"]
