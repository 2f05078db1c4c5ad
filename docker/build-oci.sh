#!/usr/bin/env bash
# Build the SuperNode device image (what docker/supernode.Dockerfile describes) as an OCI image
# archive for linux/arm64 or linux/amd64, with no container engine and no registry:
#   1. Debian bookworm for the architecture: python3.11, bash, coreutils, openssl,
#      openssh-client and their libraries, resolved by apt for that architecture in a private
#      apt state (the host's apt is not touched), unpacked with dpkg -x into a merged-/usr tree,
#      with a dpkg status file, /etc/passwd (root, app = 49999) and the CA bundle;
#   2. the project's dependencies in /usr/local/lib/python3.11/dist-packages:
#      arm64: deploy/emulate-arm64.sh's bookworm sysroot (hard-linked; torch 2.9.1 CPU-only,
#      the wheels the emulated arm64 test imports); amd64: resolved by uv for x86_64 with the
#      CPU build of torch from --torch-wheels (elsewhere: PyTorch's CPU index, see pyproject.toml);
#   3. the project: installed in site-packages, the Flower app in /app (deploy/ in /app/deploy),
#      console-script launchers in /usr/local/bin with `#!/usr/bin/python3.11`;
#   4. the image: buildah (from scratch, vfs storage, files copied into `buildah mount`; no
#      `buildah run`, so no isolation is needed) or umoci (umoci new / unpack / repack);
#      entrypoint /app/deploy/supernode.sh (the bare-metal flags), user app, HF_*_OFFLINE=1.
#
# usage: docker/build-oci.sh --arch arm64|amd64 --out FILE.tar [--tool auto|buildah|umoci]
#          [--cache DIR] [--arm64-cache DIR] [--project DIR] [--torch-wheels DIR] [--ref NAME]
#   --out          the OCI image archive to write (`podman load -i FILE`,
#                  `skopeo copy oci-archive:FILE docker-daemon:edge-lam-supernode:TAG`)
#   --tool         auto (default): buildah when `buildah from scratch` works here, else umoci
#   --cache        downloads, trees and buildah's storage  (default: $EDGE_LAM_OCI_CACHE or
#                  /var/cache/edge-lam-oci); everything is reused when still current
#   --arm64-cache  deploy/emulate-arm64.sh's cache (default: $EDGE_LAM_ARM64_CACHE or
#                  /var/cache/edge-lam-arm64); emulate-arm64.sh runs when its sysroot is missing
#   --torch-wheels amd64: a folder holding torch-2.13.0+cpu-cp311-cp311-*x86_64.whl
#                  (default: $EDGE_LAM_TORCH_WHEELS or /opt/wheels)
#   --ref          the image's name in the archive (default: edge-lam-supernode:VERSION-ARCH)
# Prints how long each part took and the sizes; the last lines are `OCI_ROOTFS_MB=<n>`,
# `OCI_ARCHIVE_MB=<n>`, `OCI_TOOL=<tool>` and `OCI_ARCHIVE=<file>`.
# Needs: apt-get, dpkg, uv, python3; buildah, or umoci and skopeo (Debian: apt-get install
# buildah umoci skopeo). Writes nothing into the checkout.
set -euo pipefail

arch="" out="" tool=auto ref=""
cache="${EDGE_LAM_OCI_CACHE:-/var/cache/edge-lam-oci}"
arm64_cache="${EDGE_LAM_ARM64_CACHE:-/var/cache/edge-lam-arm64}"
torch_wheels="${EDGE_LAM_TORCH_WHEELS:-/opt/wheels}"
torch_cpu=2.13.0
project="$(cd "$(dirname "$0")/.." && pwd)"
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --tool) tool="$2"; shift 2 ;;
    --cache) cache="$2"; shift 2 ;;
    --arm64-cache) arm64_cache="$2"; shift 2 ;;
    --project) project="$(cd "$2" && pwd)"; shift 2 ;;
    --torch-wheels) torch_wheels="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "build-oci: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
