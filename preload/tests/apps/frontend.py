"""A header-blind frontend: each inbound GET /req/<id> makes two outbound calls,
GET /call/<id>/<n>, to the backend, with small random pauses, and forwards no headers.

usage: frontend.py threaded|forking|keepalive BACKEND_PORT
Prints the port it listens on, then serves until killed.
"""
import http.client
import random
import socketserver
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer

MODE = sys.argv[1]
BACKEND = int(sys.argv[2])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        rid = self.path.rsplit("/", 1)[-1]
        conn = None
        for n in range(2):
            time.sleep(random.random() * 0.004)
            if conn is None or MODE != "keepalive":
                conn = http.client.HTTPConnection("127.0.0.1", BACKEND, timeout=10)
            conn.request("GET", f"/call/{rid}/{n}")
            resp = conn.getresponse()
            resp.read()
            if MODE != "keepalive":
                conn.close()
        conn.close()
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


class Forking(socketserver.ForkingMixIn, HTTPServer):
    pass


server_class = Forking if MODE == "forking" else ThreadingHTTPServer
server_class.daemon_threads = True
srv = server_class(("127.0.0.1", 0), Handler)
print(srv.server_address[1], flush=True)
srv.serve_forever()
