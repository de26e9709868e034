#!/usr/bin/env bash
# The continuity benchmark (issue 12): how many of an app's outbound calls the preload library
# attributes to the inbound request that caused them, per runtime model and concurrency, and
# what the library costs the app.
#
#   benches/continuity/run.sh                 # 1, 8 and 32 clients; 3 throughput rounds of 5 s
#   CLIENTS="8" ROUNDS=5 SECONDS_PER_RUN=10 benches/continuity/run.sh
#
# Part 1 runs the real apps of preload/tests/causality.rs (Python threads, keep-alive, fork,
# asyncio; Node.js with and without its runtime hook; the JVM) with the library preloaded, each
# outbound request checked against the table when its head reaches a backend, and prints
# correct / unknown / wrong per shape. Part 2 drives hello-world apps (Python
# ThreadingHTTPServer, Node.js http) with wrk, alternately without and with the library (and a
# table), and prints requests per second and the ratio. Needs python3, node, java, wrk.
set -euo pipefail
cd "$(dirname "$0")/../.."

clients=${CLIENTS:-1 8 32}
rounds=${ROUNDS:-3}
secs=${SECONDS_PER_RUN:-5}
for tool in python3 node wrk; do
    command -v "$tool" >/dev/null || { echo "continuity: needs $tool" >&2; exit 1; }
done

cargo build --release -q -p tracecar-preload
lib=$PWD/target/release/libtracecar_preload.so
work=$(mktemp -d /tmp/tracecar-continuity.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "## Attribution (correct / unknown / wrong outbound calls; 40 requests per client, 2 calls each)"
echo
echo "| shape | clients | correct | unknown | wrong |"
echo "| --- | ---: | ---: | ---: | ---: |"
for c in $clients; do
    TRACECAR_TEST_CLIENTS=$c cargo test --release -q -p tracecar-preload --test causality \
        -- --nocapture --test-threads=1 2>&1 |
        sed -nE 's/^\.*([^:.][^:]*): ([0-9]+ clients in parallel: )?Tally \{ correct: ([0-9]+), unknown: ([0-9]+), wrong: ([0-9]+) \}.*/\1|\3|\4|\5/p' |
        while IFS='|' read -r shape correct unknown wrong; do
            echo "| $shape | $c | $correct | $unknown | $wrong |"
        done
done

# A table of the default size, as the proxy creates it (docs/causal.md: header, then slots).
table=$work/causal
python3 - "$table" <<'EOF'
import struct, sys
slots = 4096
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<8sII", b"TRCCAUS1", 1, slots).ljust(64, b"\0"))
    f.write(b"\0" * (32 * slots))
EOF

cat >"$work/hello.py" <<'EOF'
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body are two writes: without this, Nagle and delayed ACKs add 40 ms each.
    disable_nagle_algorithm = True
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
ThreadingHTTPServer.request_queue_size = 128
s = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
s.daemon_threads = True
s.serve_forever()
EOF
cat >"$work/hello.js" <<'EOF'
require('http').createServer((q, r) => { r.writeHead(200, {'content-length': 2}); r.end('ok'); })
  .listen(Number(process.argv[2]), '127.0.0.1');
EOF

# req/s of one wrk run against an app started with the given environment.
# Each request run in an AsyncLocalStorage and nothing else: what Node.js itself charges for
# the context the runtime hook keeps.
cat >"$work/als.js" <<'EOF'
const { AsyncLocalStorage } = require('async_hooks');
const http = require('http');
const store = new AsyncLocalStorage();
const emit = http.Server.prototype.emit;
http.Server.prototype.emit = function (event, req) {
  if (event === 'request') return store.run(req.socket.remotePort, () => emit.apply(this, arguments));
  return emit.apply(this, arguments);
};
EOF

# The app on CPU 0 and wrk on CPU 1 when there are two (less noise from sharing a core).
pin_app=() pin_load=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    pin_app=(taskset -c 0) pin_load=(taskset -c 1)
fi

# measure RUNTIME PORT WITH: req/s and the app's CPU µs per request, with
#   0: nothing; 1: the library; 2: the library and the Node.js hook;
#   3: AsyncLocalStorage only (no library, no hook).
measure() {
    local runtime=$1 port=$2 with=$3 pid app vars=()
    case $runtime in python3) app=$work/hello.py ;; *) app=$work/hello.js ;; esac
    case $with in
    1) vars=(LD_PRELOAD="$lib" TRACECAR_CAUSAL_TABLE="$table") ;;
    2) vars=(LD_PRELOAD="$lib" TRACECAR_CAUSAL_TABLE="$table" NODE_OPTIONS="--require=$hook") ;;
    3) vars=(NODE_OPTIONS="--require=$work/als.js") ;;
    esac
    "${pin_app[@]}" env -u LD_PRELOAD -u NODE_OPTIONS "${vars[@]}" "$runtime" "$app" "$port" 2>/dev/null &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 50); do
        (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    # The app's CPU per request as well (less at the mercy of a noisy machine than req/s).
    local t0 t1 out
    t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    out=$("${pin_load[@]}" wrk -t1 -c8 -d"${secs}s" "http://127.0.0.1:$port/" 2>/dev/null)
    t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    awk -v a="$t0" -v b="$t1" -v hz="$(getconf CLK_TCK)" '
        /requests in/ {n = $1}
        /Requests\/sec/ {rps = int($2)}
        END {printf "%d %.2f\n", rps, (n > 0) ? (b - a) * 1e6 / hz / n : 0}' <<<"$out"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

echo
echo "## App throughput on a hello-world path (wrk -t1 -c8, ${secs} s; median of $rounds alternating rounds)"
echo
echo "| app | without (req/s) | with (req/s) | ratio | without (app CPU µs/req) | with (app CPU µs/req) | ratio |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }
port=19280
hook=$PWD/preload/node/tracecar.js
for variant in "python3 1" "node 1" "node 2" "node 3"; do
    read -r runtime level <<<"$variant"
    without=() with=()
    for _ in $(seq "$rounds"); do
        port=$((port + 1)); without+=("$(measure "$runtime" "$port" 0)")
        port=$((port + 1)); with+=("$(measure "$runtime" "$port" "$level")")
    done
    a=$(printf '%s\n' "${without[@]}" | awk '{print $1}' | median)
    b=$(printf '%s\n' "${with[@]}" | awk '{print $1}' | median)
    ca=$(printf '%s\n' "${without[@]}" | awk '{print $2}' | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
    cb=$(printf '%s\n' "${with[@]}" | awk '{print $2}' | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
    ratio=$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f", (a > 0) ? b / a : 0 }')
    cratio=$(awk -v a="$ca" -v b="$cb" 'BEGIN { printf "%.3f", (a > 0) ? b / a : 0 }')
    case $level in
    1) what="the library" ;;
    2) what="the library and the runtime hook" ;;
    *) what="AsyncLocalStorage only (no library)" ;;
    esac
    echo "| $runtime, $what | $a | $b | $ratio | $ca | $cb | $cratio |"
done
