#!/usr/bin/env bash
# Packs the load benchmark for a machine without package registries or a Rust toolchain:
# release tracecar-proxy, bench-app, loadgen, otlp-sink, nginx and wrk, plus the shared
# libraries they need other than glibc's, into target/bench-bundle/{bin,lib}, with run.sh.
#
#   benches/load/bundle.sh                       # build, then pack into target/bench-bundle
#   BUNDLE_DIR=/tmp/b BUNDLE_NO_BUILD=1 benches/load/bundle.sh
#
# On the other machine (x86_64 Linux, glibc at least as new as this one's, bash, awk, sed,
# taskset from util-linux):
#   tar xzf tracecar-bench-bundle.tar.gz && cd bench-bundle && ./run.sh
# run.sh finds bin/ next to itself and sets LD_LIBRARY_PATH to lib/; results go to results/.
# Pick CPUs there with BENCH_PROXY_CPUS / BENCH_LOAD_CPUS / BENCH_PROXY_WORKERS (see run.sh).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
dest=${BUNDLE_DIR:-$repo/target/bench-bundle}

if [ -z "${BUNDLE_NO_BUILD:-}" ]; then
    cargo build --release -q -p tracecar-proxy --bin tracecar-proxy
    cargo build --release -q -p tracecar-tests --bin otlp-sink
    cargo build --release -q -p tracecar-benches --bin bench-app --bin loadgen
fi

rm -rf "$dest"
mkdir -p "$dest/bin" "$dest/lib"
bins=("$repo/target/release/tracecar-proxy" "$repo/target/release/bench-app"
    "$repo/target/release/loadgen" "$repo/target/release/otlp-sink")
nginx=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$nginx" ] || { echo "bundle.sh: nginx not found (apt-get install -y nginx-light)" >&2; exit 1; }
bins+=("$nginx")
if wrk=$(command -v wrk); then bins+=("$wrk"); else echo "bundle.sh: no wrk; run.sh will use loadgen for saturation" >&2; fi

for b in "${bins[@]}"; do
    [ -x "$b" ] || { echo "bundle.sh: missing $b" >&2; exit 1; }
    cp -L "$b" "$dest/bin/"
    # Shared libraries, except glibc's own (the target's glibc must be used) and the vDSO.
    ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }' | while read -r name path; do
        case "$name" in
        libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | libresolv.so.* | ld-linux*) ;;
        *) cp -L "$path" "$dest/lib/$name" ;;
        esac
    done
done
cp "$repo/benches/load/run.sh" "$dest/run.sh"
cp "$repo/benches/load/common.sh" "$dest/common.sh"
chmod +x "$dest/run.sh"
tar czf "$dest/../tracecar-bench-bundle.tar.gz" -C "$(dirname "$dest")" "$(basename "$dest")"
echo "bundle: $dest ($(du -sh "$dest" | cut -f1)); archive: $(cd "$dest/.." && pwd)/tracecar-bench-bundle.tar.gz"
ls -l "$dest/bin" "$dest/lib"
