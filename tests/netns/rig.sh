#!/usr/bin/env bash
# The multi-pod interception rig: real network namespaces joined by a bridge, each "pod" with an
# uninstrumented app and a tracecar-proxy set up by `tracecar-proxy init` and running as uid 2140.
#
#   tc…x  10.233.0.10 + .11  "outside": the test client, the OTLP sink, plain servers
#   tc…a  10.233.0.2         app A -> B, proxy (skips outbound port 9090,9100-9110 and 10.233.0.11)
#   tc…b  10.233.0.3         app B -> C, proxy (defaults)
#   tc…c  10.233.0.4         app C, echo, TLS echo, banner servers, proxy (skips inbound 9091)
#   tc…l, tc…m               no links: rule checks with the legacy back-end and `auto`
#
# All traffic stays inside these namespaces (10.233.0.0/24, fd00:233::/64 on a bridge in tc…hub).
# Prints one line per check and finally `netns: N passed, M failed`; exits non-zero on failure.
# Without root or `ip netns`: skips (exit 0), unless CI is set (then fails).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
HERE=$ROOT/tests/netns

skip_or_fail() {
  if [ -n "${CI:-}" ]; then
    echo "netns: cannot run: $1 (CI is set, so this is a failure)"
    echo "netns: 0 passed, 1 failed"
    exit 1
  fi
  echo "netns: SKIPPED: $1 (set CI=1 to make this a failure)"
  exit 0
}

[ "$(id -u)" = 0 ] || skip_or_fail "needs root (network namespaces and iptables)"
command -v ip >/dev/null && ip netns list >/dev/null 2>&1 || skip_or_fail "'ip netns' is unavailable"
for tool in iptables-nft-save iptables-legacy-save ip6tables-nft-save setpriv python3 openssl; do
  command -v "$tool" >/dev/null || skip_or_fail "$tool is not installed (apt-get install iptables util-linux python3 openssl)"
done

RID=$(printf '%04d' $(($$ % 10000)))
P=tcn$RID
HUB=${P}hub A=${P}a B=${P}b C=${P}c X=${P}x L=${P}l M=${P}m
NAMESPACES=()
PIDS=()
WORK=$(mktemp -d /tmp/tracecar-netns.XXXXXX)
chmod 755 "$WORK"

cleanup() {
  local pid ns
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for ns in "${NAMESPACES[@]}"; do
    # Only processes inside our own namespaces (started by this script).
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null; done
  done
  sleep 0.2
  for ns in "${NAMESPACES[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- binaries
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PROXY_SRC=${TRACECAR_PROXY_BIN:-$TARGET/debug/tracecar-proxy}
SINK_SRC=${OTLP_SINK_BIN:-$TARGET/debug/otlp-sink}
if [ ! -x "$PROXY_SRC" ]; then
  cargo build -q -p tracecar-proxy || { echo "netns: cannot build tracecar-proxy"; echo "netns: 0 passed, 1 failed"; exit 1; }
fi
if [ ! -x "$SINK_SRC" ]; then
  cargo build -q -p tracecar-tests --bin otlp-sink 2>/dev/null
fi
mkdir -p "$WORK/bin"
# A copy that uid 2140 can surely execute.
install -m 755 "$PROXY_SRC" "$WORK/bin/tracecar-proxy"
PROXY=$WORK/bin/tracecar-proxy
if [ -x "$SINK_SRC" ] && [ -z "${NETNS_CONSOLE:-}" ]; then
  EXPORTER=otlp
  install -m 755 "$SINK_SRC" "$WORK/bin/otlp-sink"
  SPAN_FILES=("$WORK/spans.jsonl")
else
  EXPORTER=console
  echo "netns: note: reading spans from the proxies' console exporter (no otlp-sink, or NETNS_CONSOLE set)"
  SPAN_FILES=("$WORK/a.out" "$WORK/b.out" "$WORK/c.out")
fi

PRELOAD_SRC=$TARGET/debug/libtracecar_preload.so
[ -f "$PRELOAD_SRC" ] || cargo build -q -p tracecar-preload
install -m 755 "$PRELOAD_SRC" "$WORK/bin/libtracecar_preload.so"
PRELOAD=$WORK/bin/libtracecar_preload.so

# ---------------------------------------------------------------- topology
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

new_ns() {
  ip netns add "$1" || return 1
  NAMESPACES+=("$1")
  ip -n "$1" link set lo up
}

# attach NS NAME IPV4... : a veth from NS (eth0) to the bridge in the hub, with addresses.
attach() {
  local ns=$1 name=$2
  shift 2
  ip link add eth0 netns "$ns" type veth peer name "v$RID$name" netns "$HUB" || return 1
  ip -n "$HUB" link set "v$RID$name" master br0 up
  local addr
  for addr in "$@"; do
    case $addr in
      *:*) ip -n "$ns" addr add "$addr/64" dev eth0 nodad ;;
      *) ip -n "$ns" addr add "$addr/24" dev eth0 ;;
    esac
  done
  ip -n "$ns" link set eth0 up
}

