#!/usr/bin/env bash
# Builds the preload library for shipping: linked against glibc 2.17's symbol versions (with
# cargo-zigbuild and Zig's glibc stubs), so that it loads in every glibc process from RHEL 7 /
# CentOS 7 on. glibc refuses to start a program whose preloaded library asks for a symbol
# version newer than its own (docs/causal.md), and a plain `cargo build` on a current distro
# asks for GLIBC_2.34. Checks the result and prints its path.
#
#   scripts/build-preload.sh [OUT_DIR]     # default target/portable
# Needs: cargo-zigbuild (`cargo install cargo-zigbuild`) and Zig (`pip install ziglang`).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/portable}
floor=2.17
target=x86_64-unknown-linux-gnu
case "$(uname -m)" in aarch64) target=aarch64-unknown-linux-gnu ;; esac
rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target" >/dev/null 2>&1 || true
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target} cargo zigbuild --release --locked -q -p tracecar-preload \
  --target "$target.$floor" >&2
lib=${CARGO_TARGET_DIR:-target}/$target/release/libtracecar_preload.so
# The newest glibc symbol version it asks for must not pass the floor.
newest=$(objdump -T "$lib" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)
if [ "$(printf '%s\n' "GLIBC_$floor" "$newest" | sort -V | tail -n 1)" != "GLIBC_$floor" ]; then
  echo "build-preload: $lib needs $newest, newer than GLIBC_$floor" >&2
  exit 1
fi
if objdump -p "$lib" | grep -q 'NEEDED.*libgcc_s'; then
  echo "build-preload: $lib needs libgcc_s, which minimal images lack" >&2
  exit 1
fi
mkdir -p "$out"
install -m 0755 "$lib" "$out/libtracecar_preload.so"
echo "build-preload: $out/libtracecar_preload.so (newest symbol version $newest, floor GLIBC_$floor)" >&2
echo "$out/libtracecar_preload.so"
