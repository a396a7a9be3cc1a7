//! The client's minimal WebSocket codec: the 101 answer, server frame headers,
//! the two payloads the bench cares about, and masked client control frames.
//!
//! Deliberately not tungstenite: the load generator must cost far less per
//! message than the server it measures, so it parses only what it needs and
//! never builds a message object or runs a JSON parser per frame.

/// Opcodes (RFC 6455 section 5.2).
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Frames larger than this are treated as a protocol error (the server sends
/// small JSON notifications; this only bounds the client's buffer).
pub const MAX_FRAME_PAYLOAD: usize = 16 << 20;

/// Largest response head accepted before giving up on a handshake.
pub const MAX_RESPONSE_HEAD: usize = 8 << 10;

/// Start of a bench message as the server relays it: the published
/// `{"type":"bench","payload":{"seq":N,"t":T}}` with the gateway's `timestamp`
/// appended after the payload. The fields sit at fixed positions so they are
/// found without parsing JSON.
pub const BENCH_PREFIX: &[u8] = br#"{"type":"bench","payload":{"seq":"#;
const BENCH_T: &[u8] = br#","t":"#;

/// Start of the message the server sends when a connection opens.
pub const CONNECTED_PREFIX: &[u8] = br#"{"type":"connected""#;

/// The `Sec-WebSocket-Key` every bench connection sends (RFC 6455 section 4.1
/// asks for a random nonce; the server only checks it is 16 base64 bytes, and
/// a constant lets the client check the answer with one comparison).
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The `Sec-WebSocket-Accept` a server answers to `WS_KEY`: base64 of the
/// SHA-1 of the key and the RFC's GUID (`WS_KEY` is the sample nonce of RFC
/// 6455 section 1.3, and this is the answer the RFC gives for it).
const WS_ACCEPT: &[u8] = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    pub opcode: u8,
    /// Bytes of header, including a masking key if present.
    pub header_len: usize,
    pub payload_len: usize,
    /// Server frames must not be masked (RFC 6455 section 5.1); a masked one is
    /// still decoded and counted by the caller.
    pub mask: Option<[u8; 4]>,
}

impl FrameHead {
    /// Header plus payload.
    pub fn total_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Why the byte stream from the server is not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    TooLarge,
}

/// Parses the frame header at the start of `buf`: `Ok(None)` while incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<FrameHead>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let (payload_len, mut header_len) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut bytes = [0; 8];
                bytes.copy_from_slice(b);
                (u64::from_be_bytes(bytes), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if payload_len > MAX_FRAME_PAYLOAD as u64 {
        return Err(FrameError::TooLarge);
    }
    let mask = if b1 & 0x80 != 0 {
        let Some(b) = buf.get(header_len..header_len + 4) else {
            return Ok(None);
        };
        header_len += 4;
        Some([b[0], b[1], b[2], b[3]])
    } else {
        None
    };
    Ok(Some(FrameHead {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        header_len,
        payload_len: payload_len as usize,
        mask,
    }))
}

/// XORs `payload` with `mask` (RFC 6455 section 5.3), in place.
pub fn apply_mask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Appends a masked client frame (FIN set) with a payload of at most 125
/// bytes, as every control frame is (RFC 6455 section 5.5).
pub fn push_masked_control(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    let len = payload.len().min(125);
    out.push(0x80 | opcode);
    out.push(0x80 | len as u8);
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(&payload[..len]);
    apply_mask(&mut out[start..], mask);
}