setup_topology() {
  new_ns "$HUB" || return 1
  ip -n "$HUB" link add br0 type bridge
  ip -n "$HUB" link set br0 up
  new_ns "$A" && attach "$A" a 10.233.0.2 fd00:233::2 || return 1
  new_ns "$B" && attach "$B" b 10.233.0.3 fd00:233::3 || return 1
  new_ns "$C" && attach "$C" c 10.233.0.4 fd00:233::4 || return 1
  new_ns "$X" && attach "$X" x 10.233.0.10 10.233.0.11 fd00:233::10 fd00:233::11 || return 1
  new_ns "$L" && new_ns "$M"
}

# bg NS LOGNAME CMD...: runs CMD in NS in the background, output to $WORK/LOGNAME.{out,err}.
bg() {
  local ns=$1 log=$2
  shift 2
  ip netns exec "$ns" "$@" >"$WORK/$log.out" 2>"$WORK/$log.err" &
  PIDS+=($!)
  disown $!
}

app() { bg "$1" "$2" python3 "$HERE/apps.py" "${@:3}"; }

proxy() {
  local ns=$1 service=$2
  shift 2
  bg "$ns" "$service" setpriv --reuid 2140 --regid 2140 --clear-groups \
    env -i PATH=/usr/bin:/bin "$@" \
    OTEL_SERVICE_NAME="pod-$service" \
    OTEL_TRACES_EXPORTER="$EXPORTER" \
    OTEL_EXPORTER_OTLP_ENDPOINT=http://10.233.0.10:4317 \
    OTEL_EXPORTER_OTLP_PROTOCOL=grpc \
    OTEL_BSP_SCHEDULE_DELAY=200 \
    TRACECAR_DETECT_TIMEOUT=500ms \
    TRACECAR_LOG=info \
    "$PROXY" run
}

wait_port() { in_ns "$1" python3 "$HERE/apps.py" wait "$2" "$3" "${4:-20}"; }

# ---------------------------------------------------------------- checks
PASSED=0
FAILED=0
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then
    PASSED=$((PASSED + 1))
    echo "ok    $name: $(printf '%s\n' "$out" | tail -n 1)"
  else
    FAILED=$((FAILED + 1))
    echo "FAIL  $name"
    printf '%s\n' "$out" | tail -n 25 | sed 's/^/      /'
  fi
}

# The TRACECAR part of a ruleset: chain declarations and rules that name our chains.
ours() { grep -E '^(:TRACECAR_|-A TRACECAR_|-A [A-Z]+ .*-j TRACECAR_)' || true; }
# Section 4 or 6 of `init --dry-run` output.
dry_section() { awk -v want="$1" '/^# .*\(IPv4\)$/ {s = 4} /^# .*\(IPv6\)$/ {s = 6} s == want'; }
# The nat table without comments and the built-in chains' policy counters.
nat_table() { in_ns "$1" "$2" -t nat 2>/dev/null | grep -v '^#' | sed -E 's/^(:[A-Z]+ [A-Z]+) \[[0-9]+:[0-9]+\]$/\1/'; }

