#!/usr/bin/env python3
"""Uninstrumented apps and clients for the network-namespace rig (tests/suites/netns.sh).

Servers (run in the background inside a pod's namespace):
  http PORT [DOWNSTREAM_URL]   HTTP/1 server; with DOWNSTREAM_URL each request first calls it
                               (a plain GET, no headers forwarded: the app knows no tracing)
  echo PORT                    raw TCP echo
  banner PORT                  server-speaks-first: sends "220 ..." on accept, then answers lines
  tls-echo PORT CERT KEY       TLS echo
  http-causal PORT BASE_URL    HTTP/1 server: /in/<n> calls BASE_URL/out/<n>/a, then /b, with
                               small random pauses (no headers forwarded): the path is the
                               ground truth of which inbound request caused which call
Clients (exit status 0 on success, one line of diagnosis otherwise):
  get URL                      GET; prints the body
  echo-client HOST PORT NBYTES sends random bytes, checks the echo is byte-for-byte equal
  tls HOST PORT NAME CAFILE    TLS handshake with SNI NAME, then an echo check
  banner-client HOST PORT      reads the banner, sends QUIT, reads the reply
  wait HOST PORT [SECONDS]     waits until HOST:PORT accepts connections
  burst BASE_URL N CLIENTS     GET BASE_URL/in/0 .. /in/N-1 from CLIENTS threads; all must be 200
No HTTP_PROXY handling anywhere: http.client connects where it is told to.
"""

import http.client
import http.server
import os
import socket
import socketserver
import ssl
import sys
import threading
import time
import urllib.parse

TIMEOUT = 10


def call(url):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=TIMEOUT)
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def serve_http(port, downstream=None):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"{self.path} served by :{port}\n".encode()
            status = 200
            if downstream:
                try:
                    status, sub = call(downstream)
                    body += sub
                except OSError as e:
                    status, body = 502, f"downstream {downstream}: {e}\n".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            sys.stderr.write("http:%d %s\n" % (port, fmt % args))

    http.server.ThreadingHTTPServer.allow_reuse_address = True
    srv = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    srv.serve_forever()


def serve_http_causal(port, base):
    import random

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            n = self.path.split("/")[2] if self.path.startswith("/in/") else "x"
            status = 200
            for leg in ("a", "b"):
                time.sleep(random.uniform(0.001, 0.010))
                try:
                    status = max(status, call(f"{base}/out/{n}/{leg}")[0])
                except OSError:
                    status = 502
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, fmt, *args):
            pass

    http.server.ThreadingHTTPServer.allow_reuse_address = True
    srv = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    srv.request_queue_size = 128
    srv.serve_forever()


def burst(base, n, clients):
    lock = threading.Lock()
    todo = list(range(n))
    failed = []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            try:
                status, _ = call(f"{base}/in/{i}")
            except OSError as e:
                status = str(e)
            if status != 200:
                with lock:
                    failed.append((i, status))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        print(f"{len(failed)} of {n} failed, e.g. {failed[:3]}")
        return 1
    print(f"{n} requests from {clients} clients: all 200")
    return 0


class Threaded(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve_echo(port, wrap=None):
    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            sock = self.request
            if wrap:
                try:
                    sock = wrap(sock)
                except (ssl.SSLError, OSError) as e:
                    sys.stderr.write(f"tls handshake: {e}\n")
                    return
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                sock.sendall(data)

    # Dual-stack: IPv4 and IPv6 clients.
    class Threaded6(Threaded):
        address_family = socket.AF_INET6

    Threaded6(("::", port), Handler).serve_forever()


def serve_banner(port):
    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"220 banner.test ESMTP ready\r\n")
            for line in self.rfile:
                if line.strip().upper() == b"QUIT":
                    self.wfile.write(b"221 bye\r\n")
                    return
                self.wfile.write(b"250 ok\r\n")

    Threaded(("0.0.0.0", port), Handler).serve_forever()


def recv_exact(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def echo_check(sock, nbytes, concurrent=True):
    # Starts with bytes no protocol detector mistakes for HTTP or TLS.
    payload = b"\x00\x01raw" + os.urandom(nbytes)
    if concurrent:
        # Large payloads: send while reading, or both sides' buffers fill and stall.
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        got = recv_exact(sock, len(payload))
        sender.join()
    else:
        # An SSLSocket must not be written and read from two threads at once (OpenSSL's
        # state is shared); a small payload fits in the buffers, so one thread does both.
        sock.sendall(payload)
        got = recv_exact(sock, len(payload))
    if got != payload:
        print(f"echo mismatch: sent {len(payload)} bytes, got {len(got)} (equal prefix: "
              f"{os.path.commonprefix([got, payload]).__len__()})")
        return 1
    print(f"echoed {len(payload)} bytes unchanged")
    return 0


def main(argv):
    mode, args = argv[1], argv[2:]
    if mode == "http":
        serve_http(int(args[0]), args[1] if len(args) > 1 else None)
    elif mode == "http-causal":
        serve_http_causal(int(args[0]), args[1])
    elif mode == "burst":
        return burst(args[0], int(args[1]), int(args[2]))
    elif mode == "echo":
        serve_echo(int(args[0]))
    elif mode == "banner":
        serve_banner(int(args[0]))
    elif mode == "tls-echo":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args[1], args[2])
        serve_echo(int(args[0]), wrap=lambda s: ctx.wrap_socket(s, server_side=True))
    elif mode == "get":
        status, body = call(args[0])
        sys.stdout.write(body.decode(errors="replace"))
        if status != 200:
            print(f"status {status}")
            return 1
    elif mode == "echo-client":
        with socket.create_connection((args[0], int(args[1])), timeout=TIMEOUT) as s:
            return echo_check(s, int(args[2]))
    elif mode == "tls":
        host, port, name, cafile = args[0], int(args[1]), args[2], args[3]
        ctx = ssl.create_default_context(cafile=cafile)
        with socket.create_connection((host, port), timeout=TIMEOUT) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as s:
                print(f"tls {s.version()} with {name}, cert subject {s.getpeercert()['subject']}")
                return echo_check(s, 4096, concurrent=False)
    elif mode == "banner-client":
        start = time.monotonic()
        with socket.create_connection((args[0], int(args[1])), timeout=TIMEOUT) as s:
            f = s.makefile("rwb")
            banner = f.readline()
            f.write(b"QUIT\r\n")
            f.flush()
            bye = f.readline()
        took = time.monotonic() - start
        print(f"banner {banner!r} then {bye!r} in {took:.2f}s")
        return 0 if banner.startswith(b"220 ") and bye.startswith(b"221 ") else 1
    elif mode == "wait":
        deadline = time.monotonic() + float(args[2] if len(args) > 2 else 20)
        while time.monotonic() < deadline:
            try:
                socket.create_connection((args[0], int(args[1])), timeout=1).close()
                return 0
            except OSError:
                time.sleep(0.1)
        print(f"{args[0]}:{args[1]} did not accept connections")
        return 1
    else:
        print(f"unknown mode {mode}")
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except (OSError, ssl.SSLError) as e:
        print(f"{' '.join(sys.argv[1:3])}: {type(e).__name__}: {e}")
        sys.exit(1)
