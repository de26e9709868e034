#!/usr/bin/env bash
# The proxy load benchmark: on loopback, drive (a) the app directly, (b) tracecar-proxy with 100%
# sampling exporting OTLP to a counting receiver, (c) nginx as a reverse proxy in front of the same
# app; report saturation throughput, latency at a fixed rate, proxy CPU per 10k requests and peak
# RSS. Prints a markdown table and writes $BENCH_OUT/results.json. See docs/benchmarks.md.
#
#   benches/load/run.sh                      # builds release binaries, quick run (~2 min)
#   BENCH_REPS=5 BENCH_SAT_SECONDS=20 BENCH_RATE_SECONDS=30 benches/load/run.sh   # longer run
#   BENCH_BIN_DIR=target/bench-bundle/bin benches/load/run.sh    # no build (see bundle.sh)
#
# Settings (environment):
#   BENCH_BIN_DIR       binaries (tracecar-proxy, bench-app, loadgen, otlp-sink, nginx, wrk);
#                       unset: build them with cargo, nginx/wrk from PATH or /usr/sbin
#   BENCH_REPS          repetitions, medians are reported (3)
#   BENCH_WARMUP        seconds of load before each measurement (1)
#   BENCH_SAT_SECONDS   saturation run length (4);  BENCH_SAT_CONNS connections (64)
#   BENCH_RATE          fixed request rate, req/s (2000);  BENCH_RATE_SECONDS (5);
#   BENCH_RATE_CONNS    connections of the fixed-rate run (16)
#   BENCH_SAT_TOOL      wrk or loadgen (wrk when found)
#   BENCH_PROXY_WORKERS proxy worker threads/processes: nginx worker_processes and tracecar's
#                       TOKIO_WORKER_THREADS (1)
#   BENCH_PROXY_CPUS    taskset CPU list of the proxy under test (on 2 cores: 1)
#   BENCH_LOAD_CPUS     taskset CPU list of load generator, app and receiver (on 2 cores: 0)
#   BENCH_APP_THREADS   app runtime threads (1)
#   BENCH_LOAD_THREADS  wrk and loadgen threads (1); on a big machine raise these three
#   BENCH_TARGETS       subset/order of "direct tracecar nginx"
#   BENCH_OUT           output directory (target/bench)
#   BENCH_PORT_BASE     first loopback port used (18080; uses base..base+6)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"
if [ -z "${BENCH_BIN_DIR:-}" ] && [ -x "$here/bin/tracecar-proxy" ]; then
    # run.sh inside a bundle made by bundle.sh: use the bundled binaries.
    BENCH_BIN_DIR=$here/bin
    repo=$here
else
    repo=$(cd "$here/../.." && pwd)
fi
cd "$repo"

reps=${BENCH_REPS:-3}
warmup=${BENCH_WARMUP:-1}
sat_secs=${BENCH_SAT_SECONDS:-4}
sat_conns=${BENCH_SAT_CONNS:-64}
rate=${BENCH_RATE:-2000}
rate_secs=${BENCH_RATE_SECONDS:-5}
rate_conns=${BENCH_RATE_CONNS:-16}
workers=${BENCH_PROXY_WORKERS:-1}
app_threads=${BENCH_APP_THREADS:-1}
load_threads=${BENCH_LOAD_THREADS:-1}
targets=${BENCH_TARGETS:-direct tracecar nginx}
out_dir=${BENCH_OUT:-$repo/target/bench}
[ "$repo" != "$here" ] || out_dir=${BENCH_OUT:-$here/results}
port=${BENCH_PORT_BASE:-18080}
ncpu=$(nproc)
if [ "$ncpu" -ge 2 ]; then
    proxy_cpus=${BENCH_PROXY_CPUS:-1}
    load_cpus=${BENCH_LOAD_CPUS:-0}
else
    proxy_cpus=${BENCH_PROXY_CPUS:-}
    load_cpus=${BENCH_LOAD_CPUS:-}
fi

app_port=$port
sink_port=$((port + 1))
tc_in=$((port + 2))
tc_out=$((port + 3))
tc_admin=$((port + 4))
nginx_port=$((port + 5))

