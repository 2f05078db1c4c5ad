#!/usr/bin/env bash
# Start the SuperLink on the edge server: TLS, SuperNode authentication (only registered
# device keys may join) and its state in a database on disk.
#
# usage: deploy/superlink.sh --certs DIR --state DIR [--fleet ADDR:PORT] [--control HOST:PORT]
#                            [--start-window S] [extra flower-superlink flags ...]
#   --fleet    where devices connect over gRPC (Fleet API)          default 0.0.0.0:9092
#   --control  where `flwr run` / `flwr supernode register` connect  default 127.0.0.1:9093
#              (HTTPS with the same certificate). Bind it to an address devices cannot reach.
#   --start-window  seconds a run's ServerApp may take to start (Flower's own: 30; a slow or
#              loaded server misses that and the run never starts)          default 120
set -euo pipefail

certs="" state="" fleet="0.0.0.0:9092" control="127.0.0.1:9093" window=120 extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --certs) certs="$2"; shift 2 ;;
    --state) state="$2"; shift 2 ;;
    --fleet) fleet="$2"; shift 2 ;;
    --control) control="$2"; shift 2 ;;
    --start-window) window="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) extra+=("$1"); shift ;;
  esac
done
[ -n "$certs" ] && [ -n "$state" ] || { echo "superlink.sh: --certs DIR and --state DIR are required (see --help)" >&2; exit 2; }
for f in ca.crt server.pem server.key; do
  [ -f "$certs/$f" ] || { echo "superlink.sh: $certs/$f is missing: run deploy/gen-certs.sh --out $certs ..." >&2; exit 2; }
done
mkdir -p "$state"

# Dependencies are installed once per machine (pip install), not per run. flower-superlink,
# with the start window set (server_app/superlink.py).
EDGE_LAM_START_WINDOW_S="$window" exec python3 -m server_app.superlink \
  --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" --ssl-keyfile "$certs/server.key" \
  --enable-supernode-auth \
  --database "$state/state.db" \
  --fleet-api-address "$fleet" \
  --host "${control%:*}" --port "${control##*:}" \
  --disable-runtime-dependency-installation \
  "${extra[@]}"
