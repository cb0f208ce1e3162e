// The smallest Node `http` server that reloads under reload-agent without
// losing a request (docs/recipes/node.md). Node's standard library only.
//
// - It serves on the sockets the agent passes (LISTEN_FDS: fd 3 and up)
//   instead of binding its own, so the old and the new process share one
//   queue of connections.
// - It says READY=1 once it serves (`systemd-notify`: Node has no Unix
//   datagram sockets), so the agent knows when this process is ready.
// - On SIGTERM it drains without closing a keep-alive connection under a
//   client; see drain().
'use strict';

const http = require('http');
const net = require('net');
const { execFileSync } = require('child_process');

// How long a draining process keeps answering (each answer with
// `Connection: close`) before it closes the connections still idle.
const DRAIN_GRACE_MS = 1000;

const version = process.env.RELOAD_SERVICE_VERSION || '';
let draining = false;

function handle(req, res) {
  if (draining) {
    // Node closes the connection after this response; the client learns
    // it before it sends anything more here.
    res.shouldKeepAlive = false;
  }
  res.setHeader('X-Version', version);
  res.end('ok\n');
}

function inheritedFds() {
  if (process.env.LISTEN_PID !== String(process.pid)) {
    throw new Error('no sockets passed: run under reload-agent (LISTEN_PID is not this process)');
  }
  const count = Number(process.env.LISTEN_FDS || 0);
  if (!(count >= 1)) throw new Error(`no sockets passed (LISTEN_FDS=${process.env.LISTEN_FDS})`);
  return Array.from({ length: count }, (_, i) => 3 + i);
}

// One http.Server per inherited socket (the last one is the agent's
// private health port when [service.health] private = true).
const servers = inheritedFds().map((fd) => http.createServer(handle));
let listening = 0;
servers.forEach((server, i) => {
  server.listen({ fd: 3 + i }, () => {
    listening += 1;
    if (listening === servers.length && process.env.NOTIFY_SOCKET) {
      execFileSync('systemd-notify', ['--ready', '--no-block']);
    }
  });
});

// server.close() alone closes idle keep-alive connections at once (Node
// 19 and later), and a client whose next request is already on its way
// gets a closed connection: about one failed request per connection per
// reload. So: stop accepting (the new process takes every new connection
// from the shared socket), answer every further request with
// `Connection: close` for DRAIN_GRACE_MS, then close what stayed idle.
function drain() {
  draining = true;
  for (const server of servers) net.Server.prototype.close.call(server);
  setTimeout(() => {
    for (const server of servers) server.close(); // and its idle connections
  }, DRAIN_GRACE_MS);
  // Requests still running after this are cut (the agent's drain timeout
  // is the backstop).
  setTimeout(() => process.exit(0), 20000).unref();
}

process.on('SIGTERM', drain);
