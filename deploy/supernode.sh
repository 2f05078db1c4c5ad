#!/usr/bin/env bash
# Start a SuperNode on a device: it dials the SuperLink's Fleet API over gRPC with TLS,
# verifies the server against the federation's CA and signs in with its own EC key.
#
# usage: deploy/supernode.sh --superlink HOST:9092 --ca CA.crt --key devices/NAME
#                            --node-config "device='rpi4' data-dir='/data/agnews'" [extra flags ...]
#   node-config keys the app reads: device (profile: rpi4, rpi5, jetson-orin-nano, laptop),
#   lora-rank (overrides the profile's rank), data-dir (local data folder),
#   partition-id / num-partitions (use one share of data-dir).
set -euo pipefail

superlink="" ca="" key="" node_config="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --superlink) superlink="$2"; shift 2 ;;
    --ca) ca="$2"; shift 2 ;;
    --key) key="$2"; shift 2 ;;
    --node-config) node_config="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) extra+=("$1"); shift ;;
  esac
done
[ -n "$superlink" ] || { echo "supernode.sh: --superlink HOST:9092 is required" >&2; exit 2; }
[ -f "$ca" ] || { echo "supernode.sh: --ca '$ca' is not a file: copy ca.crt from the server's deploy/gen-certs.sh output" >&2; exit 2; }
[ -f "$key" ] && [ -f "$key.pub" ] || { echo "supernode.sh: --key '$key' needs both '$key' and '$key.pub' (deploy/gen-certs.sh --device NAME)" >&2; exit 2; }

exec flower-supernode \
  --superlink "$superlink" \
  --root-certificates "$ca" \
  --auth-supernode-private-key "$key" --auth-supernode-public-key "$key.pub" \
  --node-config "$node_config" \
  "${extra[@]}"
