// A header-blind Node.js frontend: each inbound GET /req/<id> makes two outbound calls,
// GET /call/<id>/<n>, through a keep-alive agent, and forwards no headers.
// usage: node frontend.js BACKEND_PORT [sockets|timer] [PROXY_PORT LISTEN_PORT]
//   sockets: each continuation follows a socket read (what libc alone can follow);
//   timer:   awaits a short timer before each call (needs the runtime hook);
//   PROXY_PORT: calls go through the forward proxy at 127.0.0.1:PROXY_PORT (absolute-form
//   targets, as an app configured with a proxy sends them), and the app listens on LISTEN_PORT.
const http = require('http');

const backend = Number(process.argv[2]);
const mode = process.argv[3] || 'sockets';
const proxy = Number(process.argv[4] || 0);
const listen = Number(process.argv[5] || 0);
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

function call(id, n) {
  const path = `/call/${id}/${n}`;
  const target = proxy
    ? { host: '127.0.0.1', port: proxy, path: `http://127.0.0.1:${backend}${path}`,
        headers: { host: `127.0.0.1:${backend}` } }
    : { host: '127.0.0.1', port: backend, path };
  return new Promise((resolve, reject) => {
    http
      .get({ ...target, agent }, (r) => {
        r.resume();
        r.on('end', resolve);
      })
      .on('error', reject);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const server = http.createServer(async (req, res) => {
  const id = req.url.split('/').pop();
  for (let n = 0; n < 2; n++) {
    if (mode === 'timer') await sleep(Math.random() * 4);
    await call(id, n);
  }
  res.writeHead(200, { 'Content-Length': 2 });
  res.end('ok');
});
server.keepAliveTimeout = 30000;
server.listen(listen, '127.0.0.1', () => console.log(server.address().port));
