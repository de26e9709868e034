#!/usr/bin/env bash
# The preload library as shipped: built against glibc 2.17's symbol versions
# (scripts/build-preload.sh checks them), then the library's whole test suite run with that
# build (TRACECAR_PRELOAD_LIB): every app shape, musl and static programs unharmed.
# Needs cargo-zigbuild and ziglang (scripts/install.d/preload.sh); in CI they must be there.
set -uo pipefail
cd "$(dirname "$0")/../.."
if ! command -v cargo-zigbuild >/dev/null || ! python3 -c 'import ziglang' 2>/dev/null; then
  if [ -n "${CI:-}" ]; then
    echo "preload-portable: cargo-zigbuild or ziglang missing (scripts/install.d/preload.sh)"
    echo "preload-portable: 0 passed, 1 failed"
    exit 1
  fi
  echo "preload-portable: skipped (no cargo-zigbuild or ziglang; CI must have them)"
  exit 0
fi
passed=0 failed=0
out=$(mktemp -d /tmp/tracecar-portable.XXXXXX)
trap 'rm -rf "$out"' EXIT
if lib=$(scripts/build-preload.sh "$out" 2>"$out/build.err"); then
  echo "ok    built for glibc >= 2.17: $(tail -n 1 "$out/build.err")"
  passed=$((passed + 1))
  if TRACECAR_PRELOAD_LIB=$lib cargo test -q -p tracecar-preload >"$out/test.log" 2>&1; then
    echo "ok    the library's test suite passes with the shipped build ($(grep -c '^test result: ok' "$out/test.log") test binaries)"
    passed=$((passed + 1))
  else
    echo "FAIL  the library's test suite with the shipped build"
    tail -n 30 "$out/test.log" | sed 's/^/      /'
    failed=$((failed + 1))
  fi
else
  echo "FAIL  build for glibc >= 2.17"
  sed 's/^/      /' "$out/build.err"
  failed=$((failed + 1))
fi
echo "preload-portable: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
