//! A hand-made WebSocket client for what tungstenite's client will not send
//! (unmasked, reserved or broken frames), and the one client frame encoder of
//! the test suite.

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{PROMPT, SAMPLE_ACCEPT, read_http_response, read_until_deadline, upgrade_request};

/// The mask key of [`masked_frame`] and [`RawWs::send_masked`].
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// What [`RawWs::read_event`] saw next.
pub enum RawEvent {
    Frame { opcode: u8, payload: Vec<u8> },
    Eof,
    Error(io::Error),
    Timeout,
}

/// A WebSocket connection with a hand-made handshake and hand-made frames.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Completes an upgrade on `path_and_query` and checks the 101 answer,
    /// including `Sec-WebSocket-Accept`.
    #[track_caller]
    pub fn handshake(port: u16, path_and_query: &str, extra: &[(&str, &str)]) -> RawWs {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .write_all(upgrade_request(path_and_query, extra).as_bytes())
            .expect("write upgrade");
        let (resp, leftover) = read_http_response(&mut stream, Instant::now() + PROMPT)
            .expect("read upgrade response");
        assert_eq!(resp.status, 101, "upgrade refused: {resp:?}");
        assert_eq!(
            resp.header("sec-websocket-accept"),
            Some(SAMPLE_ACCEPT),
            "accept key in {resp:?}"
        );
        RawWs {
            stream,
            buf: leftover,
        }
    }

    /// Handshake with `?token=` and reads the `connected` frame.
    #[track_caller]
    pub fn open(port: u16, token: &str) -> RawWs {
        let mut raw = Self::handshake(port, &format!("/ws?token={token}"), &[]);
        raw.expect_connected(PROMPT);
        raw
    }

    /// Writes one frame: `first_byte` is FIN/RSV/opcode (0x81 = final text
    /// frame); `mask` of `None` sends it unmasked (a protocol error from a client).
    pub fn send_frame(
        &mut self,
        first_byte: u8,
        payload: &[u8],
        mask: Option<[u8; 4]>,
    ) -> io::Result<()> {
        self.stream
            .write_all(&client_frame(first_byte, payload, mask))
    }

    /// A masked frame, as a client must send.
    pub fn send_masked(&mut self, first_byte: u8, payload: &[u8]) -> io::Result<()> {
        self.send_frame(first_byte, payload, Some(MASK))
    }

    fn parse_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let opcode = b[0] & 0x0f;
        let masked = b[1] & 0x80 != 0;
        let (len, mut pos) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        let key = if masked {
            let k: [u8; 4] = b.get(pos..pos + 4)?.try_into().ok()?;
            pos += 4;
            Some(k)
        } else {
            None
        };
        if b.len() < pos + len {
            return None;
        }
        let mut payload = b[pos..pos + len].to_vec();
        if let Some(k) = key {
            payload
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x ^= k[i % 4]);
        }
        self.buf.drain(..pos + len);
        Some((opcode, payload))
    }

    /// The next frame, EOF, an I/O error, or a timeout.
    pub fn read_event(&mut self, timeout: Duration) -> RawEvent {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 65536];
        loop {
            if let Some((opcode, payload)) = self.parse_frame() {
                return RawEvent::Frame { opcode, payload };
            }
            match read_until_deadline(&mut self.stream, &mut chunk, deadline) {
                Ok(0) => return RawEvent::Eof,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return RawEvent::Timeout,
                Err(e) => return RawEvent::Error(e),
            }
        }
    }

    /// Skips data and ping frames until a close frame; returns its code and reason.
    #[track_caller]
    pub fn expect_close(&mut self, timeout: Duration) -> (u16, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_event(left) {
                RawEvent::Frame { opcode: 8, payload } => {
                    assert!(payload.len() >= 2, "close frame without a code");
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
                }
                RawEvent::Frame { .. } => {}
                RawEvent::Eof => panic!("EOF before a close frame"),
                RawEvent::Error(e) => panic!("{e} before a close frame"),
                RawEvent::Timeout => panic!("no close frame within {timeout:?}"),
            }
        }
    }

    /// Reads and discards until EOF or a connection error; false on timeout.
    pub fn wait_gone(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_event(left) {
                RawEvent::Frame { .. } => {}
                RawEvent::Eof | RawEvent::Error(_) => return true,
                RawEvent::Timeout => return false,
            }
        }
    }

    /// Wraps a socket whose upgrade the test did by hand; `leftover` is what was
    /// read after the 101 head (the start of the WebSocket stream).
    pub fn from_upgraded(stream: TcpStream, leftover: Vec<u8>) -> RawWs {
        RawWs {
            stream,
            buf: leftover,
        }
    }

    /// Writes bytes as they are (several frames, or a broken one).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads the `connected` text frame of a fresh session; fails otherwise.
    #[track_caller]
    pub fn expect_connected(&mut self, timeout: Duration) -> Value {
        match self.read_event(timeout) {
            RawEvent::Frame { opcode: 1, payload } => {
                let v: Value = serde_json::from_slice(&payload).expect("connected frame is JSON");
                assert_eq!(v["type"], "connected", "first frame: {v}");
                v
            }
            RawEvent::Frame { opcode, .. } => {
                panic!("expected the connected frame, got opcode {opcode}")
            }
            RawEvent::Eof => panic!("EOF instead of the connected frame"),
            RawEvent::Error(e) => panic!("{e} instead of the connected frame"),
            RawEvent::Timeout => panic!("no connected frame within {timeout:?}"),
        }
    }

    /// The next text frame as JSON, skipping pings and pongs; fails otherwise.
    #[track_caller]
    pub fn expect_json(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_event(left) {
                RawEvent::Frame { opcode: 1, payload } => {
                    return serde_json::from_slice(&payload).unwrap_or_else(|e| {
                        panic!(
                            "text frame is not JSON ({e}): {:?}",
                            String::from_utf8_lossy(&payload)
                        )
                    });
                }
                RawEvent::Frame { opcode: 9 | 10, .. } => {}
                RawEvent::Frame { opcode, payload } => {
                    panic!("expected a text frame, got opcode {opcode} ({payload:?})")
                }
                RawEvent::Eof => panic!("EOF instead of a text frame"),
                RawEvent::Error(e) => panic!("{e} instead of a text frame"),
                RawEvent::Timeout => panic!("no text frame within {timeout:?}"),
            }
        }
    }
}

/// Reads a socket until EOF or an error (true) or the timeout (false).
pub fn wait_eof(stream: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut chunk = [0u8; 65536];
    loop {
        match read_until_deadline(stream, &mut chunk, deadline) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

/// The bytes of one client frame: `first_byte` is FIN/RSV/opcode, `mask` of
/// `None` leaves it unmasked (as [`RawWs::send_frame`] writes it).
pub fn client_frame(first_byte: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut frame = vec![first_byte];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => frame.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => frame.extend_from_slice(payload),
    }
    frame
}

/// A masked client frame (the mask [`RawWs::send_masked`] uses).
pub fn masked_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    client_frame(first_byte, payload, Some(MASK))
}