# Packet count of the first rule of CHAIN (nft back-end; IPv4, or IPv6 with FAMILY=6): the
# number of connections the REDIRECT in that chain caught.
redirects() {
  local save=iptables-nft-save
  [ "${FAMILY:-4}" = 6 ] && save=ip6tables-nft-save
  in_ns "$1" "$save" -c -t nat | grep -F -- "-A $2 " | sed -n 1p | sed -E 's/^\[([0-9]+):.*/\1/'
}

# rules_match NS BACKEND DRYRUN_FILE FAMILIES: installed TRACECAR rules equal the dry-run's.
rules_match() {
  local ns=$1 backend=$2 dry=$3 fam prog want got
  for fam in $4; do
    if [ "$fam" = 4 ]; then prog=iptables-$backend-save; else prog=ip6tables-$backend-save; fi
    want=$(dry_section "$fam" <"$dry" | ours)
    got=$(nat_table "$ns" "$prog" | ours)
    if [ -z "$want" ] || [ "$want" != "$got" ]; then
      echo "IPv$fam ($prog) differs from --dry-run:"
      diff <(printf '%s\n' "$want") <(printf '%s\n' "$got")
      return 1
    fi
  done
  echo "installed $backend rules equal --dry-run for IPv$(echo "$4" | sed 's/ / and IPv/') ($(printf '%s\n' "$want" | grep -c '^-A') rules each)"
}

# idempotent NS BACKEND INIT_ARGS...: a second init leaves the nat tables exactly as they were.
idempotent() {
  local ns=$1 backend=$2 before4 before6 after4 after6
  shift 2
  before4=$(nat_table "$ns" "iptables-$backend-save")
  before6=$(nat_table "$ns" "ip6tables-$backend-save")
  in_ns "$ns" "$PROXY" init "$@" 2>/dev/null || { in_ns "$ns" "$PROXY" init "$@"; return 1; }
  after4=$(nat_table "$ns" "iptables-$backend-save")
  after6=$(nat_table "$ns" "ip6tables-$backend-save")
  if [ "$before4" != "$after4" ] || [ "$before6" != "$after6" ]; then
    echo "nat tables changed on the second init:"
    diff <(printf '%s\n%s\n' "$before4" "$before6") <(printf '%s\n%s\n' "$after4" "$after6")
    return 1
  fi
  local jumps
  jumps=$(printf '%s\n' "$after4" | grep -c -- '-j TRACECAR_INBOUND$')
  [ "$jumps" = 1 ] || { echo "PREROUTING jumps to TRACECAR_INBOUND: $jumps, want 1"; return 1; }
  echo "second init changed nothing ($backend; one jump per built-in chain)"
}

A_INIT=(--skip-outbound-ports 9090,9100-9110 --skip-outbound-cidrs 10.233.0.11/32,fd00:233::11/128)
B_INIT=()
C_INIT=(--skip-inbound-ports 9091)
L_INIT=(--iptables-backend legacy --ipv6 on --skip-inbound-ports 22,8000-8100 --skip-outbound-cidrs 10.233.9.0/24,fd00:233:9::/48)

check_rules_nft() { rules_match "$A" nft "$WORK/a.dry" "4 6"; }
check_idempotent_nft() { idempotent "$A" nft "${A_INIT[@]}"; }

check_rules_legacy() {
  in_ns "$L" "$PROXY" init --dry-run "${L_INIT[@]}" >"$WORK/l.dry" || return 1
  in_ns "$L" "$PROXY" init "${L_INIT[@]}" 2>/dev/null || return 1
  if nat_table "$L" iptables-nft-save | grep TRACECAR >/dev/null; then
    echo "rules went to nft although --iptables-backend legacy"
    return 1
  fi
  rules_match "$L" legacy "$WORK/l.dry" "4 6"
}
check_idempotent_legacy() { idempotent "$L" legacy "${L_INIT[@]}"; }

