// A Node.js WebSocket echo server on the `ws` package (bench/node/package.json pins its
// version; `npm ci --prefix bench/node` installs it): every message is sent back as it came.
//
//   node bench/peers/ws_echo.js PORT [HOST]
'use strict';
const path = require('path');
const { createRequire } = require('module');

const requireNode = createRequire(path.join(__dirname, '..', 'node', 'package.json'));
const { WebSocketServer } = requireNode('ws');

const port = Number(process.argv[2]);
const host = process.argv[3] || '127.0.0.1';

const wss = new WebSocketServer({ port, host, backlog: 4096, perMessageDeflate: false, clientTracking: false });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on('error', () => ws.terminate());
});
process.on('SIGTERM', () => process.exit(0));
