"""The arm64 SuperNode image, built as an OCI archive with no container engine and no registry
(docker/build-oci.sh: Debian bookworm arm64 + the aarch64 wheels of deploy/emulate-arm64.sh's
sysroot + the project), read back with skopeo, unpacked, and started under QEMU user mode by
docker/run-oci.sh (chroot, the image's Env/User/WorkingDir, a private binfmt_misc).

Cheap on purpose (about 3-4 minutes on 2 cores, most of it copying and gzipping 1.3 GB): the
image's config, its files, and that its entrypoint (deploy/supernode.sh) and
`flower-supernode` run inside it as aarch64 programs. The full proof (both architectures, the
imports, the image's SuperNode online at a SuperLink with TLS and authentication) is
benchmarks/images.py's (benchmarks/results/images/).

Needs root, buildah (or umoci) and skopeo + umoci (Debian: apt-get install buildah skopeo
umoci); without them the test is skipped, except under CI=true where it fails.
EDGE_LAM_SKIP_ARM64=1 skips it, like the emulated arm64 test.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from benchmarks.images import archive_path, build, bundle_path, inspect, run_in_image


def _missing() -> list[str]:
    tools = [t for t in ("skopeo", "umoci", "unshare", "chroot") if not shutil.which(t)]
    if not (shutil.which("buildah") or shutil.which("umoci")):
        tools.append("buildah")
    return tools + (["root"] if os.geteuid() != 0 else [])


@pytest.fixture(scope="module")
def arm64_image(timings) -> dict:
    if os.environ.get("EDGE_LAM_SKIP_ARM64") == "1":
        pytest.skip("EDGE_LAM_SKIP_ARM64=1")
    missing = _missing()
    if missing:
        message = f"the OCI image test needs {', '.join(missing)} (apt-get install buildah skopeo umoci)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    start = time.monotonic()
    built = build("arm64")
    timings.append(f"oci arm64 image ({built['tool']}): root filesystem {built['rootfs_mib']} "
                   f"MiB -> archive {built['archive_mib']} MiB in {built['wall_s']:.0f} s "
                   f"({built['steps_s']})")
    run_in_image("arm64", ["-c", "true"], entrypoint="/bin/sh")  # unpack
    timings.append(f"oci arm64 image built and unpacked: {time.monotonic() - start:.0f} s")
    return built


def test_arm64_image_config(arm64_image):
    image = inspect(archive_path("arm64"))
    variant = "v8" if arm64_image["tool"] == "buildah" else None  # umoci 0.4.7 sets none
    assert (image["architecture"], image["variant"], image["os"]) == ("arm64", variant, "linux")
    assert image["manifest_media_type"] == "application/vnd.oci.image.manifest.v1+json"
    assert image["entrypoint"] == ["/app/deploy/supernode.sh"]
    assert (image["user"], image["workdir"]) == ("app", "/app")
    assert {"HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1", "HOME=/app"} <= set(image["env"])
    assert image["ref"].startswith("edge-lam-supernode:") and image["ref"].endswith("-arm64")
    assert [x["media_type"] for x in image["layers"]] == [
        "application/vnd.oci.image.layer.v1.tar+gzip"]


def _elf_machine(path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", path
    return int.from_bytes(head[18:20], "little")


def test_arm64_image_files(arm64_image):
    """aarch64 programs and torch, no CUDA wheel, launchers for the image's own python."""
    root = bundle_path("arm64") / "rootfs"
    site = root / "usr/local/lib/python3.11/dist-packages"
    aarch64 = 0xB7  # e_machine
    assert _elf_machine(root / "usr/bin/python3.11") == aarch64
    assert _elf_machine(root / "usr/bin/bash") == aarch64
    assert [_elf_machine(p) for p in (site / "torch").glob("_C*.so")] == [aarch64]
    assert [p.name for p in site.glob("torch-*.dist-info")] == ["torch-2.9.1.dist-info"]
    assert not list(site.glob("nvidia*")) and not list(site.glob("triton*"))
    for name in ("flower-supernode", "flower-superexec", "flwr-clientapp", "edge-lam-device"):
        assert (root / "usr/local/bin" / name).read_text().startswith("#!/usr/bin/python3.11\n")
    assert (root / "app/deploy/supernode.sh").stat().st_mode & 0o111
    assert (root / "app").stat().st_uid == 49999  # the image's user owns its HOME


def test_arm64_image_starts_the_supernode_under_qemu(arm64_image, timings):
    done, secs = run_in_image("arm64", ["--help"])  # the image's entrypoint, deploy/supernode.sh
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--superlink HOST:9092" in done.stdout and "--runtime" in done.stdout
    done, _ = run_in_image("arm64", ["-c", "uname -m; id -un; command -v flower-supernode"],
                           entrypoint="/bin/sh")
    assert done.stdout.split() == ["aarch64", "app", "/usr/local/bin/flower-supernode"], done
    done, secs = run_in_image("arm64", ["--help"], entrypoint="flower-supernode")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: flower-supernode" in done.stdout
    assert "--auth-supernode-private-key" in done.stdout
    timings.append(f"oci arm64 image: flower-supernode --help under QEMU: {secs:.0f} s")
