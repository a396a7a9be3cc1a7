//! `ws-notify listen`: a debugging WebSocket client. Connects with
//! tungstenite's blocking client over a plain `TcpStream` (`ws://` only),
//! answers pings, prints every message as one JSON line on stdout, and
//! reports the close on stderr. Ctrl-C (SIGINT) or SIGTERM ends the session
//! with a normal close (1000) and exit 0; a second one exits at once.

use std::io::{self, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::http::HeaderValue;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

use super::{Arg, EXIT_FAILURE, ParseStop, Parser, env_var, local_gateway};

pub const USAGE: &str = "\
Usage: ws-notify listen [--url <ws-url>] [--token <jwt>]

Connects to the gateway, prints every message it receives as one JSON line on
stdout (pings are answered), and when the connection ends prints the close
code and reason on stderr.

  --url <ws-url>    default ws://127.0.0.1:<WS_PORT>/ws (ws:// only; no TLS)
  --token <jwt>     sent as 'Authorization: Bearer <jwt>'; default $WS_TOKEN.
                    Not needed if the URL carries ?token=...

Ctrl-C (or SIGTERM) closes the connection normally (close code 1000) and exits
0; a second Ctrl-C exits at once with 1.

Exit codes: 0 after a normal close (1000) or Ctrl-C, 1 after any other close, a
lost connection or a refused upgrade, 2 a bad argument.";

/// How long connecting and the opening handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a blocked read looks whether Ctrl-C was pressed, in case the
/// signal arrives just before the read starts (a read it interrupts returns
/// at once).
const INTERRUPT_CHECK: Duration = Duration::from_millis(100);

/// How long to wait for the server's close reply after Ctrl-C.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(5);

/// The parsed `listen` arguments (the token already taken from `WS_TOKEN`
/// if not given).
#[derive(Clone, PartialEq, Eq)]
pub struct ListenArgs {
    pub url: String,
    pub token: Option<String>,
}

impl std::fmt::Debug for ListenArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenArgs")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

pub fn parse(parser: &mut Parser) -> Result<ListenArgs, ParseStop> {
    let mut url = None;
    let mut token = None;
    while let Some(arg) = parser.next_arg()? {
        match arg {
            Arg::Option(name, inline) => match name.as_str() {
                "url" => url = Some(parser.value("url", inline)?),
                "token" => token = Some(parser.value("token", inline)?),
                _ => return Err(parser.unknown_option(&name)),
            },
            Arg::Positional(arg) => return Err(parser.unexpected(&arg)),
        }
    }
    let url = match url {
        Some(url) => url,
        None => {
            let (host, port) = local_gateway().map_err(ParseStop::Usage)?;
            format!("ws://{host}:{port}/ws")
        }
    };
    if url.starts_with("wss://") {
        return Err(ParseStop::Usage(
            "wss:// is not supported (this client has no TLS); connect to the gateway's ws:// port"
                .to_string(),
        ));
    }
    if !url.starts_with("ws://") {
        return Err(ParseStop::Usage(format!(
            "--url {url:?} is not a ws:// URL"
        )));
    }
    let token = token
        .filter(|t| !t.is_empty())
        .or_else(|| env_var("WS_TOKEN"));
    if token.is_none() && !url_has_token(&url) {
        return Err(ParseStop::Usage(
            "no token: pass --token <jwt>, set WS_TOKEN, or put ?token= in the URL".to_string(),
        ));
    }
    Ok(ListenArgs { url, token })
}

/// Whether the URL's query has a `token` parameter.
fn url_has_token(url: &str) -> bool {
    url.split_once('?').is_some_and(|(_, query)| {
        query
            .split('&')
            .any(|pair| pair == "token" || pair.starts_with("token="))
    })
}

/// How the session ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// A close handshake, with the peer's code and reason (1005 if none).
    Closed(u16, String),
    /// The connection dropped without a close frame, or failed.
    Lost(String),
    /// Ctrl-C: our close (1000) was sent; `reply` tells how the session ended.
    Interrupted { reply: String },
}

