"""An app instrumented with the OpenTelemetry Python SDK, as an independent peer for the proxy.

  peer.py client URL PROPAGATOR      - one CLIENT span, context injected, prints {trace_id, span_id}
  peer.py server PORT PROPAGATOR OUT - serves HTTP; each request continues the incoming context
                                        in a SERVER span and appends its ids to OUT as JSON lines
"""
import json
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry import trace
from opentelemetry.propagate import extract, inject, set_global_textmap
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.jaeger import JaegerPropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATORS = {
    "tracecontext": TraceContextTextMapPropagator,
    "b3": B3SingleFormat,
    "b3multi": B3MultiFormat,
    "jaeger": JaegerPropagator,
}


def ids(span, parent=None):
    ctx = span.get_span_context()
    out = {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}
    if parent is not None:
        out["parent_span_id"] = format(parent.span_id, "016x") if parent else ""
    return out


def main():
    mode, propagator = sys.argv[1], sys.argv[3]
    set_global_textmap(PROPAGATORS[propagator]())
    trace.set_tracer_provider(TracerProvider())
    tracer = trace.get_tracer("interop-peer")

    if mode == "client":
        url = sys.argv[2]
        with tracer.start_as_current_span("client-call", kind=trace.SpanKind.CLIENT) as span:
            headers = {}
            inject(headers)
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
                resp.read()
            print(json.dumps(ids(span)), flush=True)
        return

    port, out_path = int(sys.argv[2]), sys.argv[4]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            ctx = extract(dict(self.headers.items()))
            with tracer.start_as_current_span("server", context=ctx, kind=trace.SpanKind.SERVER) as span:
                parent = span.parent
                with open(out_path, "a") as f:
                    f.write(json.dumps(ids(span, parent)) + "\n")
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
