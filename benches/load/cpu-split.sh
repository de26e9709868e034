#!/usr/bin/env bash
# Where a proxy's CPU goes per request: user and system µs per request and peak RSS under
# saturation (wrk), for tracecar in three tracing settings and for nginx, same pinning as
# run.sh (proxy alone on CPU 1; app, receiver and wrk on CPU 0). The quick A/B tool behind the
# per-step figures in docs/benchmarks.md; run.sh is the benchmark of record.
#
#   benches/load/cpu-split.sh                        # 2 rounds of: tracecar full, off, nginx
#   ROUNDS=3 SECONDS_PER_RUN=5 benches/load/cpu-split.sh
#   WORKERS=2 CONNS=128 PROXY_CPUS=0-1 LOAD_CPUS=0-1 ROUNDS=1 TARGETS=full benches/load/cpu-split.sh
#   BASE_BIN=/tmp/old/tracecar-proxy TARGETS="base full" ROUNDS=4 benches/load/cpu-split.sh   # A/B
#
# Settings: ROUNDS (2), SECONDS_PER_RUN (5), CONNS (64), WORKERS (1: tracecar workers and nginx
# worker_processes), PROXY_CPUS (1), LOAD_CPUS (0), TARGETS ("full off nginx"; "base" is full
# tracing with the binary BASE_BIN, e.g. one built from an earlier commit; "causal" is full
# tracing with the causal table open), PORT_BASE (19180).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=common.sh
. benches/load/common.sh
rounds=${ROUNDS:-2}
secs=${SECONDS_PER_RUN:-5}
conns=${CONNS:-64}
workers=${WORKERS:-1}
proxy_cpus=${PROXY_CPUS:-1}
load_cpus=${LOAD_CPUS:-0}
targets=${TARGETS:-full off nginx}
base=${PORT_BASE:-19180}
app=127.0.0.1:$base sink=127.0.0.1:$((base + 1)) inbound=127.0.0.1:$((base + 2))
nginx_port=$((base + 5))
for tool in wrk taskset; do
    command -v "$tool" >/dev/null || { echo "cpu-split: needs $tool" >&2; exit 1; }
done
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release -q -p tracecar-proxy -p tracecar-benches -p tracecar-tests
bin=target/release
work=$(mktemp -d /tmp/tracecar-cpu-split.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
taskset -c "$load_cpus" "$bin/bench-app" --listen "$app" --threads 1 >/dev/null 2>&1 &
pids+=($!)
taskset -c "$load_cpus" "$bin/otlp-sink" --listen "$sink" --out "$work/spans" --count-only >/dev/null 2>&1 &
pids+=($!)
sleep 0.5

nginx_conf "$work/nginx" "$workers" "$app" "127.0.0.1:$nginx_port"
hz=$(getconf CLK_TCK)

measure() { # measure LABEL
    local label=$1 pid url
    case "$label" in
    nginx)
        taskset -c "$proxy_cpus" "$nginx_bin" -p "$work/nginx" -c "$work/nginx/nginx.conf" 2>/dev/null &
        pid=$!
        url=http://127.0.0.1:$nginx_port/
        ;;
    *)
        local extra=() proxy_bin=$bin/tracecar-proxy
        [ "$label" = base ] && proxy_bin=${BASE_BIN:?BASE_BIN names the baseline binary}
        # No causal table unless asked for (a directory that does not exist: correlation falls back).
        extra=(TRACECAR_CAUSAL_TABLE=/nonexistent/tracecar/causal)
        [ "$label" = off ] && extra+=(OTEL_TRACES_SAMPLER=always_off OTEL_TRACES_EXPORTER=none OTEL_PROPAGATORS=none)
        if [ "$label" = causal ]; then
            # Full tracing with the preload library's table open, as in an injected pod: each
            # inbound request records its app connection for the outbound lookups.
            mkdir -p "$work/causal"
            extra=(TRACECAR_CAUSAL_TABLE="$work/causal/causal")
        fi
        taskset -c "$proxy_cpus" env TRACECAR_INBOUND_LISTEN="$inbound" \
            TRACECAR_OUTBOUND_LISTEN=127.0.0.1:$((base + 3)) TRACECAR_ADMIN_LISTEN=127.0.0.1:$((base + 4)) \
            TRACECAR_INBOUND_TARGET="$app" OTEL_SERVICE_NAME=bench OTEL_TRACES_EXPORTER=otlp \
            OTEL_EXPORTER_OTLP_ENDPOINT="http://$sink" OTEL_TRACES_SAMPLER=always_on TRACECAR_LOG=warn \
            TRACECAR_WORKER_THREADS="$workers" "${extra[@]}" "$proxy_bin" run 2>/dev/null &
        pid=$!
        url=http://$inbound/
        ;;
    esac
    sleep 0.5
    taskset -c "$load_cpus" wrk -t1 -c"$conns" -d1s "$url" >/dev/null
    local before after req
    before=$(proc_ticks "$pid")
    req=$(taskset -c "$load_cpus" wrk -t1 -c"$conns" -d"${secs}s" "$url" | awk '/requests in/ {print $1}')
    after=$(proc_ticks "$pid")
    local rss
    rss=$(hwm_kib "$pid")
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    read -r u0 s0 <<<"$before"
    read -r u1 s1 <<<"$after"
    # µs per request = ticks * (1e6 / ticks per second) / requests
    awk -v l="$label" -v r="$req" -v s="$secs" -v u=$((u1 - u0)) -v k=$((s1 - s0)) -v m="$rss" -v t="$(( 1000000 / hz ))" \
        'BEGIN { printf "| %s | %d | %.2f | %.2f | %.2f | %.1f |\n", l, r / s, u * t / r, k * t / r, (u + k) * t / r, m / 1024 }'
}

echo "| target | req/s | user µs/req | system µs/req | total µs/req | peak RSS MiB |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
for _ in $(seq 1 "$rounds"); do
    for t in $targets; do measure "$t"; done
done
echo "(wrk -t1 -c$conns, ${secs} s after 1 s warm-up; $workers worker(s); proxy CPUs $proxy_cpus, load CPUs $load_cpus)"
