// ws-notify browser client: reconnects with exponential backoff and full
// jitter, resumes from the last message id it saw (?since=), refreshes its
// token in place when the server says it is about to expire, notices a
// silently dead socket (no pong), reconnects at once when the browser comes
// back online or the tab becomes visible, and gives up after repeated
// refused upgrades.
function connectNotifications({
  url, getToken, onMessage, onGap, onClose, onGiveUp,
  minDelayMs = 500, maxDelayMs = 30000,
  pingEvery = 25000, pongWait = 10000, maxFailures = 10,
}) {
  let socket = null;
  let attempt = 0;
  let timer = null; // the backoff before the next connect
  let stopped = false; // close() was called
  let gaveUp = false; // maxFailures refused upgrades in a row: wait for reconnect()
  let failures = 0; // connections in a row that closed without ever opening
  let lastId = null; // newest message id seen: the next connection resumes after it
  let token = null; // the token in use

  // Message ids are Redis stream ids "<ms>-<seq>": compare them as numbers.
  function isNewer(id, than) {
    const [a, b] = [id, than].map((s) => s.split("-").map(BigInt));
    return a[0] > b[0] || (a[0] === b[0] && a[1] > b[1]);
  }

  function retry() {
    if (stopped) return;
    // A refused upgrade (bad token, origin, full server) is only a 1006
    // before open to a browser: after maxFailures in a row, stop and ask the app.
    if (failures >= maxFailures) {
      gaveUp = true;
      if (onGiveUp) onGiveUp();
      return;
    }
    const cap = Math.min(maxDelayMs, minDelayMs * 2 ** attempt);
    attempt += 1;
    timer = setTimeout(connect, Math.random() * cap); // full jitter: 0..cap
  }

  // Waiting in a backoff: connect now (the network or the user is back).
  function wake() {
    if (timer === null) return;
    clearTimeout(timer);
    connect();
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
    let opened = false;
    let pinger = null;
    let deadline = null; // set by a ping, cleared by any message
    // Browsers cannot see ping frames: ask for a pong message instead. If
    // nothing comes back, the socket is dead (a laptop waking, a Wi-Fi
    // switch) and may take minutes to close by itself: drop it now.
    const ping = () => {
      ws.send('{"type":"ping"}');
      if (deadline === null) deadline = setTimeout(() => closed({ code: 1006, reason: "no pong", wasClean: false }), pongWait);
    };
    const closed = (event) => {
      clearInterval(pinger);
      clearTimeout(deadline);
      ws.onclose = ws.onmessage = null;
      if (ws.readyState !== WebSocket.CLOSED) ws.close();
      socket = null;
      if (!opened && navigator.onLine) failures += 1; // offline: not the server's refusal
      if (onClose) onClose(event);
      if (stopped) return;
      // 4001: the token expired while connected. Stop using it: get a new
      // one and reconnect now. Anything else (1001 restart, network loss,
      // a refused upgrade, which browsers report as 1006): back off.
      if (event.code === 4001) connect();
      else retry();
    };
    ws.onopen = () => {
      opened = true;
      failures = 0;
      pinger = setInterval(ping, pingEvery);
    };
    ws.onmessage = (event) => {
      clearTimeout(deadline);
      deadline = null;
      const message = JSON.parse(event.data);
      if (message.type === "pong") return; // only a sign of life
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
    ws.onclose = closed;
  }

  const onVisible = () => {
    if (document.visibilityState === "visible") wake();
  };
  addEventListener("online", wake);
  document.addEventListener("visibilitychange", onVisible);
  connect();
  return {
    send(data) {
      if (socket && socket.readyState === WebSocket.OPEN) socket.send(data);
    },
    // Connect now: after onGiveUp (e.g. once the user has signed in again),
    // or to skip a backoff.
    reconnect() {
      failures = 0;
      if (gaveUp && !stopped) {
        gaveUp = false;
        connect();
      } else wake();
    },
    close() {
      stopped = true;
      clearTimeout(timer);
      removeEventListener("online", wake);
      document.removeEventListener("visibilitychange", onVisible);
      if (socket) socket.close(1000, "bye");
    },
  };
}
