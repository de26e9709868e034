"""A header-blind frontend: each inbound GET /req/<id> makes two outbound calls,
GET /call/<id>/<n>, to the backend, with small random pauses, and forwards no headers.

usage: frontend.py threaded|forking|keepalive|asyncio BACKEND_PORT
Prints the port it listens on, then serves until killed. (asyncio: an event loop whose
continuations run in a later loop iteration than the read that resumed them; no pauses.)
"""
import asyncio
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


async def call(rid, n):
    reader, writer = await asyncio.open_connection("127.0.0.1", BACKEND)
    writer.write(f"GET /call/{rid}/{n} HTTP/1.1\r\nHost: backend\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    writer.close()


async def handle(reader, writer):
    while True:
        line = await reader.readline()
        if not line:
            break
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        rid = line.split()[1].decode().rsplit("/", 1)[-1]
        for n in range(2):
            await call(rid, n)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
    writer.close()


async def serve_asyncio():
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await srv.serve_forever()


if MODE == "asyncio":
    asyncio.run(serve_asyncio())
    sys.exit(0)


server_class = Forking if MODE == "forking" else ThreadingHTTPServer
server_class.daemon_threads = True
# The default backlog of 5 resets connections when many clients connect at once.
server_class.request_queue_size = 128
srv = server_class(("127.0.0.1", 0), Handler)
print(srv.server_address[1], flush=True)
srv.serve_forever()