pub fn run(args: &ListenArgs) -> ExitCode {
    let interrupted = match on_interrupt() {
        Ok(flag) => flag,
        Err(e) => {
            eprintln!("ws-notify listen: cannot handle Ctrl-C: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let mut ws = match connect(args) {
        Ok(ws) => ws,
        Err(e) => {
            eprintln!("ws-notify listen: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let end = read_loop(&mut ws, &mut out, &interrupted);
    match end {
        End::Closed(code, reason) => {
            eprintln!("ws-notify listen: closed: {code} {reason}");
            if code == u16::from(CloseCode::Normal) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        End::Lost(why) => {
            eprintln!("ws-notify listen: connection lost: {why}");
            ExitCode::from(EXIT_FAILURE)
        }
        End::Interrupted { reply } => {
            eprintln!("ws-notify listen: interrupted: sent close 1000; {reply}");
            ExitCode::SUCCESS
        }
    }
}

/// A flag that SIGINT and SIGTERM set; a second signal, once it is set, exits
/// the process at once with [`EXIT_FAILURE`].
fn on_interrupt() -> io::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // Registered first, so it sees the flag as it was before this signal.
        signal_hook::flag::register_conditional_shutdown(
            signal,
            i32::from(EXIT_FAILURE),
            flag.clone(),
        )?;
        signal_hook::flag::register(signal, flag.clone())?;
    }
    Ok(flag)
}

/// Opens the TCP connection and does the opening handshake.
fn connect(args: &ListenArgs) -> Result<WebSocket<TcpStream>, String> {
    let mut request = args
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad URL {:?}: {e}", args.url))?;
    if let Some(token) = &args.token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "the token contains characters not allowed in a header".to_string())?;
        request.headers_mut().insert("Authorization", value);
    }
    let uri = request.uri();
    let host = uri.host().ok_or("the URL has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let stream = connect_tcp(host, port)?;
    stream
        .set_read_timeout(Some(CONNECT_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CONNECT_TIMEOUT)))
        .and_then(|()| stream.set_nodelay(true))
        .map_err(|e| format!("socket setup: {e}"))?;
    let (ws, _response) = match tungstenite::client::client(request, stream) {
        Ok(done) => done,
        Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            return Err(format!(
                "upgrade refused: HTTP {} {}",
                response.status().as_u16(),
                body.trim()
            ));
        }
        Err(HandshakeError::Failure(e)) => return Err(format!("handshake failed: {e}")),
        Err(HandshakeError::Interrupted(_)) => {
            return Err(format!(
                "no handshake answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            ));
        }
    };
    // From here on reads wait for the server (it pings every WS_PING_INTERVAL,
    // so a dead connection is still noticed), looking at the Ctrl-C flag
    // between short timeouts.
    ws.get_ref()
        .set_read_timeout(Some(INTERRUPT_CHECK))
        .map_err(|e| format!("socket setup: {e}"))?;
    Ok(ws)
}

fn connect_tcp(host: &str, port: u16) -> Result<TcpStream, String> {
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    let mut last = format!("{host} has no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    Err(last)
}

/// Reads until the connection ends, printing each data message as a line.
/// Once `interrupted` is set, sends a normal close and waits (at most
/// [`CLOSE_REPLY_WAIT`]) for the server's reply.
fn read_loop<S: io::Read + io::Write>(
    ws: &mut WebSocket<S>,
    out: &mut impl Write,
    interrupted: &AtomicBool,
) -> End {
    let mut close: Option<(u16, String)> = None;
    // Set once our close frame is out: the deadline for the server's reply.
    let mut closing_until: Option<Instant> = None;
    loop {
        if closing_until.is_none() && interrupted.load(Ordering::Relaxed) {
            let normal = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            // Fails only if the connection is already closing or gone; the
            // read below then reports how it ended.
            let _ = ws.close(Some(normal));
            closing_until = Some(Instant::now() + CLOSE_REPLY_WAIT);
        }
        let ended = |close: Option<(u16, String)>, why: String| match (closing_until, close) {
            (Some(_), Some((code, reason))) => End::Interrupted {
                reply: format!("closed: {code} {reason}"),
            },
            (Some(_), None) => End::Interrupted { reply: why },
            (None, Some((code, reason))) => End::Closed(code, reason),
            (None, None) => End::Lost(why),
        };
        let message = match ws.read() {
            Ok(message) => message,
            // A read timeout, or the signal itself (a socket read with a
            // timeout is not restarted after a handler: signal(7)); nothing
            // was consumed, so the next read resumes where this one stopped.
            Err(tungstenite::Error::Io(e)) if is_retry(&e) => {
                if closing_until.is_some_and(|until| Instant::now() >= until) {
                    return ended(close, "no close reply from the server".to_string());
                }
                continue;
            }
            // After the close handshake completed (tungstenite replied to the
            // server's close frame, or the server answered ours).
            Err(tungstenite::Error::ConnectionClosed) => {
                return ended(close, "closed".to_string());
            }
            // The server may drop the TCP connection right after its close
            // frame; the close was still received.
            Err(e) => return ended(close, e.to_string()),
        };
        let line = match message {
            Message::Text(text) => json_line(text.as_str()),
            Message::Binary(bytes) => {
                format!("{{\"binary_hex\":\"{}\"}}", hex(&bytes))
            }
            Message::Close(frame) => {
                close = Some(close_parts(frame));
                continue;
            }
            // tungstenite queued the pong; the next read (or this flush) sends it.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                match ws.flush() {
                    // What is not written yet stays queued for the next read.
                    Err(tungstenite::Error::Io(e)) if is_retry(&e) => {}
                    Err(e) => return ended(close, e.to_string()),
                    Ok(()) => {}
                }
                continue;
            }
        };
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // stdout is gone (e.g. `| head -1`): leave politely.
            // The close may fail if the server is gone too; we exit either way.
            let _ = ws.close(None);
            let _ = ws.flush();
            return End::Closed(u16::from(CloseCode::Normal), String::new());
        }
    }
}

/// An I/O error after which the same call may simply be made again.
fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn close_parts(frame: Option<CloseFrame>) -> (u16, String) {
    match frame {
        Some(frame) => (u16::from(frame.code), frame.reason.as_str().to_string()),
        None => (u16::from(CloseCode::Status), String::new()),
    }
}

/// One output line for a text message: valid JSON stays as sent, with any
/// line breaks (which JSON allows only as whitespace between tokens) turned
/// into spaces; anything else becomes a JSON string.
fn json_line(text: &str) -> String {
    if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
        text.replace(['\n', '\r'], " ")
    } else {
        serde_json::Value::from(text).to_string()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_stay_single_lines() {
        assert_eq!(json_line(r#"{"a":1}"#), r#"{"a":1}"#);
        assert_eq!(
            json_line("{\n  \"a\": \"x\\ny\"\r\n}"),
            "{   \"a\": \"x\\ny\"  }"
        );
        assert_eq!(json_line("not json\nat all"), r#""not json\nat all""#);
    }

    #[test]
    fn token_in_query_is_recognised() {
        assert!(url_has_token("ws://h/ws?token=abc"));
        assert!(url_has_token("ws://h/ws?x=1&token=abc"));
        assert!(!url_has_token("ws://h/ws?tokens=abc"));
        assert!(!url_has_token("ws://h/ws"));
    }

    /// A socket that plays back scripted reads (then EOF) and keeps what is
    /// written to it.
    struct Scripted {
        reads: std::collections::VecDeque<io::Result<Vec<u8>>>,
        written: Vec<u8>,
    }

    impl Scripted {
        fn new(reads: Vec<io::Result<Vec<u8>>>) -> WebSocket<Scripted> {
            let stream = Scripted {
                reads: reads.into(),
                written: Vec::new(),
            };
            WebSocket::from_raw_socket(stream, tungstenite::protocol::Role::Client, None)
        }
    }

    impl io::Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.reads.pop_front() {
                None => Ok(0),
                Some(Err(e)) => Err(e),
                Some(Ok(bytes)) => {
                    buf[..bytes.len()].copy_from_slice(&bytes);
                    Ok(bytes.len())
                }
            }
        }
    }

    impl io::Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn interrupted() -> io::Result<Vec<u8>> {
        Err(io::Error::from(io::ErrorKind::Interrupted))
    }

    /// A server's (unmasked) close frame with code 1000.
    fn server_close_1000() -> io::Result<Vec<u8>> {
        Ok(vec![0x88, 0x02, 0x03, 0xe8])
    }

    #[test]
    fn ctrl_c_sends_a_normal_close_and_waits_for_the_reply() {
        // The signal interrupts the blocked read (EINTR); then the server answers.
        let mut ws = Scripted::new(vec![interrupted(), server_close_1000()]);
        let mut out = Vec::new();
        let end = read_loop(&mut ws, &mut out, &AtomicBool::new(true));
        assert_eq!(
            end,
            End::Interrupted {
                reply: "closed: 1000 ".to_string()
            }
        );
        // Our close frame: final, opcode 8, masked, code 1000.
        let written = &ws.get_ref().written;
        assert_eq!(written[..2], [0x88, 0x80 | 2], "{written:?}");
        let (mask, code) = (&written[2..6], &written[6..8]);
        assert_eq!([code[0] ^ mask[0], code[1] ^ mask[1]], [0x03, 0xe8]);
        assert!(out.is_empty());
    }

    #[test]
    fn an_interrupted_read_without_ctrl_c_reads_on() {
        let text = br#"{"a":1}"#;
        let mut frame = vec![0x81, text.len() as u8];
        frame.extend_from_slice(text);
        let mut ws = Scripted::new(vec![interrupted(), Ok(frame), server_close_1000()]);
        let mut out = Vec::new();
        let end = read_loop(&mut ws, &mut out, &AtomicBool::new(false));
        assert_eq!(end, End::Closed(1000, String::new()));
        assert_eq!(out, b"{\"a\":1}\n");
    }

    #[test]
    fn token_is_not_debug_printed() {
        let args = ListenArgs {
            url: "ws://h/ws".to_string(),
            token: Some("secret.jwt.value".to_string()),
        };
        assert!(!format!("{args:?}").contains("secret"));
    }
}
