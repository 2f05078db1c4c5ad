#!/usr/bin/env bash
# Run an OCI image archive (docker/build-oci.sh's) as `docker run` would, on a Linux host with
# no container engine: the archive is unpacked once with skopeo + umoci, and its entrypoint
# runs chrooted in the root filesystem, with the image's Env, User and WorkingDir, in private
# user, mount and PID namespaces (the host's network, so 127.0.0.1 is the host's).
# An arm64 image on an x86-64 host runs through QEMU user mode registered in the namespace's
# own binfmt_misc (Linux >= 6.7): every aarch64 program of the image, children included, is
# emulated, and the host's binfmt_misc is not touched.
#
# usage: docker/run-oci.sh --archive FILE.tar --bundle DIR [--bind HOST[:PATH]]...
#          [--entrypoint PROG] [--user UID[:GID]] [--env KEY=VALUE]... [--qemu QEMU]
#          [--qemu-cpu CPU] [--unpack-only] [-- ARGS...]
#   --bundle      where the archive is unpacked (DIR/rootfs; reused while the image is the same)
#   --bind        a host folder or file mounted into the container (PATH defaults to HOST)
#   --entrypoint  replaces the image's entrypoint (as docker run --entrypoint); ARGS replace Cmd
#   --user        run as this uid:gid instead of the image's User (e.g. 0 for root)
#   --qemu        qemu-aarch64 (>= 8) for arm64 images
#                 (default: /var/cache/edge-lam-arm64/qemu/usr/bin/qemu-aarch64, emulate-arm64.sh's)
#   --qemu-cpu    the emulated CPU (default cortex-a72, a Raspberry Pi 4's)
# Needs: root, skopeo, umoci, util-linux's unshare and chroot, python3; Linux >= 6.7 for arm64.
set -euo pipefail

archive="" bundle="" entrypoint="" user="" unpack_only=0 binds=() envs=() args=() has_args=0
qemu="${EDGE_LAM_ARM64_CACHE:-/var/cache/edge-lam-arm64}/qemu/usr/bin/qemu-aarch64"
qemu_cpu=cortex-a72
while [ $# -gt 0 ]; do
  case "$1" in
    --archive) archive="$2"; shift 2 ;;
    --bundle) bundle="$2"; shift 2 ;;
    --bind) binds+=("$2"); shift 2 ;;
    --entrypoint) entrypoint="$2"; shift 2 ;;
    --user) user="$2"; shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --qemu) qemu="$2"; shift 2 ;;
    --qemu-cpu) qemu_cpu="$2"; shift 2 ;;
    --unpack-only) unpack_only=1; shift ;;
    --) shift; args=("$@"); has_args=1; break ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "run-oci: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
die() { echo "run-oci: $*" >&2; exit 2; }
[ -f "$archive" ] || die "--archive FILE.tar is required"
[ -n "$bundle" ] || die "--bundle DIR is required"
for t in skopeo umoci unshare chroot python3; do
  command -v "$t" >/dev/null || die "'$t' is missing (Debian: apt-get install skopeo umoci)"
done

unpack() {  # DIR/rootfs and DIR/image-config.json, redone when the archive's manifest changes
  local digest
  digest="$(skopeo inspect --raw "oci-archive:$archive" | sha256sum | cut -c1-64)"
  [ "$(cat "$bundle/.manifest-digest" 2>/dev/null)" = "$digest" ] && return
  rm -rf "$bundle" "$bundle.layout"
  skopeo copy -q "oci-archive:$archive" "oci:$bundle.layout:image"
  umoci unpack --image "$bundle.layout:image" "$bundle" >/dev/null
  rm -rf "$bundle.layout"
  skopeo inspect --config "oci-archive:$archive" > "$bundle/image-config.json"
  echo "$digest" > "$bundle/.manifest-digest"
}

