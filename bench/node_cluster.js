// Baseline for bench/ipc.py: Node.js `cluster` IPC between one worker and the primary.
//
//   node bench/node_cluster.js [oneway_n] [rtt_n]
//
// The worker first measures request/reply round trips (process.send a ping, wait
// for the primary's pong), then one-way throughput: it sends oneway_n messages,
// then a "done" marker; the primary answers with its count, and the worker's clock
// stops when that answer arrives (the same method as bench/ipc_app.py's /oneway).
// The primary prints one JSON line on stdout and exits. Everything is bounded: a
// 60 s watchdog in the primary kills the worker and exits 2.
'use strict';

const cluster = require('node:cluster');

const ONEWAY_N = parseInt(process.argv[2] || '300000', 10);
const RTT_N = parseInt(process.argv[3] || '20000', 10);
const WATCHDOG_MS = 60000;

if (cluster.isPrimary) {
  const worker = cluster.fork();
  let count = 0;
  let result = null;
  const watchdog = setTimeout(() => {
    process.stderr.write(`node_cluster: no result after ${WATCHDOG_MS} ms\n`);
    worker.process.kill('SIGKILL');
    process.exit(2);
  }, WATCHDOG_MS);
  worker.on('message', (m) => {
    switch (m.t) {
      case 'ping':
        worker.send({ t: 'pong', id: m.id, p: m.p });
        break;
      case 'c':
        count++;
        break;
      case 'reset':
        count = 0;
        worker.send({ t: 'reset_ok' });
        break;
      case 'done':
        worker.send({ t: 'total', n: count });
        break;
      case 'result':
        // Printed once the worker is reaped, so its CPU time is accounted to us.
        result = m.result;
        worker.process.kill('SIGKILL');
        break;
      default:
        break;
    }
  });
  worker.on('exit', (code, signal) => {
    clearTimeout(watchdog);
    if (result === null) {
      process.stderr.write(`node_cluster: worker exited early (${code}, ${signal})\n`);
      process.exit(3);
    }
    process.stdout.write(JSON.stringify({ node_version: process.version, ...result }) + '\n');
    process.exit(0);
  });
} else {
  // Worker.
  const next = (type) => new Promise((resolve) => {
    const on = (m) => {
      if (m.t === type) {
        process.off('message', on);
        resolve(m);
      }
    };
    process.on('message', on);
  });

  const rtt = (n) => new Promise((resolve) => {
    const lat = new Array(n);
    let i = 0;
    let t0 = 0n;
    const on = (m) => {
      if (m.t !== 'pong') return;
      lat[i] = Number(process.hrtime.bigint() - t0);
      i++;
      if (i < n) {
        t0 = process.hrtime.bigint();
        process.send({ t: 'ping', id: i, p: i });
      } else {
        process.off('message', on);
        resolve(lat);
      }
    };
    process.on('message', on);
    t0 = process.hrtime.bigint();
    process.send({ t: 'ping', id: 0, p: 0 });
  });

  (async () => {
    const result = {};
    if (RTT_N > 0) {
      await rtt(Math.min(Math.floor(RTT_N / 10), 2000) || 1); // warm up
      const lat = await rtt(RTT_N);
      lat.sort((a, b) => a - b);
      result.rtt_p50_us = lat[Math.floor(RTT_N / 2)] / 1000;
      result.rtt_p99_us = lat[Math.floor(RTT_N * 0.99)] / 1000;
      result.rtt_n = RTT_N;
    }
    if (ONEWAY_N > 0) {
      const reset = next('reset_ok');
      process.send({ t: 'reset' });
      await reset;
      const total = next('total');
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < ONEWAY_N; i++) {
        process.send({ t: 'c', p: i });
      }
      process.send({ t: 'done' });
      const got = await total;
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
      if (got.n !== ONEWAY_N) {
        throw new Error(`primary counted ${got.n} messages, sent ${ONEWAY_N}`);
      }
      result.oneway_msgs_per_s = ONEWAY_N / seconds;
      result.oneway_n = ONEWAY_N;
      result.oneway_seconds = seconds;
    }
    process.send({ t: 'result', result });
  })().catch((err) => {
    process.stderr.write(`node_cluster worker: ${err.stack || err}\n`);
    process.exit(1);
  });
}
