// tracecar's Node.js runtime hook, loaded with NODE_OPTIONS="--require /path/tracecar.js"
// next to libtracecar_preload.so. The library follows causality through socket reads; a
// continuation that no socket read precedes (a timer, a promise settled elsewhere) needs the
// runtime to say whose work it is. This module keeps the inbound request's connection (its
// peer port, what the library publishes) in an AsyncLocalStorage and, before each callback,
// stores it in a cell the library reads: 8 bytes, "TRCR" then the port (u32 little-endian),
// registered once by writing the cell itself to an fd no process has open (the library answers
// that write without the kernel and keeps the cell's address). Telling is then a plain memory
// write, no call at all. Without the library that write fails (EBADF) and the module does
// nothing more. It never changes what the app sees: no headers, no return values, no
// exceptions. The cell must live as long as the thread: it is never released.
'use strict';

const asyncHooks = require('async_hooks');
const fs = require('fs');
const http = require('http');

const FD = 0x7ffffffe;
// An explicit ArrayBuffer: its memory lives outside the V8 heap, so the garbage collector
// never moves it (a small Buffer.alloc may start on the heap); 8-aligned.
const cell = Buffer.from(new ArrayBuffer(8));
cell.write('TRCR', 0, 'latin1');

function registered() {
  try {
    return fs.writeSync(FD, cell, 0, 8) === 8;
  } catch (_) {
    return false; // no library (or no table) in this process
  }
}

if (registered()) {
  globalThis.__tracecarCell = cell; // kept for the life of the thread
  const store = new asyncHooks.AsyncLocalStorage();

  // Before each callback: the request its resource was made for, or none (0). A socket made
  // outside any request (an inbound connection) gets 0 here; its request's own context is
  // stored when the request is emitted, below.
  asyncHooks
    .createHook({
      before() {
        cell.writeUInt32LE(store.getStore() ?? 0, 4);
      },
    })
    .enable();

  // Each inbound request runs in its connection's context.
  const emit = http.Server.prototype.emit;
  http.Server.prototype.emit = function (event, req, res) {
    if (event === 'request' && req && req.socket && req.socket.remotePort) {
      const port = req.socket.remotePort;
      return store.run(port, () => {
        cell.writeUInt32LE(port, 4);
        return emit.apply(this, arguments);
      });
    }
    return emit.apply(this, arguments);
  };
}
