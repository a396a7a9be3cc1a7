// A ws-notify client built on the npm "ws" package, driven by
// tests/real_clients.rs. Prints one JSON object per line on stdout:
//   {"event":"open","extensions":..,"offered":..,"response_extensions":..}
//   {"event":"message","data":<the server's JSON message>}
//   {"event":"close","code":..,"reason":..}
// and exits 0 after the close (1 on an error before it).
//
// Usage: node client.js <ws-url> <token> [deflate]
//   deflate: offer permessage-deflate (ws's own default) instead of nothing.
"use strict";

const WebSocket = require("ws");

const [url, token, mode] = process.argv.slice(2);
if (!url || !token) {
  console.error("usage: node client.js <ws-url> <token> [deflate]");
  process.exit(2);
}

const print = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

let offered = null;
const ws = new WebSocket(url, {
  headers: { Authorization: `Bearer ${token}` },
  perMessageDeflate: mode === "deflate",
  handshakeTimeout: 5000,
  // ws's documented hook on the upgrade request: record what it offers.
  finishRequest: (request) => {
    offered = request.getHeader("sec-websocket-extensions") ?? null;
    request.end();
  },
});

let upgradeHeaders = null;
ws.on("upgrade", (response) => {
  upgradeHeaders = response.headers;
});

ws.on("open", () => {
  print({
    event: "open",
    extensions: ws.extensions,
    offered,
    response_extensions: upgradeHeaders["sec-websocket-extensions"] ?? null,
  });
});

ws.on("message", (data, isBinary) => {
  if (isBinary) {
    print({ event: "binary", length: data.length });
    return;
  }
  print({ event: "message", data: JSON.parse(data.toString("utf8")) });
});

ws.on("close", (code, reason) => {
  print({ event: "close", code, reason: reason.toString("utf8") });
  process.exit(0);
});

ws.on("error", (err) => {
  console.error(`ws error: ${err.message}`);
  print({ event: "error", message: err.message });
  process.exit(1);
});