check_auto_follows_legacy() {
  # A namespace whose existing rules are in the legacy tables (any rule will do).
  in_ns "$M" iptables-legacy -t filter -A INPUT -i lo -j ACCEPT || return 1
  in_ns "$M" "$PROXY" init --ipv6 off 2>/dev/null || return 1
  nat_table "$M" iptables-legacy-save | grep -- '-j TRACECAR_OUTPUT' >/dev/null || { echo "no rules in legacy"; return 1; }
  if nat_table "$M" iptables-nft-save | grep TRACECAR >/dev/null; then echo "rules in nft too"; return 1; fi
  echo "auto chose legacy where legacy already had rules"
}

check_invalid_value() {
  local err rc
  err=$("$PROXY" init --dry-run --skip-outbound-cidrs 10.0.0.0/33 2>&1 >/dev/null)
  rc=$?
  [ "$rc" = 2 ] || { echo "exit status $rc, want 2: $err"; return 1; }
  [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] || { echo "want one line, got: $err"; return 1; }
  case $err in
    *--skip-outbound-cidrs*) ;;
    *) echo "message does not name the flag: $err"; return 1 ;;
  esac
  case $err in
    *TRACECAR_SKIP_OUTBOUND_CIDRS*10.0.0.0/33* | *10.0.0.0/33*TRACECAR_SKIP_OUTBOUND_CIDRS*) ;;
    *) echo "message does not name the variable and the value: $err"; return 1 ;;
  esac
  echo "exit 2: $err"
}

check_trace_chain() {
  in_ns "$X" python3 "$HERE/apps.py" get http://10.233.0.2:8080/a || return 1
  python3 "$HERE/spans.py" chain 15 "${SPAN_FILES[@]}"
}

# bypass NAME NS CHAIN CLIENT_NS URL: the request works and CHAIN's REDIRECT caught nothing.
bypass() {
  local ns=$1 chain=$2 client=$3 url=$4 before after
  before=$(redirects "$ns" "$chain")
  in_ns "$client" python3 "$HERE/apps.py" get "$url" || return 1
  after=$(redirects "$ns" "$chain")
  [ "$before" = "$after" ] || { echo "$chain caught it: $before -> $after"; return 1; }
  echo "$url answered without $chain"
}

# captured NS CHAIN CMD...: CMD succeeds and went through CHAIN's REDIRECT.
captured() {
  local ns=$1 chain=$2 before after out
  shift 2
  before=$(redirects "$ns" "$chain")
  out=$("$@") || { printf '%s\n' "$out"; return 1; }
  after=$(redirects "$ns" "$chain")
  [ "$after" -gt "$before" ] || { echo "not redirected by $chain ($before -> $after): $out"; return 1; }
  printf '%s (via %s)\n' "$(printf '%s\n' "$out" | tail -n 1)" "$chain"
}

check_skip_outbound_port() {
  bypass "$A" TRACECAR_OUTBOUND_REDIRECT "$A" http://10.233.0.10:9090/skip-port || return 1
  # A captured request after it proves spans get exported, then the skipped one has none.
  captured "$A" TRACECAR_OUTBOUND_REDIRECT in_ns "$A" python3 "$HERE/apps.py" get http://10.233.0.10:8080/captured || return 1
  python3 "$HERE/spans.py" present 15 pod-a CLIENT /captured "${SPAN_FILES[@]}" || return 1
  python3 "$HERE/spans.py" absent pod-a /skip-port "${SPAN_FILES[@]}"
}

