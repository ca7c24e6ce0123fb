// Baseline for bench/spread.py: Node.js `cluster` with its default round-robin
// scheduling (SCHED_RR on Linux), 4 workers, the same handler shape as
// bench/spread_app.py: burn a fixed CPU time, answer with the worker's pid.
//
//   node bench/node_spread.js PORT [workers] [burn_ms]
//
// The primary prints "ready" on stdout once every worker listens. A watchdog ends
// everything after 15 minutes.
'use strict';

const cluster = require('node:cluster');
const http = require('node:http');

const PORT = parseInt(process.argv[2], 10);
const WORKERS = parseInt(process.argv[3] || '4', 10);
const BURN_MS = parseFloat(process.argv[4] || '2');

function cpuMs() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
}

if (cluster.isPrimary) {
  cluster.schedulingPolicy = cluster.SCHED_RR;
  let listening = 0;
  for (let i = 0; i < WORKERS; i++) cluster.fork();
  cluster.on('listening', () => {
    listening++;
    if (listening === WORKERS) process.stdout.write('ready\n');
  });
  setTimeout(() => process.exit(2), 15 * 60 * 1000).unref();
  process.on('SIGTERM', () => {
    for (const id in cluster.workers) cluster.workers[id].kill('SIGTERM');
    process.exit(0);
  });
} else {
  const body = String(process.pid);
  const server = http.createServer((req, res) => {
    const end = cpuMs() + BURN_MS;
    while (cpuMs() < end) { /* burn */ }
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': body.length });
    res.end(body);
  });
  server.keepAliveTimeout = 5000;
  server.listen(PORT, '127.0.0.1');
}