die() { echo "build-oci: $*" >&2; exit 2; }
case "$arch" in
  arm64) platform=aarch64-manylinux_2_36 ;;
  amd64) platform=x86_64-manylinux_2_36 ;;
  *) die "--arch must be arm64 or amd64" ;;
esac
[ -n "$out" ] || die "--out FILE.tar is required"
case "$tool" in auto|buildah|umoci) ;; *) die "--tool must be auto, buildah or umoci" ;; esac
for t in apt-get dpkg dpkg-deb uv python3; do
  command -v "$t" >/dev/null || die "'$t' is missing (uv comes with 'pip install flwr')"
done
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$project/pyproject.toml" | head -1)"
ref="${ref:-edge-lam-supernode:$version-$arch}"
mkdir -p "$cache" "$(dirname "$out")"
cache="$(cd "$cache" && pwd)"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
work="$cache/$arch"
mkdir -p "$work"
t_all=$SECONDS
step() { echo "build-oci: $1: $(( SECONDS - $2 )) s"; }
mb() { du -sb "$@" | awk '{s += $1} END {printf "%.0f\n", s / 1048576}'; }  # apparent MiB

# Debian packages of the image (bash, sed, coreutils: deploy/*.sh; openssl, openssh-client:
# gen-certs.sh and connect.sh, as in the Dockerfile; netbase: /etc/services, /etc/protocols)
PACKAGES="python3.11 libstdc++6 libgomp1 zlib1g ca-certificates bash dash coreutils sed grep
  openssl openssh-client netbase"

# apt for bookworm / the image's architecture, in a private state folder (apt_private)
. "$(dirname "$0")/../deploy/lib/debian-apt.sh"
debian_mirror >/dev/null || die "no Debian mirror in /etc/apt/sources.list{,.d}"

deb_files() {  # deb_files: the .deb files apt picked for $PACKAGES, one a line
  local dir="$cache/apt-bookworm-$arch"
  # shellcheck disable=SC2086
  apt_private "$cache/apt-bookworm-$arch" bookworm "$arch" -- install -s -y $PACKAGES | awk '$1 == "Inst" {
      v = $3; gsub(/[()]/, "", v); sub(/:/, "%3a", v)
      match($0, /\[[a-z0-9]+\]\)/); a = substr($0, RSTART + 1, RLENGTH - 3)
      print $2 "_" v "_" a ".deb" }' | while read -r f; do echo "$dir/archives/$f"; done
}

