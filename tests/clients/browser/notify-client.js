// ws-notify browser client: reconnects with exponential backoff and full
// jitter, resumes from the last message id it saw (?since=), and refreshes
// its token in place when the server says it is about to expire.
function connectNotifications({ url, getToken, onMessage, onGap, onClose, minDelayMs = 500, maxDelayMs = 30000 }) {
  let socket = null;
  let attempt = 0;
  let timer = null;
  let stopped = false;
  let lastId = null; // newest message id seen: the next connection resumes after it
  let token = null; // the token in use

  // Message ids are Redis stream ids "<ms>-<seq>": compare them as numbers.
  function isNewer(id, than) {
    const [a, b] = [id, than].map((s) => s.split("-").map(BigInt));
    return a[0] > b[0] || (a[0] === b[0] && a[1] > b[1]);
  }

  function retry() {
    if (stopped) return;
    const cap = Math.min(maxDelayMs, minDelayMs * 2 ** attempt);
    attempt += 1;
    timer = setTimeout(connect, Math.random() * cap); // full jitter: 0..cap
  }

  async function refreshToken(ws) {
    try {
      const fresh = await getToken();
      // The same token again would only be warned about again: keep it, and
      // at its expiry the server closes with 4001 and we reconnect.
      if (fresh === token || ws.readyState !== WebSocket.OPEN) return;
      token = fresh;
      ws.send(JSON.stringify({ type: "refresh", token }));
    } catch (err) {
      // No new token now: the same as above.
    }
  }

  async function connect() {
    timer = null;
    try {
      token = await getToken(); // from your backend, on every (re)connect: the newest token
    } catch (err) {
      return retry();
    }
    if (stopped) return;
    const query = `token=${encodeURIComponent(token)}` + (lastId ? `&since=${lastId}` : "");
    const ws = new WebSocket(url + (url.includes("?") ? "&" : "?") + query);
    socket = ws;
    ws.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (/^\d+-\d+$/.test(message.id)) { // a stream id (history on; plain PUBLISH has none)
        if (lastId && !isNewer(message.id, lastId)) return; // had it already
        lastId = message.id;
      } else if (message.type === "connected") {
        attempt = 0; // authenticated: reset the backoff
        const { position, recovery } = message.payload;
        if (!lastId && position) lastId = position; // no message yet: resume from here
        if (recovery && !recovery.complete && onGap) onGap(); // some may be lost
      } else if (message.type === "token_expiring") {
        refreshToken(ws);
      }
      onMessage(message);
    };
    ws.onclose = (event) => {
      socket = null;
      if (onClose) onClose(event);
      if (stopped) return;
      // 4001: the token expired while connected. Stop using it: get a new
      // one and reconnect now. Anything else (1001 restart, network loss,
      // a refused upgrade, which browsers report as 1006): back off.
      if (event.code === 4001) connect();
      else retry();
    };
  }

  connect();
  return {
    send(data) {
      if (socket && socket.readyState === WebSocket.OPEN) socket.send(data);
    },
    close() {
      stopped = true;
      clearTimeout(timer);
      if (socket) socket.close(1000, "bye");
    },
  };
}
