#!/usr/bin/env bash
# On the laptop (or the server): add a named SuperLink connection to the Flower config
# ($FLWR_HOME/config.toml, default ~/.flwr) and register device public keys with it.
# Then `flwr run . NAME --stream` submits the app to that SuperLink.
#
# usage: deploy/connect.sh --name NAME --control HOST:PORT --ca CA.crt [--register devices/X.pub ...]
set -euo pipefail

name="" control="" ca="" pubs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --control) control="$2"; shift 2 ;;
    --ca) ca="$2"; shift 2 ;;
    --register) pubs+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "connect.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[ -n "$name" ] && [ -n "$control" ] && [ -f "$ca" ] || { echo "connect.sh: --name, --control HOST:PORT and an existing --ca file are required" >&2; exit 2; }

python3 - "$name" "$control" "$(cd "$(dirname "$ca")" && pwd)/$(basename "$ca")" <<'PY'
import os, sys
from pathlib import Path
import tomli, tomli_w
name, address, ca = sys.argv[1:4]
home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
home.mkdir(parents=True, exist_ok=True)
path = home / "config.toml"
config = tomli.loads(path.read_text()) if path.exists() else {}
config.setdefault("superlink", {})[name] = {"address": address, "root-certificates": ca}
config["superlink"].setdefault("default", name)
path.write_text(tomli_w.dumps(config))
print(f"connect.sh: connection '{name}' -> {address} written to {path}")
PY

for pub in "${pubs[@]}"; do
  flwr supernode register "$pub" "$name"
done
