# Sourced (not run) by deploy/emulate-arm64.sh and docker/build-oci.sh: Debian packages of another suite
# or architecture through a private apt state (the host's apt and dpkg are not touched).

debian_mirror() {  # the Debian mirror this machine's apt already uses (no host name is written here)
  local m
  m="$(sed -n 's/^URIs:[[:space:]]*\([^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)"
  [ -n "$m" ] || m="$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list 2>/dev/null)"
  [ -n "$m" ] || { echo "no Debian mirror found in /etc/apt/sources.list{,.d}" >&2; return 1; }
  echo "$m"
}

apt_private() {  # apt_private STATE-DIR SUITE ARCH -- apt-get args...
  local dir="$1" suite="$2" arch="$3" mirror
  shift 4
  mirror="$(debian_mirror)" || return 1
  mkdir -p "$dir/lists/partial" "$dir/archives/partial" "$dir/cache"
  [ -f "$dir/status" ] || : > "$dir/status"
  echo "deb [arch=$arch signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" > "$dir/sources.list"
  apt-get -q -o Dir::Etc::SourceList="$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null \
    -o Dir::State::Lists="$dir/lists" -o Dir::State::Status="$dir/status" \
    -o Dir::Cache="$dir/cache" -o Dir::Cache::Archives="$dir/archives" \
    -o APT::Architecture="$arch" -o APT::Architectures="$arch" -o Debug::NoLocking=1 \
    -o APT::Install-Recommends=false -o APT::Sandbox::User=root "$@"
}