check_skip_outbound_cidr() {
  bypass "$A" TRACECAR_OUTBOUND_REDIRECT "$A" http://10.233.0.11:8080/skip-cidr || return 1
  in_ns "$A" python3 "$HERE/apps.py" get http://10.233.0.10:8080/captured-2 >/dev/null || return 1
  python3 "$HERE/spans.py" present 15 pod-a CLIENT /captured-2 "${SPAN_FILES[@]}" || return 1
  python3 "$HERE/spans.py" absent pod-a /skip-cidr "${SPAN_FILES[@]}"
}

check_skip_inbound_port() {
  bypass "$C" TRACECAR_INBOUND_REDIRECT "$X" http://10.233.0.4:9091/skip-in || return 1
  captured "$C" TRACECAR_INBOUND_REDIRECT in_ns "$X" python3 "$HERE/apps.py" get http://10.233.0.4:8080/c-direct || return 1
  python3 "$HERE/spans.py" present 15 pod-c SERVER /c-direct "${SPAN_FILES[@]}" || return 1
  python3 "$HERE/spans.py" absent pod-c /skip-in "${SPAN_FILES[@]}"
}

# through A's outbound and C's inbound capture, checked on both counters.
through_a_and_c() {
  local c_before c_after out
  c_before=$(redirects "$C" TRACECAR_INBOUND_REDIRECT)
  out=$(captured "$A" TRACECAR_OUTBOUND_REDIRECT timeout 30 ip netns exec "$A" python3 "$HERE/apps.py" "$@") || { printf '%s\n' "$out"; return 1; }
  c_after=$(redirects "$C" TRACECAR_INBOUND_REDIRECT)
  [ "$c_after" -gt "$c_before" ] || { echo "not redirected into C's proxy ($c_before -> $c_after)"; return 1; }
  printf '%s, and C inbound\n' "$out"
}

check_tcp_echo() { through_a_and_c echo-client 10.233.0.4 7000 200000; }
check_tls() { through_a_and_c tls 10.233.0.4 8443 c.test "$WORK/cert.pem"; }
check_server_first() { through_a_and_c banner-client 10.233.0.4 2525; }

check_ipv6_echo() {
  # The pods have IPv6 addresses, so `init --ipv6 auto` installed ip6tables rules too.
  FAMILY=6 through_a_and_c echo-client fd00:233::4 7000 50000 && return 0
  echo "(ip6tables REDIRECTs to [::1]:15140 and [pod address]:15143: the proxy must listen on IPv6 too)"
  return 1
}

# The preload library with iptables capture: a header-blind app in A, 8 clients in parallel from
# X, two calls per request to X (captured as outbound); every call a child of its own request.
check_causal_iptables() {
  [ -f "$WORK/causal-a/causal" ] || { echo "the proxy in A created no causal table"; return 1; }
  # Loaded as an injected container names it: glibc expands $PLATFORM.
  bg "$A" a-causal env LD_PRELOAD="$WORK/causal-a/lib/\$PLATFORM/libtracecar_preload.so" \
    TRACECAR_CAUSAL_TABLE="$WORK/causal-a/causal" python3 "$HERE/apps.py" http-causal 8082 http://10.233.0.10:8080
  wait_port "$A" 10.233.0.2 8082 || return 1
  in_ns "$X" python3 "$HERE/apps.py" burst http://10.233.0.2:8082 48 8 || return 1
  # Conntrack gives a redirected connection another source port when its reply tuple would
  # clash with a tracked one (nf_nat's implicit source port remap, rare): the proxy then sees
  # a port the library never published, and that call falls back. Each such call must be one
  # of these remaps; any other miss fails.
  local remaps
  remaps=$(in_ns "$A" conntrack -L -p tcp --orig-dst 10.233.0.10 --dport 8080 --reply-port-src 15140 2>/dev/null |
    python3 "$HERE/spans.py" remaps)
  python3 "$HERE/spans.py" causal 15 pod-a 48 "${remaps:-0}" "${SPAN_FILES[@]}"
}

check_self_call() {
  # The app calling its own pod IP: captured as outbound, reaches the app, no loop.
  timeout 20 ip netns exec "$A" python3 "$HERE/apps.py" get http://10.233.0.2:8081/self
}

