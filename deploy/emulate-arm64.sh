#!/usr/bin/env bash
# An emulated Raspberry-Pi-like aarch64 device on an x86-64 Linux host, without a Pi and without
# debootstrap's 56-minute second stage:
#   1. QEMU user mode >= 8 (Debian trixie's static `qemu-user`, unpacked with dpkg -x; it runs
#      on bookworm, whose own QEMU 7.2 segfaults in `import torch`);
#   2. a Debian arm64 sysroot: the .debs of python3 and its libraries, resolved by apt for arm64
#      in a private apt state (the host's apt is not touched) and unpacked with dpkg -x;
#   3. this project's dependencies for aarch64, resolved with the target's markers (uv, so
#      `platform_machine` is aarch64, not the host's x86_64), checked to hold no nvidia-*/CUDA
#      wheel, and installed into the sysroot's site-packages on the host.
# It then writes host-side launchers in <cache>/<suite>/bin (python3, flower-supernode,
# flower-superexec, flwr-clientapp, edge-lam-device) that run the aarch64 programs under QEMU, so
# that a SuperNode's child processes are emulated too.
#
# usage: deploy/emulate-arm64.sh [--suite bookworm|trixie] [--cache DIR] [--project DIR]
#   --suite    bookworm: Python 3.11 (Raspberry Pi OS bookworm); trixie: Python 3.13   (bookworm)
#   --cache    where downloads, the sysroot and the launchers are kept (reused when present)
#              default: $EDGE_LAM_ARM64_CACHE or /var/cache/edge-lam-arm64
#   --project  the checkout whose pyproject.toml is installed                 (this checkout)
# Prints how long each part took, and the last line `ARM64_ENV=<file>`: source it for
# QEMU, SYSROOT, PY (the aarch64 python3) and BIN (the launchers).
# Needs: apt-get, dpkg, uv (installed with flwr), network access to Debian's and PyPI's packages.
set -euo pipefail

suite=bookworm cache="${EDGE_LAM_ARM64_CACHE:-/var/cache/edge-lam-arm64}"
project="$(cd "$(dirname "$0")/.." && pwd)"
while [ $# -gt 0 ]; do
  case "$1" in
    --suite) suite="$2"; shift 2 ;;
    --cache) cache="$2"; shift 2 ;;
    --project) project="$(cd "$2" && pwd)"; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "emulate-arm64: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$suite" in
  bookworm) pyver=3.11 ;;
  trixie) pyver=3.13 ;;
  *) echo "emulate-arm64: --suite must be bookworm (Python 3.11) or trixie (Python 3.13)" >&2; exit 2 ;;
esac
for tool in apt-get dpkg uv; do
  command -v "$tool" >/dev/null || { echo "emulate-arm64: '$tool' is missing (uv comes with 'pip install flwr')" >&2; exit 2; }
done
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
t_all=$SECONDS
# uv needs no interpreter of the target version: never fetch one (only package registries here)
export UV_PYTHON_DOWNLOADS=never
step() { echo "emulate-arm64: $1: $(( SECONDS - $2 )) s"; }

# apt for another suite / architecture, in a private state folder (apt_private)
. "$(dirname "$0")/lib/debian-apt.sh"
debian_mirror >/dev/null || exit 2

# 1. QEMU user mode from trixie (static; >= 8)
t=$SECONDS
qemu="$cache/qemu/usr/bin/qemu-aarch64"
if [ ! -x "$qemu" ]; then
  apt_private "$cache/apt-trixie-amd64" trixie amd64 -- update -qq
  apt_private "$cache/apt-trixie-amd64" trixie amd64 -- install --download-only -y -qq qemu-user >/dev/null
  deb="$(ls "$cache"/apt-trixie-amd64/archives/qemu-user_*.deb | head -1)"
  rm -rf "$cache/qemu" && dpkg -x "$deb" "$cache/qemu"
fi
qemu_version="$("$qemu" --version | head -1)"
major="$(echo "$qemu_version" | sed -n 's/.*version \([0-9]*\).*/\1/p')"
[ "${major:-0}" -ge 8 ] || { echo "emulate-arm64: $qemu_version is older than 8 (torch segfaults)" >&2; exit 1; }
step "QEMU ($qemu_version)" $t

