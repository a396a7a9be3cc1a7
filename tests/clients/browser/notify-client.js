// ws-notify browser client: reconnects with exponential backoff and full
// jitter; on close 4001 (token expired) it fetches a fresh token first.
function connectNotifications({ url, getToken, onMessage, onClose, minDelayMs = 500, maxDelayMs = 30000 }) {
  let socket = null;
  let attempt = 0;
  let timer = null;
  let stopped = false;

  function retry() {
    if (stopped) return;
    const cap = Math.min(maxDelayMs, minDelayMs * 2 ** attempt);
    attempt += 1;
    timer = setTimeout(connect, Math.random() * cap); // full jitter: 0..cap
  }

  async function connect() {
    timer = null;
    let token;
    try {
      token = await getToken(); // from your backend, on every (re)connect
    } catch (err) {
      return retry();
    }
    if (stopped) return;
    socket = new WebSocket(`${url}?token=${encodeURIComponent(token)}`);
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.type === "connected") attempt = 0; // authenticated: reset the backoff
      onMessage(message);
    };
    socket.onclose = (event) => {
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
