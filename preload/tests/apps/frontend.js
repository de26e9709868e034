// A header-blind Node.js frontend: each inbound GET /req/<id> makes two outbound calls,
// GET /call/<id>/<n>, through a keep-alive agent, and forwards no headers.
// usage: node frontend.js BACKEND_PORT [sockets|timer]
//   sockets: each continuation follows a socket read (what libc alone can follow);
//   timer:   awaits a short timer before each call (needs a runtime hook, not done yet).
const http = require('http');

const backend = Number(process.argv[2]);
const mode = process.argv[3] || 'sockets';
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

function call(id, n) {
  return new Promise((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port: backend, path: `/call/${id}/${n}`, agent }, (r) => {
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
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
