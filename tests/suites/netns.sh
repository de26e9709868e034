#!/usr/bin/env bash
# Interception end to end: pods as network namespaces, `tracecar-proxy init` iptables rules (nft
# and legacy), proxies as uid 2140, spans A -> B -> C, bypasses and pass-through.
# See tests/netns/rig.sh. Final line: `netns: N passed, M failed`.
set -uo pipefail
exec bash "$(dirname "$0")/../netns/rig.sh" "$@"
