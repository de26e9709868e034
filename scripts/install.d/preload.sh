#!/usr/bin/env bash
# The preload library's tests: musl-gcc (a musl program must run unharmed) and a JDK (the JVM
# app shape; `java File.java` needs the compiler module). Node.js comes with npm (install-deps).
# The shipped build (scripts/build-preload.sh): cargo-zigbuild here, Zig from pip
# (tests/requirements.txt), objdump (binutils).
set -euo pipefail
missing=()
command -v musl-gcc >/dev/null 2>&1 || missing+=(musl-tools)
command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)
command -v objdump >/dev/null 2>&1 || missing+=(binutils)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo-zigbuild >/dev/null 2>&1; then
  echo "install-deps: cargo install cargo-zigbuild"
  cargo install --locked -q cargo-zigbuild@0.24.1
fi
