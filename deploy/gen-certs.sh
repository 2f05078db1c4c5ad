#!/usr/bin/env bash
# One command for all key material of an edge-lam federation:
#   - a CA (ca.crt/ca.key) that devices use to verify the server,
#   - the SuperLink's TLS certificate (server.pem/server.key) whose names include every
#     address devices and the laptop use to reach it,
#   - one EC key pair per device (devices/<name>, devices/<name>.pub, OpenSSH format) for
#     SuperNode authentication.
#
# usage: deploy/gen-certs.sh --out DIR --server-address ADDR [--server-address ADDR ...]
#                            [--device NAME ...] [--days N]
#   ADDR is an IP address or a DNS name (both go into the certificate's subjectAltName).
#   Re-running keeps an existing CA and existing device keys (only missing parts are made),
#   so adding a device never invalidates the others.
set -euo pipefail

out="" days=825 addrs=() devices=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --server-address) addrs+=("$2"); shift 2 ;;
    --device) devices+=("$2"); shift 2 ;;
    --days) days="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gen-certs: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "gen-certs: --out DIR is required" >&2; exit 2; }
[ ${#addrs[@]} -gt 0 ] || { echo "gen-certs: give at least one --server-address (the IP or name devices dial)" >&2; exit 2; }
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "gen-certs: '$tool' is missing: install openssl / openssh-client" >&2; exit 2; }
done

mkdir -p "$out/devices"
cd "$out"

if [ ! -f ca.key ]; then
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=edge-lam CA" -out ca.crt
fi

san="DNS:localhost,IP:127.0.0.1"
for a in "${addrs[@]}"; do
  if [[ "$a" =~ ^[0-9.]+$ || "$a" == *:* ]]; then san+=",IP:$a"; else san+=",DNS:$a"; fi
done
openssl ecparam -name prime256v1 -genkey -noout -out server.key
openssl req -new -key server.key -subj "/CN=${addrs[0]}" -out server.csr
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
  -sha256 -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext
chmod 600 ca.key server.key

for d in "${devices[@]}"; do
  [ -f "devices/$d" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "edge-lam-$d" -f "devices/$d"
done
echo "gen-certs: CA, server certificate for ${san} and ${#devices[@]} device key(s) in $(pwd)"
