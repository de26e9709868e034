#!/usr/bin/env python3
"""Span assertions for the network-namespace rig, over JSON-lines span files.

Each line is one span: trace_id, span_id, parent_span_id, name, kind, service_name, attributes
(the otlp-sink output and the proxy's console exporter both write this shape; other lines are
ignored).

  spans.py chain TIMEOUT FILE...        the A -> B -> C trace: 5 spans linked into one trace
  spans.py causal TIMEOUT SERVICE N REMAPS FILE...  SERVICE's calls /out/<i>/* are children of
                                   /in/<i>, all but at most REMAPS (NAT-remapped connections)
  spans.py remaps                  reads `conntrack -L` on stdin; prints how many entries have
                                   a reply port other than their original source port
  spans.py present TIMEOUT SERVICE KIND PATH FILE...
  spans.py absent SERVICE PATH FILE...  no span of SERVICE mentions PATH
Waits up to TIMEOUT seconds for spans to arrive (export is batched). Prints one line; exit 0 on
success.
"""

import json
import sys
import time


def load(files):
    spans = []
    for name in files:
        try:
            with open(name, encoding="utf-8", errors="replace") as f:
                for line in f:
                    line = line.strip()
                    if not line.startswith("{"):
                        continue
                    try:
                        span = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(span, dict) and "span_id" in span and "kind" in span:
                        spans.append(span)
        except FileNotFoundError:
            pass
    return spans


def path_of(span):
    attrs = span.get("attributes") or {}
    path = attrs.get("url.path")
    if path is None:
        full = attrs.get("url.full", "")
        if "://" in full:
            path = "/" + full.split("://", 1)[1].partition("/")[2]
    return path or ""


def find(spans, service, kind, path):
    return [
        s for s in spans
        if s.get("service_name") == service and s.get("kind") == kind and path_of(s) == path
    ]


def check_chain(spans):
    """(ok, message) for: pod-a SERVER /a -> pod-a CLIENT /b -> pod-b SERVER /b ->
    pod-b CLIENT /c -> pod-c SERVER /c."""
    hops = [
        ("pod-a", "SERVER", "/a"),
        ("pod-a", "CLIENT", "/b"),
        ("pod-b", "SERVER", "/b"),
        ("pod-b", "CLIENT", "/c"),
        ("pod-c", "SERVER", "/c"),
    ]
    found = []
    for hop in hops:
        matches = find(spans, *hop)
        if not matches:
            return False, f"missing span {hop} (have {len(spans)} spans: " + ", ".join(
                sorted({f'{s.get("service_name")}/{s.get("kind")}/{path_of(s)}' for s in spans})) + ")"
        found.append(matches[-1])
    traces = {s["trace_id"] for s in found}
    if len(traces) != 1:
        return False, f"spans in {len(traces)} traces, want 1: " + ", ".join(
            f'{h[0]}/{h[1]}={s["trace_id"][:8]}' for h, s in zip(hops, found))
    if found[0].get("parent_span_id"):
        return False, "pod-a SERVER span should be the root, has parent " + found[0]["parent_span_id"]
    for (hop, span), (prev_hop, prev) in zip(zip(hops[1:], found[1:]), zip(hops, found)):
        if span.get("parent_span_id") != prev["span_id"]:
            return False, f"{hop} has parent {span.get('parent_span_id')!r}, want {prev_hop} {prev['span_id']}"
    return True, "one trace " + found[0]["trace_id"] + ": " + " -> ".join(f"{h[0]} {h[1]} {h[2]}" for h in hops)


def check_causal(spans, service, n, remaps):
    """Every CLIENT span of /out/<i>/* has as parent the SERVER span of /in/<i>, said `causal`,
    but for at most `remaps` calls whose source port conntrack remapped (the proxy sees a port
    the library never published: those fall back, never to a wrong parent)."""
    servers = {path_of(s).split("/")[2]: s for s in spans
               if s.get("service_name") == service and s.get("kind") == "SERVER"
               and path_of(s).startswith("/in/")}
    calls = [s for s in spans if s.get("service_name") == service and s.get("kind") == "CLIENT"
             and path_of(s).startswith("/out/")]
    if len(servers) < n or len(calls) < 2 * n:
        return False, f"{len(servers)} of {n} SERVER and {len(calls)} of {2 * n} CLIENT spans so far"
    right = wrong = other = 0
    odd = []
    for c in calls:
        want = servers.get(path_of(c).split("/")[2])
        attrs = c.get("attributes") or {}
        how = attrs.get("tracecar.correlation")
        if want is None or not c.get("parent_span_id"):
            other += 1
        elif c["parent_span_id"] == want["span_id"] and how == "causal":
            right += 1
            continue
        elif c["parent_span_id"] != want["span_id"]:
            wrong += 1
        else:
            other += 1
        odd.append(f"{path_of(c)}: correlation {how}, parent {'right' if want and c.get('parent_span_id') == want['span_id'] else c.get('parent_span_id') or 'none'}")
    msg = (f"{right} of {len(calls)} calls parented exactly (causal), {wrong} wrong, {other} otherwise"
           f" ({remaps} source ports remapped by conntrack)")
    if odd:
        # The summary stays the last line (what the rig prints after `ok`).
        msg = "\n".join(odd[:8]) + "\n" + msg
    return wrong == 0 and other <= remaps, msg


def count_remaps(lines):
    """Entries of `conntrack -L` whose reply destination port is not the original source port."""
    n = 0
    for line in lines:
        sport = [v for k, v in (kv.split("=", 1) for kv in line.split() if "=" in kv) if k == "sport"]
        dport = [v for k, v in (kv.split("=", 1) for kv in line.split() if "=" in kv) if k == "dport"]
        if len(sport) == 2 and len(dport) == 2 and sport[0] != dport[1]:
            n += 1
    return n


def main(argv):
    mode = argv[1]
    if mode == "remaps":
        print(count_remaps(sys.stdin))
        return 0
    if mode == "absent":
        service, path, files = argv[2], argv[3], argv[4:]
        bad = [s for s in load(files) if s.get("service_name") == service and path in path_of(s)]
        if bad:
            print(f"unexpected {service} span(s) for {path}: {[s.get('kind') for s in bad]}")
            return 1
        print(f"no {service} span for {path}")
        return 0
    timeout = float(argv[2])
    deadline = time.monotonic() + timeout
    while True:
        if mode == "chain":
            ok, msg = check_chain(load(argv[3:]))
        elif mode == "causal":
            ok, msg = check_causal(load(argv[6:]), argv[3], int(argv[4]), int(argv[5]))
        elif mode == "present":
            service, kind, path = argv[3], argv[4], argv[5]
            got = find(load(argv[6:]), service, kind, path)
            ok, msg = bool(got), f"{service} {kind} span for {path}: {len(got)}"
        else:
            print(f"unknown mode {mode}")
            return 2
        if ok or time.monotonic() >= deadline:
            print(msg)
            return 0 if ok else 1
        time.sleep(0.25)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