log() { printf '[bench] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    local f
    for f in "${work:-/nonexistent}"/*.log "${work:-/nonexistent}"/nginx/logs/error.log; do
        [ -s "$f" ] && { log "--- $f"; tail -n 5 "$f" >&2; }
    done
    exit 1
}

# ---- binaries -------------------------------------------------------------------------------
if [ -n "${BENCH_BIN_DIR:-}" ]; then
    bin=$(cd "$BENCH_BIN_DIR" && pwd)
    if [ -d "$bin/../lib" ]; then
        export LD_LIBRARY_PATH="$(cd "$bin/../lib" && pwd)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    nginx_bin=$bin/nginx
    wrk_bin=$bin/wrk
else
    log "building release binaries"
    cargo build --release -q -p tracecar-proxy --bin tracecar-proxy
    cargo build --release -q -p tracecar-tests --bin otlp-sink
    cargo build --release -q -p tracecar-benches --bin bench-app --bin loadgen
    bin=$repo/target/release
    nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
    wrk_bin=$(command -v wrk || true)
fi
for b in tracecar-proxy bench-app loadgen otlp-sink; do
    [ -x "$bin/$b" ] || die "missing $bin/$b"
done
case " $targets " in
*" nginx "*) [ -x "$nginx_bin" ] || die "nginx not found (apt-get install -y nginx-light, or BENCH_TARGETS)" ;;
esac
sat_tool=${BENCH_SAT_TOOL:-$([ -n "$wrk_bin" ] && [ -x "$wrk_bin" ] && echo wrk || echo loadgen)}
[ "$sat_tool" != wrk ] || [ -x "$wrk_bin" ] || die "BENCH_SAT_TOOL=wrk but wrk not found"

# Command prefixes that pin to the chosen CPUs (empty: unpinned). Prefixes, not a shell
# function, so that `$!` is the pid of the program itself.
pin_load=() pin_proxy=()
if command -v taskset >/dev/null; then
    [ -z "$load_cpus" ] || pin_load=(taskset -c "$load_cpus")
    [ -z "$proxy_cpus" ] || pin_proxy=(taskset -c "$proxy_cpus")
fi

# ---- processes ------------------------------------------------------------------------------
work=$(mktemp -d /tmp/tracecar-bench.XXXXXX)
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { # wait_port PORT: until something accepts on 127.0.0.1:PORT
    local i
    for i in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "nothing listens on 127.0.0.1:$1"
}

http_get() { # http_get PORT PATH: the body of GET http://127.0.0.1:PORT/PATH (HTTP/1.0)
    timeout 5 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1"
        printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" "$2" >&3
        cat <&3' _ "$1" "$2" | sed '1,/^\r\{0,1\}$/d'
}

metric() { # metric SERIES: a value from tracecar's /metrics (0 when absent)
    http_get "$tc_admin" /metrics | awk -v s="$1" '$1 == s { v += $2 } END { print v + 0 }'
}

dropped() { # all tracecar_spans_dropped_total series, summed
    http_get "$tc_admin" /metrics | awk '$1 ~ /^tracecar_spans_dropped_total/ { v += $2 } END { print v + 0 }'
}

cpu_ticks() { # cpu_ticks PID: utime+stime of PID and its children processes, in clock ticks
    local u s
    read -r u s <<<"$(proc_ticks "$1")"
    echo $((u + s))
}
hz=$(getconf CLK_TCK)
mkdir -p "$out_dir"
rm -f "$out_dir"/*-sat-*.json "$out_dir"/*-rate-*.json

log "work dir $work; proxy CPUs '${proxy_cpus:-any}', load CPUs '${load_cpus:-any}', saturation tool $sat_tool"

"${pin_load[@]}" "$bin/bench-app" --listen "127.0.0.1:$app_port" --threads "$app_threads" 2>"$work/app.log" &
pids+=($!)
wait_port "$app_port"

declare -A url proxy_pid
url[direct]="http://127.0.0.1:$app_port/"

case " $targets " in
*" tracecar "*)
    "${pin_load[@]}" "$bin/otlp-sink" --listen "127.0.0.1:$sink_port" --out "$work/spans.count" --count-only \
        2>"$work/sink.log" &
    sink_pid=$!
    pids+=($!)
    wait_port "$sink_port"
    "${pin_proxy[@]}" env TRACECAR_INBOUND_LISTEN="127.0.0.1:$tc_in" \
        TRACECAR_OUTBOUND_LISTEN="127.0.0.1:$tc_out" \
        TRACECAR_ADMIN_LISTEN="127.0.0.1:$tc_admin" \
        TRACECAR_INBOUND_TARGET="127.0.0.1:$app_port" \
        OTEL_SERVICE_NAME=bench-app \
        OTEL_TRACES_EXPORTER=otlp \
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$sink_port" \
        OTEL_EXPORTER_OTLP_PROTOCOL=grpc \
        OTEL_TRACES_SAMPLER=always_on \
        TRACECAR_LOG=warn \
        TOKIO_WORKER_THREADS="$workers" \
        "$bin/tracecar-proxy" run 2>"$work/tracecar.log" &
    proxy_pid[tracecar]=$!
    pids+=($!)
    wait_port "$tc_admin"
    for _ in $(seq 1 50); do
        http_get "$tc_admin" /ready | grep -i ready >/dev/null && break
        sleep 0.1
    done
    url[tracecar]="http://127.0.0.1:$tc_in/"
    ;;
esac

case " $targets " in
*" nginx "*)
    nginx_conf "$work/nginx" "$workers" "127.0.0.1:$app_port" "127.0.0.1:$nginx_port"
    cp "$work/nginx/nginx.conf" "$out_dir/nginx.conf"
    "${pin_proxy[@]}" "$nginx_bin" -p "$work/nginx" -e "$work/nginx/logs/error.log" \
        -c "$work/nginx/nginx.conf" 2>"$work/nginx.log" &
    proxy_pid[nginx]=$!
    pids+=($!)
    wait_port "$nginx_port"
    url[nginx]="http://127.0.0.1:$nginx_port/"
    ;;
esac

# ---- measurement ----------------------------------------------------------------------------
cat >"$work/wrk.lua" <<'EOF'
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format('{"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%.1f,"p99_us":%.1f}\n',
        summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
        latency:percentile(50), latency:percentile(99)))
end
EOF

jget() { # jget KEY < one-line JSON: a numeric value
    sed -n "s/.*\"$1\":\(-\{0,1\}[0-9][0-9.e+-]*\).*/\1/p" | sed -n 1p
}