# ---------------------------------------------------------------- run
if ! setup_topology; then
  skip_or_fail "cannot create network namespaces and veth pairs here"
fi
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=c.test -addext subjectAltName=DNS:c.test \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" >/dev/null 2>&1

# Apps (as root: uid 0 is an app, not the proxy).
app "$X" x-http-8080 http 8080
app "$X" x-http-9090 http 9090
app "$C" c-http http 8080
app "$C" c-http-9091 http 9091
app "$C" c-echo echo 7000
app "$C" c-tls tls-echo 8443 "$WORK/cert.pem" "$WORK/key.pem"
app "$C" c-banner banner 2525
app "$B" b-http http 8080 http://10.233.0.4:8080/c
app "$A" a-http http 8080 http://10.233.0.3:8080/b
app "$A" a-http-8081 http 8081
if [ "$EXPORTER" = otlp ]; then
  bg "$X" sink "$WORK/bin/otlp-sink" --listen 10.233.0.10:4317 --out "$WORK/spans.jsonl"
fi

# init: dry-run first (pod A's is compared with what gets installed), then install.
in_ns "$A" "$PROXY" init --dry-run "${A_INIT[@]}" >"$WORK/a.dry"
for pod in A B C; do
  ns=${!pod} init_args="${pod}_INIT[@]"
  if ! in_ns "$ns" "$PROXY" init "${!init_args}" 2>"$WORK/init-$pod.log"; then
    echo "netns: warning: tracecar-proxy init failed in pod $pod: $(tail -n 1 "$WORK/init-$pod.log")"
  fi
done

# Pod A's shared volume for the causal table: the proxy (uid 2140) creates the table and copies
# the preload library into it; an app in A loads it from there (check_causal_iptables).
mkdir -p "$WORK/causal-a" && chmod 777 "$WORK/causal-a"
proxy "$A" a TRACECAR_CAUSAL_TABLE="$WORK/causal-a/causal" TRACECAR_PRELOAD_SOURCE="$PRELOAD"
proxy "$B" b
proxy "$C" c
for ns in "$A" "$B" "$C"; do
  wait_port "$ns" 127.0.0.1 15190 || echo "netns: warning: the proxy in $ns did not open its admin port"
done
wait_port "$C" 127.0.0.1 8443 || true
wait_port "$X" 10.233.0.10 9090 || true
[ "$EXPORTER" = otlp ] && { wait_port "$X" 10.233.0.10 4317 || echo "netns: warning: the sink did not start"; }

check "rules: nft dry-run equals installed (IPv4+IPv6)" check_rules_nft
check "rules: nft init twice is idempotent" check_idempotent_nft
check "rules: legacy dry-run equals installed (IPv4+IPv6)" check_rules_legacy
check "rules: legacy init twice is idempotent" check_idempotent_legacy
check "rules: auto follows the back-end that has rules" check_auto_follows_legacy
check "init: invalid value exits 2 with one line" check_invalid_value
check "trace: X -> A -> B -> C is one linked trace" check_trace_chain
check "bypass: skipped outbound port" check_skip_outbound_port
check "bypass: skipped outbound CIDR" check_skip_outbound_cidr
check "bypass: skipped inbound port" check_skip_inbound_port
check "opaque: raw TCP echo is byte-for-byte" check_tcp_echo
check "opaque: TLS passes through" check_tls
check "opaque: server-speaks-first does not hang" check_server_first
check "opaque: raw TCP echo over IPv6 through both proxies" check_ipv6_echo
check "loop: app calls its own pod IP" check_self_call
check "causal: the preload library with iptables capture, 8 clients" check_causal_iptables

if [ "$FAILED" -gt 0 ]; then
  for log in a b c sink; do
    [ -s "$WORK/$log.err" ] || continue
    echo "---- last lines of $log.err"
    tail -n 8 "$WORK/$log.err" | cut -c1-400
  done
fi
echo "netns: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
