#!/usr/bin/env bash
# What tracing costs the proxy: the same release proxy with full tracing (OTLP export to a
# counting sink), with spans but no export, and with tracing off. For each: proxy CPU seconds
# per 10k requests under saturation (wrk -t1 -c64) and p50/p99 at a fixed rate (loadgen).
# Proxy alone on CPU 1 with one worker thread; app, sink and load on CPU 0.
#
#   benches/load/tracing-cost.sh            # 2 repetitions, ~1.5 min
#   REPS=3 SAT_SECONDS=10 benches/load/tracing-cost.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
reps=${REPS:-2}
sat_secs=${SAT_SECONDS:-5}
rate=${RATE:-2000}
rate_secs=${RATE_SECONDS:-5}
base=${PORT_BASE:-19080}
app=127.0.0.1:$base sink=127.0.0.1:$((base + 1)) inbound=127.0.0.1:$((base + 2))
command -v wrk >/dev/null || { echo "tracing-cost: needs wrk (apt-get install wrk)" >&2; exit 1; }

cargo build --release -q -p tracecar-proxy -p tracecar-benches -p tracecar-tests
bin=target/release
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
taskset -c 0 "$bin/bench-app" --listen "$app" --threads 1 >/dev/null 2>&1 & pids+=($!)
taskset -c 0 "$bin/otlp-sink" --listen "$sink" --out "$(mktemp)" --count-only >/dev/null 2>&1 & pids+=($!)
sleep 0.5

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

measure() { # label, then env assignments for the proxy
    local label=$1; shift
    env TOKIO_WORKER_THREADS=1 TRACECAR_INBOUND_LISTEN="$inbound" \
        TRACECAR_OUTBOUND_LISTEN=127.0.0.1:$((base + 3)) TRACECAR_ADMIN_LISTEN=127.0.0.1:$((base + 4)) \
        TRACECAR_INBOUND_TARGET="$app" OTEL_EXPORTER_OTLP_ENDPOINT="http://$sink" \
        OTEL_TRACES_SAMPLER=always_on TRACECAR_LOG=warn "$@" \
        taskset -c 1 "$bin/tracecar-proxy" run &
    local proxy=$!
    sleep 0.5
    taskset -c 0 wrk -t1 -c64 -d1s "http://$inbound/" >/dev/null
    local t0 t1 out reqs lat
    t0=$(cpu_ticks "$proxy")
    out=$(taskset -c 0 wrk -t1 -c64 -d"${sat_secs}s" "http://$inbound/")
    t1=$(cpu_ticks "$proxy")
    reqs=$(awk '/requests in/{print $1}' <<<"$out")
    lat=$(taskset -c 0 "$bin/loadgen" --threads 1 --url "http://$inbound/" --rate "$rate" \
        --connections 16 --duration "$rate_secs" --warmup 1)
    kill "$proxy"; wait "$proxy" 2>/dev/null || true
    python3 - "$label" "$t0" "$t1" "$reqs" "$lat" "$(getconf CLK_TCK)" <<'PY'
import json, sys
label, t0, t1, reqs, lat, hz = sys.argv[1:]
cpu = (float(t1) - float(t0)) / float(hz)
l = json.loads(lat)
print(f"| {label} | {cpu / int(reqs) * 10000:.3f} | {l['lat_p50_us']:.0f} | {l['lat_p99_us']:.0f} |")
PY
}

echo "| proxy settings | CPU s / 10k req (saturation) | p50 µs @ ${rate}/s | p99 µs @ ${rate}/s |"
echo "| --- | ---: | ---: | ---: |"
for _ in $(seq "$reps"); do
    measure "full tracing, OTLP export" OTEL_TRACES_EXPORTER=otlp
    measure "spans, no export" OTEL_TRACES_EXPORTER=none
    measure "no tracing" OTEL_TRACES_EXPORTER=none OTEL_TRACES_SAMPLER=always_off \
        OTEL_PROPAGATORS=none TRACECAR_CORRELATION=off
done
