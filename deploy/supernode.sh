#!/usr/bin/env bash
# Start a SuperNode on a device: it dials the SuperLink's Fleet API over gRPC with TLS,
# verifies the server against the federation's CA and signs in with its own EC key.
#
# usage: deploy/supernode.sh --superlink HOST:9092 --ca CA.crt --key devices/NAME
#                            --node-config "device='rpi4' data-dir='/data/agnews'"
#                            [--runtime warm|flower] [--port 9094] [extra flags ...]
#   node-config keys the app reads: device (profile: rpi4, rpi5, jetson-orin-nano, laptop),
#   lora-rank (overrides the profile's rank), data-dir (local data folder),
#   partition-id / num-partitions (use one share of data-dir).
#   --runtime warm (default): `flower-supernode --isolation process` plus one long-lived
#              `edge-lam-device` that imports torch once and keeps the model loaded across
#              rounds, so a slow device never misses Flower's 30 s start window;
#              flower: Flower's default, a fresh ClientApp process for every message.
#   --port     the SuperNode's Runtime API port on 127.0.0.1 (two SuperNodes on one host
#              need two ports)
set -euo pipefail

superlink="" ca="" key="" node_config="" runtime=warm port=9094 extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --superlink) superlink="$2"; shift 2 ;;
    --ca) ca="$2"; shift 2 ;;
    --key) key="$2"; shift 2 ;;
    --node-config) node_config="$2"; shift 2 ;;
    --runtime) runtime="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) extra+=("$1"); shift ;;
  esac
done
[ -n "$superlink" ] || { echo "supernode.sh: --superlink HOST:9092 is required" >&2; exit 2; }
[ -f "$ca" ] || { echo "supernode.sh: --ca '$ca' is not a file: copy ca.crt from the server's deploy/gen-certs.sh output" >&2; exit 2; }
[ -f "$key" ] && [ -f "$key.pub" ] || { echo "supernode.sh: --key '$key' needs both '$key' and '$key.pub' (deploy/gen-certs.sh --device NAME)" >&2; exit 2; }
case "$runtime" in
  warm|flower) ;;
  *) echo "supernode.sh: --runtime must be 'warm' (one long-lived ClientApp process) or 'flower' (one per message)" >&2; exit 2 ;;
esac

supernode=(flower-supernode
  --superlink "$superlink"
  --root-certificates "$ca"
  --auth-supernode-private-key "$key" --auth-supernode-public-key "$key.pub"
  --node-config "$node_config"
  --port "$port")
if [ "$runtime" = flower ]; then
  exec "${supernode[@]}" "${extra[@]}"
fi

# warm: edge-lam-device imports first; then the SuperNode comes online and hands it tasks, so
# a node that the server sees online can start a task at once, however slow its imports were
ready="$(mktemp -u "${TMPDIR:-/tmp}/edge-lam-ready.XXXXXX")"
edge-lam-device --runtime-api-address "127.0.0.1:$port" --insecure --parent-pid $$ \
  --ready-file "$ready" &
runtime_pid=$!
node_pid=""
trap 'kill -TERM $node_pid "$runtime_pid" 2>/dev/null || true' TERM INT
while [ ! -e "$ready" ]; do
  kill -0 "$runtime_pid" 2>/dev/null || { wait "$runtime_pid"; exit $?; }
  sleep 0.5
done
rm -f "$ready"
"${supernode[@]}" --isolation process "${extra[@]}" &
node_pid=$!
set +e
wait -n "$node_pid" "$runtime_pid"
code=$?
kill -TERM "$node_pid" "$runtime_pid" 2>/dev/null
wait
exit "$code"
