#!/usr/bin/env bash
# The whole test suite: installs what the tests need, checks format and lints, runs the Rust
# tests (unit, integration and end-to-end) and every shell suite in tests/suites/.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

echo "== cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== cargo build"
cargo build --workspace --all-targets --quiet

echo "== cargo test"
cargo test --workspace --no-fail-fast 2>&1 | tee target/cargo-test.log
grep -q '^test result: ' target/cargo-test.log

echo "== proxy end-to-end suites again, on one runtime thread (current-thread scheduler)"
# (h1 is left out: its tests already pin one worker.)
TRACECAR_TEST_WORKER_THREADS=1 cargo test -p tracecar-tests --test proxy --test protocols \
  --test export --test interop

failed=0
for suite in tests/suites/*.sh; do
  [ -e "$suite" ] || continue
  echo "== $suite"
  if ! bash "$suite"; then
    echo "FAILED: $suite"
    failed=$((failed + 1))
  fi
done
if [ "$failed" -ne 0 ]; then
  echo "$failed shell suite(s) failed"
  exit 1
fi
echo "all tests passed"
