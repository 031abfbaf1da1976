// A bare Node.js TCP echo server (the `net` module): every chunk is written back as it came.
// Also the idle-connection memory baseline for Node.
//
//   node bench/peers/net_echo.js PORT [HOST]
'use strict';
const net = require('net');

const port = Number(process.argv[2]);
const host = process.argv[3] || '127.0.0.1';

const server = net.createServer({ noDelay: true }, (socket) => {
  socket.on('data', (data) => socket.write(data));
  socket.on('error', () => socket.destroy());
});
server.maxConnections = 1 << 30;
server.listen({ port, host, backlog: 4096 });
process.on('SIGTERM', () => process.exit(0));