sent_tracecar=0
results=$work/runs.tsv # target rep sat_rps sat_cpu_util sat_cpu_10k p50 p99 rate cpu_10k errors
: >"$results"

run_target() { # run_target TARGET REP
    local t=$1 rep=$2 u=${url[$1]} pid=${proxy_pid[$1]:-} c0 c1 t0 t1 sat rate_json
    local sat_rps sat_n sat_err sat_wall sat_cpu_10k=- sat_util=- cpu_10k=- n
    # saturation
    c0=0; [ -z "$pid" ] || c0=$(cpu_ticks "$pid")
    t0=$(date +%s.%N)
    if [ "$sat_tool" = wrk ]; then
        n=$("${pin_load[@]}" "$wrk_bin" -t"$load_threads" -c"$sat_conns" -d"${warmup}s" -s "$work/wrk.lua" "$u" | jget requests)
        [ "$t" != tracecar ] || sent_tracecar=$((sent_tracecar + ${n:-0}))
        [ -z "$pid" ] || c0=$(cpu_ticks "$pid")
        t0=$(date +%s.%N)
        sat=$("${pin_load[@]}" "$wrk_bin" -t"$load_threads" -c"$sat_conns" -d"${sat_secs}s" -s "$work/wrk.lua" "$u" | grep '^{')
        sat_n=$(jget requests <<<"$sat")
        sat_rps=$(awk -v n="$sat_n" -v d="$(jget duration_us <<<"$sat")" 'BEGIN { printf "%.0f", n / (d / 1e6) }')
        n=$sat_n
    else
        sat=$("${pin_load[@]}" "$bin/loadgen" --threads "$load_threads" --url "$u" --rate 0 --connections "$sat_conns" \
            --duration "$sat_secs" --warmup "$warmup")
        sat_rps=$(jget rate <<<"$sat")
        n=$(jget all_requests <<<"$sat")
    fi
    t1=$(date +%s.%N)
    sat_err=$(jget errors <<<"$sat")
    if [ -n "$pid" ]; then
        c1=$(cpu_ticks "$pid")
        sat_cpu_10k=$(awk -v c=$((c1 - c0)) -v hz="$hz" -v n="$n" 'BEGIN { printf "%.3f", c / hz / n * 10000 }')
        sat_util=$(awk -v c=$((c1 - c0)) -v hz="$hz" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", 100 * c / hz / (b - a) }')
    fi
    [ "$t" != tracecar ] || sent_tracecar=$((sent_tracecar + n))
    # fixed rate
    c0=0; [ -z "$pid" ] || c0=$(cpu_ticks "$pid")
    rate_json=$("${pin_load[@]}" "$bin/loadgen" --threads "$load_threads" --url "$u" --rate "$rate" --connections "$rate_conns" \
        --duration "$rate_secs" --warmup "$warmup")
    n=$(jget all_requests <<<"$rate_json")
    if [ -n "$pid" ]; then
        c1=$(cpu_ticks "$pid")
        cpu_10k=$(awk -v c=$((c1 - c0)) -v hz="$hz" -v n="$n" 'BEGIN { printf "%.3f", c / hz / n * 10000 }')
    fi
    [ "$t" != tracecar ] || sent_tracecar=$((sent_tracecar + n))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$rep" "$sat_rps" "$sat_util" "$sat_cpu_10k" \
        "$(jget lat_p50_us <<<"$rate_json")" "$(jget lat_p99_us <<<"$rate_json")" "$(jget rate <<<"$rate_json")" \
        "$cpu_10k" "$((${sat_err:-0} + $(jget errors <<<"$rate_json") + $(jget unsent <<<"$rate_json")))" >>"$results"
    echo "$sat" >"$out_dir/$t-sat-$rep.json"
    echo "$rate_json" >"$out_dir/$t-rate-$rep.json"
    log "$t rep $rep: saturation $sat_rps req/s (proxy CPU ${sat_util}%), at $rate req/s p50 $(jget lat_p50_us <<<"$rate_json") µs p99 $(jget lat_p99_us <<<"$rate_json") µs, CPU/10k $cpu_10k s"
}

for rep in $(seq 1 "$reps"); do
    for t in $targets; do run_target "$t" "$rep"; done
done

# ---- spans and memory -----------------------------------------------------------------------
declare -A rss
for t in $targets; do
    [ -z "${proxy_pid[$t]:-}" ] || rss[$t]=$(hwm_kib "${proxy_pid[$t]}")
done
exported=- received=- drops=- started=- sink_cpu=-
if [ -n "${proxy_pid[tracecar]:-}" ]; then
    # Wait for the export queue to drain: the receiver's count stops moving.
    last=-1
    for _ in $(seq 1 60); do
        received=$(jget spans <"$work/spans.count")
        [ "$received" != "$last" ] || break
        last=$received
        sleep 0.5
    done
    exported=$(metric tracecar_spans_exported_total)
    started=$(metric tracecar_spans_started_total)
    drops=$(dropped)
    http_get "$tc_admin" /metrics >"$out_dir/tracecar-metrics.txt" || true
    sink_cpu=$(awk -v c="$(cpu_ticks "$sink_pid")" -v hz="$hz" 'BEGIN { printf "%.2f", c / hz }')
fi

# ---- report ---------------------------------------------------------------------------------
median() { # median COLUMN TARGET
    awk -F'\t' -v c="$1" -v t="$2" '$1 == t && $c != "-" { print $c }' "$results" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }
minus() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-") print "-"; else printf "%.0f", a - b }'; }
capacity() { awk -v c="$1" 'BEGIN { if (c == "-" || c == 0) print "-"; else printf "%.0f", 10000 / c }'; }
mib() { awk -v k="${1:--}" 'BEGIN { if (k == "-") print "-"; else printf "%.1f", k / 1024 }'; }

declare -A M
for t in $targets; do
    M[$t.sat]=$(median 3 "$t"); M[$t.util]=$(median 4 "$t"); M[$t.satcpu]=$(median 5 "$t")
    M[$t.p50]=$(median 6 "$t"); M[$t.p99]=$(median 7 "$t"); M[$t.rate]=$(median 8 "$t")
    M[$t.cpu]=$(median 9 "$t")
    M[$t.err]=$(awk -F'\t' -v t="$t" '$1 == t { s += $10 } END { print s + 0 }' "$results")
done
nginx_sat=${M[nginx.sat]:--}
direct_p50=${M[direct.p50]:--}
direct_p99=${M[direct.p99]:--}

{
    echo "| target | saturation req/s | vs nginx | proxy CPU at saturation | est. req/s per proxy core | p50 µs @ ${rate}/s | p99 µs @ ${rate}/s | added p50 / p99 µs | proxy CPU s / 10k req @ ${rate}/s | at saturation | peak RSS MiB | errors |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for t in $targets; do
        util=${M[$t.util]}; [ "$util" = - ] || util="$util%"
        added="-"
        [ "$t" = direct ] || added="$(minus "${M[$t.p50]}" "$direct_p50") / $(minus "${M[$t.p99]}" "$direct_p99")"
        echo "| $t | ${M[$t.sat]} | $(ratio "${M[$t.sat]}" "$nginx_sat") | $util | $(capacity "${M[$t.satcpu]}") | ${M[$t.p50]} | ${M[$t.p99]} | $added | ${M[$t.cpu]} | ${M[$t.satcpu]} | $(mib "${rss[$t]:-}") | ${M[$t.err]} |"
    done
    echo
    if [ -n "${proxy_pid[tracecar]:-}" ]; then
        echo "tracecar spans: requests sent $sent_tracecar, spans started $started, exported $exported, received by the sink $received, dropped $drops (by reason: $out_dir/tracecar-metrics.txt); receiver CPU ${sink_cpu}s in all"
    fi
    echo "medians of $reps repetitions; saturation: $sat_tool, $sat_conns connections, ${sat_secs}s after ${warmup}s warm-up; fixed rate: loadgen $rate req/s, $rate_conns connections, ${rate_secs}s after ${warmup}s warm-up; latency from the intended send time"
} | tee "$out_dir/results.md"

{
    printf '{"machine":{"cpus":%s,"model":"%s","kernel":"%s"},' "$ncpu" \
        "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo | tr -d '"')" "$(uname -r)"
    printf '"settings":{"reps":%s,"warmup_s":%s,"sat_seconds":%s,"sat_conns":%s,"sat_tool":"%s","rate":%s,"rate_seconds":%s,"rate_conns":%s,"proxy_workers":%s,"load_threads":%s,"proxy_cpus":"%s","load_cpus":"%s","app_threads":%s},' \
        "$reps" "$warmup" "$sat_secs" "$sat_conns" "$sat_tool" "$rate" "$rate_secs" "$rate_conns" "$workers" "$load_threads" "$proxy_cpus" "$load_cpus" "$app_threads"
    printf '"targets":{'
    sep=""
    q() { if [ "$1" = - ] || [ -z "$1" ]; then echo null; else echo "$1"; fi; }
    for t in $targets; do
        printf '%s"%s":{"saturation_rps":%s,"saturation_vs_nginx":%s,"proxy_cpu_util_pct_at_saturation":%s,"p50_us":%s,"p99_us":%s,"achieved_rate":%s,"proxy_cpu_s_per_10k_at_rate":%s,"proxy_cpu_s_per_10k_at_saturation":%s,"est_rps_per_proxy_core":%s,"peak_rss_kib":%s,"errors":%s}' \
            "$sep" "$t" "$(q "${M[$t.sat]}")" "$(q "$(ratio "${M[$t.sat]}" "$nginx_sat")")" "$(q "${M[$t.util]}")" \
            "$(q "${M[$t.p50]}")" "$(q "${M[$t.p99]}")" "$(q "${M[$t.rate]}")" "$(q "${M[$t.cpu]}")" \
            "$(q "${M[$t.satcpu]}")" "$(q "$(capacity "${M[$t.satcpu]}")")" "$(q "${rss[$t]:-}")" "${M[$t.err]}"
        sep=","
    done
    printf '},"tracecar_spans":{"requests_sent":%s,"started":%s,"exported":%s,"received":%s,"dropped":%s,"receiver_cpu_s":%s},' \
        "$sent_tracecar" "$(q "$started")" "$(q "$exported")" "$(q "$received")" "$(q "$drops")" "$(q "$sink_cpu")"
    printf '"runs":['
    sep=""
    while IFS=$'\t' read -r t rep s u sc p50 p99 r c e; do
        printf '%s{"target":"%s","rep":%s,"saturation_rps":%s,"proxy_cpu_util_pct":%s,"sat_cpu_s_per_10k":%s,"p50_us":%s,"p99_us":%s,"achieved_rate":%s,"cpu_s_per_10k":%s,"errors":%s}' \
            "$sep" "$t" "$rep" "$(q "$s")" "$(q "$u")" "$(q "$sc")" "$(q "$p50")" "$(q "$p99")" "$(q "$r")" "$(q "$c")" "$e"
        sep=","
    done <"$results"
    printf ']}\n'
} >"$out_dir/results.json"
log "wrote $out_dir/results.json and $out_dir/results.md"