fetch_debs() {  # download the packages (emulate-arm64.sh's downloads are reused for arm64)
  local dir="$cache/apt-bookworm-$arch"
  mkdir -p "$dir/archives"
  if [ "$arch" = arm64 ] && [ -d "$arm64_cache/apt-bookworm-arm64/archives" ]; then
    cp -n "$arm64_cache"/apt-bookworm-arm64/archives/*.deb "$dir/archives/" 2>/dev/null || true
  fi
  apt_private "$cache/apt-bookworm-$arch" bookworm "$arch" -- update -qq
  # shellcheck disable=SC2086
  apt_private "$cache/apt-bookworm-$arch" bookworm "$arch" -- install --download-only -y -qq $PACKAGES >/dev/null
}

base_fixups() {  # base_fixups DIR: what maintainer scripts and debootstrap would have made
  local dir="$1" deb
  mkdir -p "$dir/tmp" "$dir/root" "$dir/app" "$dir/proc" "$dir/dev" "$dir/sys" "$dir/run" \
    "$dir/var/lib/dpkg" "$dir/etc/ssl/certs" "$dir/usr/local/bin"
  chmod 1777 "$dir/tmp"
  printf 'root:x:0:0:root:/root:/bin/bash\napp:x:49999:49999:app:/app:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' > "$dir/etc/passwd"
  printf 'root:x:0:\napp:x:49999:\nnogroup:x:65534:\n' > "$dir/etc/group"
  cat "$dir"/usr/share/ca-certificates/mozilla/*.crt > "$dir/etc/ssl/certs/ca-certificates.crt"
  [ -e "$dir/usr/bin/sh" ] || ln -s dash "$dir/usr/bin/sh"
  ln -sf python3.11 "$dir/usr/bin/python3"
  ln -sf python3.11 "$dir/usr/bin/python"
  rm -rf "$dir/usr/share/man" "$dir/usr/share/info"
  : > "$dir/var/lib/dpkg/status"  # so that `dpkg -l` and image scanners see the packages
  while read -r deb; do
    { dpkg-deb -f "$deb" | sed '/^Package:/a Status: install ok installed'; echo; } >> "$dir/var/lib/dpkg/status"
  done < "$work/debs.txt"
}

make_base() {  # $work/base: the Debian part of the root filesystem
  local t=$SECONDS base="$work/base" stamp
  fetch_debs
  deb_files > "$work/debs.txt"
  stamp="$(cat "$work/debs.txt" "$0" | sha256sum | cut -c1-16)"  # the packages, this script
  if [ "$(cat "$base.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$base" "$base.stamp" && mkdir -p "$base"
    while read -r deb; do
      [ -f "$deb" ] || die "apt did not download $deb"
      dpkg -x "$deb" "$base"
    done < "$work/debs.txt"
    for d in bin sbin lib lib64; do  # merged /usr, as bookworm installs it (dpkg -x does not)
      [ -d "$base/$d" ] && [ ! -L "$base/$d" ] || continue
      mkdir -p "$base/usr/$d" && cp -a "$base/$d"/. "$base/usr/$d"/ && rm -rf "${base:?}/$d"
      ln -s "usr/$d" "$base/$d"
    done
    base_fixups "$base"
    echo "$stamp" > "$base.stamp"
  fi
  step "Debian bookworm $arch ($(wc -l < "$work/debs.txt") packages, $(mb "$base") MB)" $t
}

site_arm64() {  # $work/site from emulate-arm64.sh's sysroot, hard-linked (nothing is copied)
  local from="$arm64_cache/bookworm/sysroot/usr/local/lib/python3.11/dist-packages"
  if [ ! -f "$from/.edge-lam-stamp" ]; then
    "$project/deploy/emulate-arm64.sh" --suite bookworm --cache "$arm64_cache" --project "$project"
  fi
  if grep -iqE '^(nvidia-|triton|cuda-)' "$arm64_cache/bookworm/requirements-aarch64.txt"; then
    die "the aarch64 wheels hold CUDA packages: rerun deploy/emulate-arm64.sh"
  fi
  if [ "$(cat "$work/site.stamp" 2>/dev/null)" != "$(cat "$from/.edge-lam-stamp")" ]; then
    rm -rf "$work/site" "$work/site.stamp"
    cp -al "$from" "$work/site"
    rm -rf "$work/site/bin" "$work/site/.edge-lam-stamp"  # host-side scripts; ours are below
    cp "$from/.edge-lam-stamp" "$work/site.stamp"
  fi
  cp "$arm64_cache/bookworm/requirements-aarch64.txt" "$work/requirements.txt"
}

site_amd64() {  # $work/site: the x86_64 wheels, torch from the CPU wheel in $torch_wheels
  local wheel stamp
  wheel="$(find "$torch_wheels" -maxdepth 1 -name "torch-$torch_cpu+cpu-cp311-cp311-*x86_64.whl" 2>/dev/null | sort | head -1)"
  [ -n "$wheel" ] || die "no CPU wheel torch-$torch_cpu+cpu-cp311-cp311-*x86_64.whl in '$torch_wheels':
  PyPI's x86_64 torch is a CUDA build (about 3 GB more). Download the CPU one from PyTorch's CPU
  index (see pyproject.toml) into a folder and pass it as --torch-wheels"
  echo "torch==$torch_cpu+cpu" > "$work/torch-override.txt"
  (cd "$project" && UV_CACHE_DIR="$cache/uv-cache" uv pip compile pyproject.toml --no-config \
     --python-platform "$platform" --python-version 3.11 --find-links "$torch_wheels" \
     --override "$work/torch-override.txt" --no-header --no-annotate -q -o "$work/requirements.txt")
  if grep -iE '^(nvidia-|triton|cuda-)' "$work/requirements.txt"; then
    die "the x86_64 resolution pulls CUDA packages (above)"
  fi
  grep -qx "torch==$torch_cpu+cpu" "$work/requirements.txt" || die "torch is not the CPU build"
  stamp="$(cat "$work/requirements.txt" "$wheel" | sha256sum | cut -c1-16)"
  if [ "$(cat "$work/site.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$work/site" "$work/site.stamp"
    UV_CACHE_DIR="$cache/uv-cache" uv pip install -q --no-config --target "$work/site" \
      --python-platform "$platform" --python-version 3.11 --find-links "$torch_wheels" \
      -r "$work/requirements.txt"
    rm -rf "$work/site/bin"  # scripts for the host's python; ours are below
    echo "$stamp" > "$work/site.stamp"
  fi
}

make_site() {  # the dependencies, then the project itself (always fresh) on top
  local t=$SECONDS pkg
  "site_$arch"
  rm -rf "$work/project"
  UV_CACHE_DIR="$cache/uv-cache" uv pip install -q --no-config --no-deps --reinstall \
    --target "$work/project" --python-platform "$platform" --python-version 3.11 "$project"
  rm -rf "$work/project/bin" "$work/site"/edge_lam-*.dist-info
  for pkg in edge_lam strategies client_app server_app; do rm -rf "${work:?}/site/$pkg"; done
  cp -r --remove-destination "$work/project"/. "$work/site"/  # never into a hard-linked file
  step "site-packages ($(wc -l < "$work/requirements.txt") packages, $(grep -i '^torch==' "$work/requirements.txt"), $(mb "$work/site") MB)" $t
}

make_app() {  # /app as in the Dockerfile (the Flower app and deploy/), and /usr/local/bin
  rm -rf "$work/app" "$work/launchers" && mkdir -p "$work/app" "$work/launchers"
  tar -C "$project" -c --exclude=__pycache__ --exclude='*.pyc' --exclude=deploy/certs \
    pyproject.toml README.md edge_lam strategies client_app server_app deploy | tar -C "$work/app" -x
  python3 - "$work/site" "$work/launchers" <<'EOF'
import configparser, pathlib, sys
site, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for ep in sorted(site.glob("*.dist-info/entry_points.txt")):
    cfg = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    cfg.optionxform = str
    cfg.read(ep)
    for name, target in (cfg["console_scripts"].items() if "console_scripts" in cfg else []):
        module, _, attr = target.split("[")[0].strip().partition(":")
        path = dest / name
        path.write_text(
            "#!/usr/bin/python3.11\n# -*- coding: utf-8 -*-\nimport re\nimport sys\n"
            f"from {module} import {attr.split('.')[0]}\n"
            "if __name__ == \"__main__\":\n"
            "    sys.argv[0] = re.sub(r\"(-script\\.pyw|\\.exe)?$\", \"\", sys.argv[0])\n"
            f"    sys.exit({attr}())\n")
        path.chmod(0o755)
EOF
  for s in flower-supernode flower-superexec flwr-clientapp edge-lam-device flwr; do
    [ -x "$work/launchers/$s" ] || die "no console script '$s' in the image's site-packages"
  done
}

config_values() {  # the image configuration, one KEY=VALUE a line, for both tools
  local revision
  revision="$(git -C "$project" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  echo "env=HOME=/app"
  echo "env=LANG=C.UTF-8"
  echo "env=HF_HUB_OFFLINE=1"
  echo "env=HF_DATASETS_OFFLINE=1"
  echo "env=PYTHONUNBUFFERED=1"
  echo "label=org.opencontainers.image.title=edge-lam-supernode"
  echo "label=org.opencontainers.image.version=$version"
  echo "label=org.opencontainers.image.revision=$revision"
  echo "label=org.opencontainers.image.description=edge-lam SuperNode (Flower 1.39), entrypoint deploy/supernode.sh"
}

fill_rootfs() {  # fill_rootfs DIR: the image's files, with their owners and modes (cp -a)
  local root="$1"
  cp -a "$work/base"/. "$root"/
  mkdir -p "$root/usr/local/lib/python3.11/dist-packages" "$root/app" "$root/usr/local/bin"
  cp -a "$work/site"/. "$root/usr/local/lib/python3.11/dist-packages"/
  cp -a "$work/app"/. "$root/app"/
  chown -R 49999:49999 "$root/app"  # the Dockerfile's chown -R app:app /app (HOME, FLWR_HOME)
  cp -a "$work/launchers"/. "$root/usr/local/bin"/
}

buildah_() { buildah --storage-driver vfs --root "$cache/storage" --runroot "$cache/run" "$@"; }

build_buildah() {  # from scratch, files copied into its mount (vfs: a plain folder), commit
  local c args=()
  c="$(buildah_ from --name "edge-lam-$arch-$$" scratch)"
  trap 'buildah_ rm "edge-lam-$arch-$$" >/dev/null 2>&1 || true' EXIT
  fill_rootfs "$(buildah_ mount "$c")"
  buildah_ unmount "$c" >/dev/null
  while IFS='=' read -r key value; do args+=("--$key" "$value"); done < <(config_values)
  [ "$arch" = arm64 ] && args+=(--variant v8)
  buildah_ config --arch "$arch" --os linux --entrypoint '["/app/deploy/supernode.sh"]' \
    --workingdir /app --user app --created-by "docker/build-oci.sh" "${args[@]}" "$c"
  buildah_ commit -q --rm "$c" "$ref" >/dev/null
  rm -f "$out"
  buildah_ push -q "$ref" "oci-archive:$out:$ref"
  buildah_ rmi -f "$ref" >/dev/null
}

build_umoci() {  # an empty image, unpacked; files copied into its rootfs, repacked
  local layout="$work/oci" bundle="$work/bundle" args=()
  command -v skopeo >/dev/null || die "umoci needs skopeo to write the archive"
  rm -rf "$layout" "$bundle"
  umoci init --layout "$layout"
  umoci new --image "$layout:$ref"
  umoci unpack --image "$layout:$ref" "$bundle" >/dev/null
  fill_rootfs "$bundle/rootfs"
  umoci repack --image "$layout:$ref" "$bundle"
  while IFS='=' read -r key value; do args+=("--config.$key" "$value"); done < <(config_values)
  umoci config --image "$layout:$ref" --architecture "$arch" --os linux \
    --config.entrypoint /app/deploy/supernode.sh --config.workingdir /app --config.user app \
    --history.created_by "docker/build-oci.sh" "${args[@]}"
  umoci gc --layout "$layout"
  rm -f "$out"
  skopeo copy -q "oci:$layout:$ref" "oci-archive:$out:$ref"
  rm -rf "$layout" "$bundle"
}

pick_tool() {  # auto: buildah when it can make a working container in its vfs storage here
  if [ "$tool" = auto ]; then
    tool=umoci
    if command -v buildah >/dev/null; then
      local c
      if c="$(buildah_ from scratch 2>"$work/buildah-probe.log")"; then
        buildah_ rm "$c" >/dev/null; tool=buildah
      else
        echo "build-oci: buildah cannot work here ($(tail -1 "$work/buildah-probe.log")); using umoci" >&2
      fi
    fi
  fi
  command -v "$tool" >/dev/null || die "'$tool' is missing (Debian: apt-get install buildah umoci skopeo)"
}

pick_tool
make_base
make_site
make_app
rootfs_mb="$(mb "$work/base" "$work/site" "$work/app" "$work/launchers")"
t=$SECONDS
"build_$tool"
step "image ($tool, $ref, root filesystem $rootfs_mb MB -> archive $(mb "$out") MB)" $t
step "all ($arch)" $t_all
echo "OCI_ROOTFS_MB=$rootfs_mb"
echo "OCI_ARCHIVE_MB=$(mb "$out")"
echo "OCI_TOOL=$tool"
echo "OCI_ARCHIVE=$out"
