#!/usr/bin/env bash
# Installs every Debian package sync needs to build, run and test. Idempotent; run as root.
set -euo pipefail
PKGS=(
  build-essential make
  postgresql-15 postgresql-server-dev-15 postgresql-contrib
  libcurl4-openssl-dev libjansson-dev libmicrohttpd-dev
  libipc-run-perl perl
  python3 curl ca-certificates openssl
  clang libclang-rt-14-dev
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
