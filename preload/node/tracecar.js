// tracecar's Node.js runtime hook, loaded with NODE_OPTIONS="--require /path/tracecar.js"
// next to libtracecar_preload.so. The library follows causality through socket reads; a
// continuation that no socket read precedes (a timer, a promise settled elsewhere) needs the
// runtime to say whose work it is. This module keeps the inbound request's connection (its
// peer port, what the library publishes) in an AsyncLocalStorage and, before each callback
// that has one, tells the library: an 8-byte write ("TRCC" + port, u32 little-endian) to an fd
// no process has open, which the library answers itself, without the kernel. Without the
// library that write fails (EBADF) and the module turns itself off. It never changes what the
// app sees: no headers, no return values, no exceptions.
'use strict';

const asyncHooks = require('async_hooks');
const fs = require('fs');
const http = require('http');

const FD = 0x7ffffffe;
const store = new asyncHooks.AsyncLocalStorage();
const msg = Buffer.from('TRCC\0\0\0\0', 'latin1');
let enabled = true;

// Told before every callback, not only on a change: the library also moves the thread's cause
// by itself (socket reads, event-loop waits), so what it holds is not what was last told.
function tell(port) {
  if (!enabled) return;
  msg.writeUInt32LE(port, 4);
  try {
    fs.writeSync(FD, msg, 0, 8);
  } catch (_) {
    enabled = false; // no library in this process
    hook.disable();
  }
}

// Before each callback: the request its resource was made for, or none (0). A socket made
// outside any request (an inbound connection) gets 0 here; its request's own context is told
// when the request is emitted, below.
const hook = asyncHooks.createHook({
  before() {
    tell(store.getStore() ?? 0);
  },
});

// Each inbound request runs in its connection's context.
const emit = http.Server.prototype.emit;
http.Server.prototype.emit = function (event, req, res) {
  if (event === 'request' && req && req.socket && req.socket.remotePort) {
    const port = req.socket.remotePort;
    return store.run(port, () => {
      tell(port);
      return emit.apply(this, arguments);
    });
  }
  return emit.apply(this, arguments);
};

hook.enable();
