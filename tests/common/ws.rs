//! A real WebSocket client (tungstenite's) and the helpers that read from it
//! with deadlines.

use std::io;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::{Message, WebSocket};

use super::{PROMPT, READ_TICK, is_timeout};

pub type Ws = WebSocket<TcpStream>;

/// Connects to `/ws?token=<token>`.
pub fn ws_connect(port: u16, token: &str) -> Result<Ws, tungstenite::Error> {
    ws_connect_with(port, &format!("/ws?token={token}"), &[])
}

/// Connects to `path_and_query` with extra request headers (Authorization,
/// Cookie, Origin, ...). The returned socket has a short read timeout; the
/// `recv_*` helpers turn it into deadlines.
pub fn ws_connect_with(
    port: u16,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, tungstenite::Error> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(PROMPT))?;
    let mut request = format!("ws://127.0.0.1:{port}{path_and_query}").into_client_request()?;
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).expect("header name");
        let value = HeaderValue::from_str(v).expect("header value");
        request.headers_mut().append(name, value);
    }
    match tungstenite::client::client(request, stream) {
        Ok((ws, _response)) => {
            ws.get_ref().set_read_timeout(Some(READ_TICK))?;
            Ok(ws)
        }
        Err(HandshakeError::Failure(e)) => Err(e),
        Err(HandshakeError::Interrupted(_)) => {
            Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timed out").into())
        }
    }
}

/// The status and body of a refused upgrade.
#[track_caller]
pub fn refused(result: Result<Ws, tungstenite::Error>) -> (u16, String) {
    match result {
        Ok(_) => panic!("expected the upgrade to be refused, but it succeeded"),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned();
            (resp.status().as_u16(), body)
        }
        Err(e) => panic!("expected an HTTP error response, got {e}"),
    }
}

/// Connects with `token` and reads the `connected` message; returns the socket
/// and that message's payload.
#[track_caller]
pub fn ws_open(port: u16, token: &str) -> (Ws, Value) {
    let ws = ws_connect(port, token).unwrap_or_else(|e| panic!("WebSocket connect failed: {e}"));
    expect_connected(ws)
}

/// Reads the `connected` message of a fresh connection.
#[track_caller]
pub fn expect_connected(mut ws: Ws) -> (Ws, Value) {
    let msg = recv_json(&mut ws, PROMPT);
    assert_eq!(msg["type"], "connected", "first message: {msg}");
    let payload = msg["payload"].clone();
    (ws, payload)
}

/// The next frame of any kind (pings and pongs included); `None` on timeout.
/// Fails the test if the connection ends.
#[track_caller]
pub fn recv_message(ws: &mut Ws, timeout: Duration) -> Option<Message> {
    let deadline = Instant::now() + timeout;
    loop {
        match ws.read() {
            Ok(msg) => return Some(msg),
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                if Instant::now() >= deadline {
                    return None;
                }
            }
            Err(e) => panic!("WebSocket read failed: {e}"),
        }
    }
}

/// The next text message, skipping pings and pongs; fails on timeout or close.
#[track_caller]
pub fn recv_text(ws: &mut Ws, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match recv_message(ws, left) {
            None => panic!("no text message within {timeout:?}"),
            Some(Message::Text(t)) => return t.as_str().to_string(),
            Some(Message::Ping(_) | Message::Pong(_)) => continue,
            Some(Message::Close(frame)) => panic!("expected a text message, got close {frame:?}"),
            Some(other) => panic!("expected a text message, got {other:?}"),
        }
    }
}

#[track_caller]
pub fn recv_json(ws: &mut Ws, timeout: Duration) -> Value {
    let text = recv_text(ws, timeout);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("message is not JSON ({e}): {text:?}"))
}

/// Reads until the server's close frame (skipping other messages) and sends
/// the close reply; returns its code and reason.
#[track_caller]
pub fn expect_close(ws: &mut Ws, timeout: Duration) -> (u16, String) {
    match close_or_gone(ws, timeout) {
        Some(close) => close,
        None => panic!("connection ended without a close frame"),
    }
}

/// Like [`expect_close`] but returns `None` if the connection ended without a
/// close frame (EOF or reset). Fails on timeout.
#[track_caller]
pub fn close_or_gone(ws: &mut Ws, timeout: Duration) -> Option<(u16, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => {
                // Sends our close reply; the server may already be gone.
                let _ = ws.flush();
                return Some(match frame {
                    Some(f) => (u16::from(f.code), f.reason.as_str().to_string()),
                    None => (1005, String::new()),
                });
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            panic!("no close within {timeout:?}");
        }
    }
}

/// Closes from the client side (no code) and reads until the server's reply
/// or the end of the connection.
#[track_caller]
pub fn close_ws(ws: &mut Ws) {
    ws.close(None).expect("send close");
    // A server that dropped the connection instead of replying is fine here.
    let _ = close_or_gone(ws, PROMPT);
}

/// Asserts that no text or binary message arrives for `duration` (pings and
/// pongs are ignored). Use only where the absence is the point.
#[track_caller]
pub fn expect_no_message(ws: &mut Ws, duration: Duration) {
    let deadline = Instant::now() + duration;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        match recv_message(ws, left) {
            None => return,
            Some(Message::Ping(_) | Message::Pong(_)) => {}
            Some(other) => panic!("expected no message, got {other:?}"),
        }
    }
}

#[track_caller]
pub fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_string()))
        .expect("send text frame");
}