# 2. the arm64 sysroot: python3 and the libraries it and the wheels need
t=$SECONDS
sysroot="$cache/$suite/sysroot"
if [ ! -x "$sysroot/usr/bin/python$pyver" ]; then
  apt_private "$cache/apt-$suite-arm64" "$suite" arm64 -- update -qq
  apt_private "$cache/apt-$suite-arm64" "$suite" arm64 -- install --download-only -y -qq \
    "python$pyver" libstdc++6 libgomp1 zlib1g ca-certificates >/dev/null
  rm -rf "$sysroot" && mkdir -p "$sysroot"
  for deb in "$cache/apt-$suite-arm64/archives/"*.deb; do dpkg -x "$deb" "$sysroot"; done
  # merged /usr: the loader and libraries are looked up under /lib as well
  for d in bin lib sbin; do [ -e "$sysroot/$d" ] || ln -s "usr/$d" "$sysroot/$d"; done
fi
step "sysroot ($suite, Python $pyver, $(du -sm --exclude="python$pyver/dist-packages" "$sysroot" | cut -f1) MB without the wheels)" $t

# 3. the project's dependencies for aarch64, resolved with the target's own markers
t=$SECONDS
site="$sysroot/usr/local/lib/python$pyver/dist-packages"
resolved="$cache/$suite/requirements-aarch64.txt"
mkdir -p "$cache/$suite"
# --no-config: [tool.uv] in pyproject.toml keeps torch out of `flwr run`'s environments; a
# device's install (pip install .) does get it
(cd "$project" && uv pip compile pyproject.toml --no-config --python-platform aarch64-manylinux_2_36 \
   --python-version "$pyver" --no-header --no-annotate -q -o "$resolved.new")
if grep -iE '^(nvidia-|triton|cuda-)' "$resolved.new"; then
  echo "emulate-arm64: the aarch64 resolution pulls CUDA packages (above): pyproject.toml must keep them off a Pi" >&2
  exit 1
fi
stamp="$(cat "$resolved.new" | sha256sum | cut -c1-16)"
if [ "$(cat "$site/.edge-lam-stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$site" && mkdir -p "$site"
  UV_CACHE_DIR="$cache/uv-cache" uv pip install -q --no-config --target "$site" \
    --python-platform aarch64-manylinux_2_36 --python-version "$pyver" -r "$resolved.new"
  echo "$stamp" > "$site/.edge-lam-stamp"
fi
mv "$resolved.new" "$resolved"
# the project itself (its entry points register the algorithm plug-ins), always fresh
rm -rf "$site"/edge_lam-*.dist-info
UV_CACHE_DIR="$cache/uv-cache" uv pip install -q --no-config --no-deps --reinstall --target "$site.project" \
  --python-platform aarch64-manylinux_2_36 --python-version "$pyver" "$project"
cp -r "$site.project"/. "$site"/ && rm -rf "$site.project"
torch_line="$(grep -i '^torch==' "$resolved")"
step "wheels ($(wc -l < "$resolved") packages, $torch_line, no nvidia-*; $(du -sm "$site" | cut -f1) MB installed)" $t

# 4. launchers: host shell scripts that run the aarch64 programs under QEMU
bin="$cache/$suite/bin"
mkdir -p "$bin"
launcher() {  # launcher NAME PYTHON-CODE
  cat > "$bin/$1" <<EOF
#!/bin/sh
# $1 for aarch64, under QEMU user mode (made by deploy/emulate-arm64.sh)
exec "$qemu" -L "$sysroot" "$sysroot/usr/bin/python$pyver" $2 "\$@"
EOF
  chmod +x "$bin/$1"
}
launcher python3 ""
launcher flower-supernode "-c 'import sys; sys.argv[0] = \"flower-supernode\"; from flwr.supernode.cli import flower_supernode; sys.exit(flower_supernode())'"
launcher flower-superexec "-c 'import sys; sys.argv[0] = \"flower-superexec\"; from flwr.supercore.cli import flower_superexec; sys.exit(flower_superexec())'"
launcher flwr-clientapp "-c 'import sys; sys.argv[0] = \"flwr-clientapp\"; from flwr.supernode.cli import flwr_clientapp; sys.exit(flwr_clientapp())'"
launcher edge-lam-device "-m client_app.runtime"

env_file="$cache/$suite/env.sh"
cat > "$env_file" <<EOF
QEMU="$qemu"
SYSROOT="$sysroot"
PY="$bin/python3"
BIN="$bin"
PYVER="$pyver"
EOF
step "all ($suite)" $t_all
echo "ARM64_ENV=$env_file"
