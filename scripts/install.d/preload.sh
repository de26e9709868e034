#!/usr/bin/env bash
# The preload library's tests: musl-gcc (a musl program must run unharmed) and a JDK (the JVM
# app shape; `java File.java` needs the compiler module). Node.js comes with npm (install-deps).
set -euo pipefail
missing=()
command -v musl-gcc >/dev/null 2>&1 || missing+=(musl-tools)
command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