/// Parses leading ASCII digits: the value and how many bytes they took.
fn parse_u64(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    let mut used = 0;
    for &b in bytes.iter().take(20) {
        if !b.is_ascii_digit() {
            break;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        used += 1;
    }
    (used > 0).then_some((value, used))
}

/// `(seq, t)` of a bench message, or `None` for any other payload.
pub fn parse_bench(payload: &[u8]) -> Option<(u64, u64)> {
    let rest = payload.strip_prefix(BENCH_PREFIX)?;
    let (seq, used) = parse_u64(rest)?;
    let rest = rest[used..].strip_prefix(BENCH_T)?;
    let (t, _) = parse_u64(rest)?;
    Some((seq, t))
}

/// `(id, seq, t)` of a bench message published with history (`FCALL
/// ws_notify_publish`), which splices `"id":"<stream id>"` in as the first
/// member: `{"id":"1764680000042-0","type":"bench","payload":{"seq":N,"t":T}}`.
pub fn parse_bench_with_id(payload: &[u8]) -> Option<(&[u8], u64, u64)> {
    let rest = payload.strip_prefix(br#"{"id":""#)?;
    let end = rest.iter().position(|&b| b == b'"')?;
    let (id, rest) = rest.split_at(end);
    // `",` then the published object without its opening brace.
    let rest = rest
        .strip_prefix(b"\",")?
        .strip_prefix(&BENCH_PREFIX[1..])?;
    let (seq, used) = parse_u64(rest)?;
    let rest = rest[used..].strip_prefix(BENCH_T)?;
    let (t, _) = parse_u64(rest)?;
    Some((id, seq, t))
}

/// Outcome of looking for the end of the server's HTTP answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// The head is not complete yet.
    Partial,
    /// `101` with the right `Sec-WebSocket-Accept`; frames start at this offset.
    Switched(usize),
    /// Any other answer: its status code (0 when unparsable).
    Refused(u16),
}

/// Checks the server's answer to the upgrade request in `buf`.
pub fn parse_upgrade(buf: &[u8]) -> Upgrade {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Upgrade::Partial;
    };
    let head = &buf[..end];
    let status = head
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(parse_u64)
        .map_or(0, |(code, _)| code.min(999) as u16);
    if status != 101 {
        return Upgrade::Refused(status);
    }
    if !head.windows(WS_ACCEPT.len()).any(|w| w == WS_ACCEPT) {
        return Upgrade::Refused(0);
    }
    Upgrade::Switched(end + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_header_sizes() {
        assert_eq!(parse_head(&[0x81]), Ok(None));
        let small = parse_head(&[0x81, 5]).unwrap().unwrap();
        assert_eq!(
            (small.fin, small.opcode, small.header_len, small.payload_len),
            (true, 1, 2, 5)
        );
        assert_eq!(parse_head(&[0x81, 126, 1]), Ok(None));
        let mid = parse_head(&[0x81, 126, 1, 0]).unwrap().unwrap();
        assert_eq!((mid.header_len, mid.payload_len), (4, 256));
        let big = parse_head(&[0x01, 127, 0, 0, 0, 0, 0, 1, 0, 0])
            .unwrap()
            .unwrap();
        assert_eq!(
            (big.fin, big.header_len, big.payload_len),
            (false, 10, 65536)
        );
        assert_eq!(
            parse_head(&[0x81, 127, 0, 0, 0, 0, 0x10, 0, 0, 1]),
            Err(FrameError::TooLarge)
        );
        let masked = parse_head(&[0x89, 0x82, 1, 2, 3, 4]).unwrap().unwrap();
        assert_eq!((masked.header_len, masked.mask), (6, Some([1, 2, 3, 4])));
        assert_eq!(parse_head(&[0x89, 0x82, 1, 2, 3]), Ok(None));
    }

    #[test]
    fn masked_control_frame_round_trips() {
        let mut out = Vec::new();
        push_masked_control(&mut out, OP_PONG, b"hi", [9, 8, 7, 6]);
        let head = parse_head(&out).unwrap().unwrap();
        assert_eq!(
            (head.opcode, head.payload_len, head.mask),
            (OP_PONG, 2, Some([9, 8, 7, 6]))
        );
        let mut payload = out[head.header_len..].to_vec();
        apply_mask(&mut payload, [9, 8, 7, 6]);
        assert_eq!(payload, b"hi");
    }

    #[test]
    fn finds_bench_fields_without_json() {
        let frame = br#"{"type":"bench","payload":{"seq":42,"t":1732761023123456},"timestamp":"2026-11-28T03:30:23.123Z"}"#;
        assert_eq!(parse_bench(frame), Some((42, 1732761023123456)));
        assert_eq!(parse_bench(br#"{"type":"connected","payload":{}}"#), None);
        assert_eq!(
            parse_bench(br#"{"type":"bench","payload":{"seq":x}}"#),
            None
        );
        assert_eq!(
            parse_bench(br#"{"type":"bench","payload":{"seq":1,"u":2}}"#),
            None
        );
    }

    #[test]
    fn accept_key_answers_the_key() {
        let derived = tungstenite::handshake::derive_accept_key(WS_KEY.as_bytes());
        assert_eq!(derived.as_bytes(), WS_ACCEPT);
    }

    #[test]
    fn checks_the_upgrade_answer() {
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00";
        assert_eq!(parse_upgrade(ok), Upgrade::Switched(ok.len() - 2));
        assert_eq!(parse_upgrade(&ok[..20]), Upgrade::Partial);
        let busy = b"HTTP/1.1 503 Service Unavailable\r\n\r\n{}";
        assert_eq!(parse_upgrade(busy), Upgrade::Refused(503));
        let wrong = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert_eq!(parse_upgrade(wrong), Upgrade::Refused(0));
    }

    #[test]
    fn bench_message_with_history_id() {
        let m = br#"{"id":"1764680000042-3","type":"bench","payload":{"seq":17,"t":99},"timestamp":"x"}"#;
        assert_eq!(
            parse_bench_with_id(m),
            Some((&b"1764680000042-3"[..], 17, 99))
        );
        assert_eq!(
            parse_bench_with_id(br#"{"type":"bench","payload":{"seq":1,"t":2}}"#),
            None
        );
        assert_eq!(parse_bench_with_id(br#"{"id":"1-0","type":"other"}"#), None);
    }
}