image_settings() {  # prints arch, uid:gid, workdir, then env lines, then argv, NUL-separated
  python3 - "$bundle" "$entrypoint" "$user" "$has_args" "${args[@]}" <<'EOF'
import json, pathlib, sys
bundle, entrypoint, user, has_args, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
image = json.loads(pathlib.Path(bundle, "image-config.json").read_text())
cfg = image.get("config") or {}
argv = ([entrypoint] if entrypoint else cfg.get("Entrypoint") or []) + (
    args if has_args == "1" else ([] if entrypoint else cfg.get("Cmd") or []))
name = user or cfg.get("User") or "0"
uid, _, gid = name.partition(":")
if not uid.isdigit():  # a user name: the image's /etc/passwd, as a runtime resolves it
    for line in pathlib.Path(bundle, "rootfs/etc/passwd").read_text().splitlines():
        f = line.split(":")
        if f[0] == uid:
            uid, gid = f[2], gid or f[3]
gid = gid or "0"
out = [image.get("architecture", "amd64"), f"{uid}:{gid}", cfg.get("WorkingDir") or "/",
       str(len(cfg.get("Env") or [])), *(cfg.get("Env") or []), *argv]
sys.stdout.write("\0".join(out) + "\0")
EOF
}

# shellcheck disable=SC2016
inner='set -e
root="$1" arch="$2" qemu="$3" ids="$4" workdir="$5"; shift 5
nbinds="$1"; shift
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount -t tmpfs tmpfs "$root/run"
while [ "$nbinds" -gt 0 ]; do
  src="${1%%:*}" dst="${1#*:}"; [ "$dst" = "$1" ] && dst="$src"; shift; nbinds=$((nbinds - 1))
  if [ -d "$src" ]; then mkdir -p "$root$dst"; else mkdir -p "$(dirname "$root$dst")"; touch "$root$dst"; fi
  mount --bind "$src" "$root$dst"
done
if [ "$arch" = arm64 ] && [ "$(uname -m)" != aarch64 ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  echo ":edge-lam-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:$qemu:FC" > /proc/sys/fs/binfmt_misc/register  # bash echo: \x stays text
fi
exec chroot --userspec="$ids" --groups="${ids#*:}" "$root" /usr/bin/env -i -C "$workdir" "$@"'

in_userns() {  # in_userns CMD...: in new user (ids 0-65535 kept), mount and PID namespaces
  # (unshare --map-users goes through newuidmap and /etc/subuid: the map is written here)
  local go upid status=0
  go="$(mktemp -u /tmp/run-oci.XXXXXX)" && mkfifo -m 666 "$go"
  # shellcheck disable=SC2016
  unshare --user --mount --pid --fork --kill-child \
    sh -c 'read -r _ < "$0"; rm -f "$0"; exec "$@"' "$go" "$@" &
  upid=$!
  while [ "$(readlink "/proc/$upid/ns/user" 2>/dev/null)" = "$(readlink /proc/self/ns/user)" ]; do
    kill -0 "$upid" 2>/dev/null || die "unshare failed"
    sleep 0.05
  done
  echo "0 0 65536" > "/proc/$upid/uid_map"
  echo "0 0 65536" > "/proc/$upid/gid_map"
  echo go > "$go"
  # unshare blocks TERM and INT while it waits: they go to the container's first process
  # (the entrypoint), and this script returns when the container has ended
  trap 'kill -TERM $(cat "/proc/$upid/task/$upid/children" 2>/dev/null) 2>/dev/null || true' TERM INT
  while :; do
    status=0 && wait "$upid" || status=$?
    kill -0 "$upid" 2>/dev/null || break
  done
  exit "$status"
}

run() {
  local settings=() arch ids workdir nenv env_list argv
  mapfile -d '' settings < <(image_settings)
  arch="${settings[0]}" ids="${settings[1]}" workdir="${settings[2]}" nenv="${settings[3]}"
  env_list=("${settings[@]:4:$nenv}" "${envs[@]}")
  argv=("${settings[@]:$((4 + nenv))}")
  [ ${#argv[@]} -gt 0 ] || die "nothing to run: the image has no entrypoint and no ARGS were given"
  if [ "$arch" = arm64 ] && [ "$(uname -m)" != aarch64 ]; then
    [ -x "$qemu" ] || die "an arm64 image needs qemu-aarch64 >= 8 (--qemu; deploy/emulate-arm64.sh makes one)"
    env_list+=("QEMU_CPU=$qemu_cpu")
  fi
  in_userns bash -c "$inner" run-oci "$bundle/rootfs" "$arch" "$qemu" "$ids" "$workdir" \
    "${#binds[@]}" "${binds[@]}" "${env_list[@]}" "${argv[@]}"
}

mkdir -p "$(dirname "$bundle")"
bundle="$(cd "$(dirname "$bundle")" && pwd)/$(basename "$bundle")"
unpack
[ "$unpack_only" = 1 ] && { echo "run-oci: unpacked into $bundle/rootfs"; exit 0; }
run
