#!/usr/bin/env bash
# Start the SuperLink on the edge server: TLS, SuperNode authentication (only registered
# device keys may join) and its state in a database on disk.
#
# usage: deploy/superlink.sh --certs DIR --state DIR [--fleet ADDR:PORT] [--control HOST:PORT]
#                            [extra flower-superlink flags ...]
#   --fleet    where devices connect over gRPC (Fleet API)          default 0.0.0.0:9092
#   --control  where `flwr run` / `flwr supernode register` connect  default 127.0.0.1:9093
#              (HTTPS with the same certificate). Bind it to an address devices cannot reach.
set -euo pipefail

certs="" state="" fleet="0.0.0.0:9092" control="127.0.0.1:9093" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --certs) certs="$2"; shift 2 ;;
    --state) state="$2"; shift 2 ;;
    --fleet) fleet="$2"; shift 2 ;;
    --control) control="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) extra+=("$1"); shift ;;
  esac
done
[ -n "$certs" ] && [ -n "$state" ] || { echo "superlink.sh: --certs DIR and --state DIR are required (see --help)" >&2; exit 2; }
for f in ca.crt server.pem server.key; do
  [ -f "$certs/$f" ] || { echo "superlink.sh: $certs/$f is missing: run deploy/gen-certs.sh --out $certs ..." >&2; exit 2; }
done
mkdir -p "$state"

# Dependencies are installed once per machine (pip install), not per run.
exec flower-superlink \
  --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" --ssl-keyfile "$certs/server.key" \
  --enable-supernode-auth \
  --database "$state/state.db" \
  --fleet-api-address "$fleet" \
  --host "${control%:*}" --port "${control##*:}" \
  --disable-runtime-dependency-installation \
  "${extra[@]}"
