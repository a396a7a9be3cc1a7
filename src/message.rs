//! Redis payload -> client frame (README: "Publishing" and "Messages from the
//! server").
//!
//! Runs on the event loop thread and is on the hot path: every published
//! message is validated once and encoded once into a complete, unmasked
//! WebSocket text frame (`Frame`), which every recipient connection then
//! references. Encoding reuses one scratch buffer and makes exactly one
//! allocation per message (the shared frame itself). The published `payload`
//! is copied byte for byte, never re-serialised.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::clock::Timestamp;
use crate::history::StreamId;

/// A complete server-to-client WebSocket frame (header + payload), encoded once
/// and shared by every connection it goes to.
pub type Frame = Arc<[u8]>;

/// Why a published message was refused: it is dropped, counted as invalid,
/// and logged (rate-limited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidMessage {
    /// Not well-formed JSON (including invalid UTF-8, trailing data and
    /// duplicate `type`/`payload` keys, where we refuse to guess which wins).
    NotJson,
    /// Well-formed JSON whose top level is not an object.
    NotAnObject,
    /// An object without a `type` key.
    MissingType,
    /// An object whose `type` is not a string.
    TypeNotString,
}

impl InvalidMessage {
    /// Every reason, for metric label enumeration.
    pub const ALL: [InvalidMessage; 4] = [
        InvalidMessage::NotJson,
        InvalidMessage::NotAnObject,
        InvalidMessage::MissingType,
        InvalidMessage::TypeNotString,
    ];

    /// A short snake_case name, usable in logs and as a metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            InvalidMessage::NotJson => "not_json",
            InvalidMessage::NotAnObject => "not_an_object",
            InvalidMessage::MissingType => "missing_type",
            InvalidMessage::TypeNotString => "type_not_string",
        }
    }
}

impl fmt::Display for InvalidMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The user id in a channel name: everything after `prefix` (it may contain
/// ':'). None if the prefix is missing or the id is empty. The Redis reader
/// checks the channel is UTF-8 once, before this, and the id crosses to the
/// loop as this `str`.
pub fn user_id_from_channel<'a>(channel: &'a str, prefix: &str) -> Option<&'a str> {
    channel.strip_prefix(prefix).filter(|id| !id.is_empty())
}

/// Largest server frame header: 2 bytes + 64-bit extended length (RFC 6455 5.2).
const MAX_HEADER_LEN: usize = 10;

/// Scratch capacity kept between messages; a rare huge message does not pin
/// its buffer for the life of the process.
const SCRATCH_KEEP: usize = 64 * 1024;

/// Encodes server-to-client messages. Reuses one scratch buffer across messages.
#[derive(Debug, Default)]
pub struct MessageEncoder {
    /// `MAX_HEADER_LEN` reserved bytes, then the JSON text being built; the
    /// header is written right-aligned into the reserved bytes once the JSON
    /// length is known, so header + JSON are copied into the frame in one go.
    scratch: Vec<u8>,
}

impl MessageEncoder {
    pub fn new() -> Self {
        MessageEncoder {
            scratch: Vec::with_capacity(1024),
        }
    }

    /// Validates a published payload (a JSON object with a string `type`, any
    /// JSON `payload`, missing payload = null, other keys ignored) and encodes
    /// `{"type":..,"payload":<payload bytes exactly as published>,"timestamp":"<ts>"}`
    /// as one unmasked text frame.
    ///
    /// The `type` string token is also copied as published (escapes included):
    /// the parser has already checked it is a well-formed JSON string, so
    /// copying it is equivalent to unescaping and re-escaping it, without the
    /// allocation.
    pub fn encode_published(
        &mut self,
        published: &[u8],
        timestamp: &Timestamp,
    ) -> Result<Frame, InvalidMessage> {
        self.encode_published_with_id(published, timestamp)
            .map(|(frame, _)| frame)
    }

    /// [`MessageEncoder::encode_published`], and the message's history id: a
    /// string `id` member (added by the `ws_notify_publish` Redis function) is
    /// sent first, `{"id":..,"type":..}`, copied as published; it is returned
    /// parsed when it is a stream id (a resuming connection skips messages it
    /// already replayed by it). An `id` that is not a string is ignored.
    pub fn encode_published_with_id(
        &mut self,
        published: &[u8],
        timestamp: &Timestamp,
    ) -> Result<(Frame, Option<StreamId>), InvalidMessage> {
        let parsed = parse_published(published)?;
        self.begin();
        let out = &mut self.scratch;
        let mut id = None;
        if let Some(token) = parsed.id {
            out.extend_from_slice(b"{\"id\":");
            out.extend_from_slice(token.as_bytes());
            out.extend_from_slice(b",\"type\":");
            id = token
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .and_then(StreamId::parse);
        } else {
            out.extend_from_slice(b"{\"type\":");
        }
        out.extend_from_slice(parsed.kind.as_bytes());
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(parsed.payload.unwrap_or("null").as_bytes());
        push_timestamp_and_close(out, timestamp);
        Ok((self.finish(), id))
    }

    /// `{"type":"connected","payload":{"user_id":"<id>","connection_id":"<id>"},"timestamp":..}`
    pub fn encode_connected(
        &mut self,
        user_id: &str,
        connection_id: &str,
        timestamp: &Timestamp,
    ) -> Frame {
        self.encode_connected_with_history(
            user_id,
            connection_id,
            &ConnectedHistory::default(),
            timestamp,
        )
    }

    /// `connected` with history on or a `since`: `position` (the newest stored
    /// message's id) when known, and for a resume
    /// `"recovery":{"complete":..,"count":..}` (README: "History and resume").
    pub fn encode_connected_with_history(
        &mut self,
        user_id: &str,
        connection_id: &str,
        history: &ConnectedHistory,
        timestamp: &Timestamp,
    ) -> Frame {
        self.begin();
        let out = &mut self.scratch;
        out.extend_from_slice(b"{\"type\":\"connected\",\"payload\":{\"user_id\":");
        push_json_str(out, user_id);
        out.extend_from_slice(b",\"connection_id\":");
        push_json_str(out, connection_id);
        if let Some(position) = history.position {
            out.extend_from_slice(b",\"position\":\"");
            push_u64(out, position.ms);
            out.push(b'-');
            push_u64(out, position.seq);
            out.push(b'"');
        }
        if let Some(recovery) = &history.recovery {
            out.extend_from_slice(b",\"recovery\":{\"complete\":");
            out.extend_from_slice(if recovery.complete { b"true" } else { b"false" });
            out.extend_from_slice(b",\"count\":");
            push_u64(out, recovery.count as u64);
            out.push(b'}');
        }
        out.push(b'}');
        push_timestamp_and_close(out, timestamp);
        self.finish()
    }

    /// `{"type":"pong","payload":null,"timestamp":..}`
    pub fn encode_pong(&mut self, timestamp: &Timestamp) -> Frame {
        self.begin();
        let out = &mut self.scratch;
        out.extend_from_slice(b"{\"type\":\"pong\",\"payload\":null");
        push_timestamp_and_close(out, timestamp);
        self.finish()
    }

    fn begin(&mut self) {
        if self.scratch.capacity() > SCRATCH_KEEP {
            self.scratch = Vec::with_capacity(SCRATCH_KEEP);
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(&[0; MAX_HEADER_LEN]);
    }

    /// Writes the header in front of the JSON and copies both into the frame:
    /// the only allocation of an encode.
    fn finish(&mut self) -> Frame {
        let json_len = self.scratch.len() - MAX_HEADER_LEN;
        let (header, header_len) = text_frame_header(json_len);
        let start = MAX_HEADER_LEN - header_len;
        self.scratch[start..MAX_HEADER_LEN].copy_from_slice(&header[..header_len]);
        Frame::from(&self.scratch[start..])
    }
}

/// What `connected` says about history (see `encode_connected_with_history`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectedHistory {
    /// The id of the user's newest stored message; None when history is off or
    /// Redis could not be read.
    pub position: Option<StreamId>,
    /// Present when the client asked to resume (`since`).
    pub recovery: Option<Recovery>,
}

/// The outcome of a resume, as `connected` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// True only when nothing after `since` can be missing.
    pub complete: bool,
    /// Messages replayed after `connected`.
    pub count: usize,
}

/// Checks a published payload without encoding it (for messages that reach no
/// connection here: still counted as invalid when they are).
pub fn validate_published(published: &[u8]) -> Result<(), InvalidMessage> {
    parse_published(published).map(|_| ())
}

/// Appends a server text-frame header (FIN, opcode 1, no mask, 7/16/64-bit
/// length per RFC 6455 5.2) for `len` payload bytes.
pub fn write_text_frame_header(len: usize, out: &mut Vec<u8>) {
    let (header, header_len) = text_frame_header(len);
    out.extend_from_slice(&header[..header_len]);
}

/// RFC 6455 5.2: "Payload length: 7 bits, 7+16 bits, or 7+64 bits ... if 0-125,
/// that is the payload length. If 126, the following 2 bytes interpreted as a
/// 16-bit unsigned integer are the payload length. If 127, the following 8
/// bytes interpreted as a 64-bit unsigned integer ...". "A server MUST NOT mask
/// any frames that it sends to the client", so the MASK bit stays 0.
fn text_frame_header(len: usize) -> ([u8; MAX_HEADER_LEN], usize) {
    const FIN_TEXT: u8 = 0x80 | 0x1;
    let mut header = [0u8; MAX_HEADER_LEN];
    header[0] = FIN_TEXT;
    if len <= 125 {
        header[1] = len as u8;
        (header, 2)
    } else if len <= usize::from(u16::MAX) {
        header[1] = 126;
        header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (header, 4)
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (header, 10)
    }
}

fn push_timestamp_and_close(out: &mut Vec<u8>, timestamp: &Timestamp) {
    out.extend_from_slice(b",\"timestamp\":\"");
    out.extend_from_slice(timestamp.as_str().as_bytes());
    out.extend_from_slice(b"\"}");
}

/// Appends `s` as a JSON string literal (RFC 8259 section 7: quote, reverse
/// solidus and control characters must be escaped).
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let appended: Result<(), std::convert::Infallible> = for_each_json_escaped(s, |piece| {
        out.extend_from_slice(piece);
        Ok(())
    });
    let Ok(()) = appended;
    out.push(b'"');
}

/// Hands `put` the pieces of `text` escaped as the inside of a JSON string (RFC 8259
/// section 7: quote, reverse solidus and control characters; DEL too, for readers
/// that choke on it). Shared by the message encoder and the JSON log lines.
pub(crate) fn for_each_json_escaped<E>(
    text: &str,
    mut put: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    let mut plain_from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let unicode_escape;
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f | 0x7f => {
                unicode_escape = [
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ];
                &unicode_escape
            }
            _ => continue,
        };
        put(&bytes[plain_from..i])?;
        put(escape)?;
        plain_from = i + 1;
    }
    put(&bytes[plain_from..])
}

/// Decimal digits of `value`, without allocating.
fn push_u64(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// A validated published message: both fields borrow the published bytes.
struct ParsedPublished<'a> {
    /// The `type` value as a JSON string token, quotes and escapes included.
    kind: &'a str,
    /// The `payload` value's JSON text, or None when the key is missing.
    payload: Option<&'a str>,
    /// The `id` value as a JSON string token, when it is a string.
    id: Option<&'a str>,
}

fn parse_published(published: &[u8]) -> Result<ParsedPublished<'_>, InvalidMessage> {
    // Validating UTF-8 up front lets serde_json borrow every token from a &str
    // and guarantees the frame is valid text (RFC 6455 5.6).
    let text = std::str::from_utf8(published).map_err(|_| InvalidMessage::NotJson)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let shape = de::Deserializer::deserialize_any(&mut de, TopLevel)
        .map_err(|_| InvalidMessage::NotJson)?;
    // Rejects trailing characters after the value.
    de.end().map_err(|_| InvalidMessage::NotJson)?;
    match shape {
        Shape::Object {
            kind,
            payload,
            id,
            duplicate_key,
        } => {
            if duplicate_key {
                return Err(InvalidMessage::NotJson);
            }
            let kind = kind.ok_or(InvalidMessage::MissingType)?.get();
            if !kind.starts_with('"') {
                return Err(InvalidMessage::TypeNotString);
            }
            let payload = payload.map(RawValue::get);
            let id = id.map(RawValue::get).filter(|id| id.starts_with('"'));
            Ok(ParsedPublished { kind, payload, id })
        }
        Shape::NotAnObject => Err(InvalidMessage::NotAnObject),
    }
}

/// What the top-level JSON value turned out to be. A hand-written visitor
/// instead of `#[derive(Deserialize)]` on a struct because serde's derived
/// structs also accept JSON arrays (`["t", 1]`), and because it lets the
/// reason be a value rather than a parsed error message.
enum Shape<'de> {
    Object {
        kind: Option<&'de RawValue>,
        payload: Option<&'de RawValue>,
        id: Option<&'de RawValue>,
        duplicate_key: bool,
    },
    NotAnObject,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Field {
    Type,
    Payload,
    Id,
    #[serde(other)]
    Other,
}

struct TopLevel;

impl<'de> Visitor<'de> for TopLevel {
    type Value = Shape<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape<'de>, A::Error> {
        let mut kind: Option<&'de RawValue> = None;
        let mut payload: Option<&'de RawValue> = None;
        let mut id: Option<&'de RawValue> = None;
        let mut duplicate_key = false;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Type => {
                    let value = map.next_value::<&'de RawValue>()?;
                    duplicate_key |= kind.replace(value).is_some();
                }
                Field::Payload => {
                    let value = map.next_value::<&'de RawValue>()?;
                    duplicate_key |= payload.replace(value).is_some();
                }
                Field::Id => {
                    let value = map.next_value::<&'de RawValue>()?;
                    duplicate_key |= id.replace(value).is_some();
                }
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Shape::Object {
            kind,
            payload,
            id,
            duplicate_key,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape<'de>, A::Error> {
        // Consume the elements so that malformed JSON inside still counts as NotJson.
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Shape::NotAnObject)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Shape<'de>, E> {
        Ok(Shape::NotAnObject)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Shape<'de>, E> {
        Ok(Shape::NotAnObject)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Shape<'de>, E> {
        Ok(Shape::NotAnObject)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shape<'de>, E> {
        Ok(Shape::NotAnObject)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Shape<'de>, E> {
        Ok(Shape::NotAnObject)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Shape<'de>, E> {
        Ok(Shape::NotAnObject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts() -> Timestamp {
        Timestamp::from_unix_millis(1_795_836_623_123)
    }

    /// Decodes a server frame header; returns (fin, opcode, masked, payload).
    fn decode_frame(frame: &[u8]) -> (bool, u8, bool, &[u8]) {
        assert!(frame.len() >= 2);
        let fin = frame[0] & 0x80 != 0;
        assert_eq!(frame[0] & 0x70, 0, "RSV bits must be 0");
        let opcode = frame[0] & 0x0f;
        let masked = frame[1] & 0x80 != 0;
        let (len, start) = match frame[1] & 0x7f {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&frame[2..10]);
                let len = u64::from_be_bytes(b);
                assert!(len > u64::from(u16::MAX), "64-bit length must be minimal");
                (len as usize, 10)
            }
            n => (n as usize, 2),
        };
        if start == 4 {
            assert!(len > 125, "16-bit length must be minimal");
        }
        assert_eq!(frame.len(), start + len, "frame length matches header");
        (fin, opcode, masked, &frame[start..])
    }

    fn json_of(frame: &[u8]) -> &str {
        let (fin, opcode, masked, payload) = decode_frame(frame);
        assert!(fin);
        assert_eq!(opcode, 1);
        assert!(!masked);
        std::str::from_utf8(payload).expect("frame payload is UTF-8")
    }

    fn encode(published: &str) -> Result<String, InvalidMessage> {
        let mut enc = MessageEncoder::new();
        enc.encode_published(published.as_bytes(), &ts())
            .map(|f| json_of(&f).to_owned())
    }

    #[test]
    fn valid_payload_kinds() {
        let cases = [
            (r#"{"type":"t","payload":{"a":1}}"#, r#"{"a":1}"#),
            (r#"{"type":"t","payload":[1,2,3]}"#, "[1,2,3]"),
            (r#"{"type":"t","payload":"text"}"#, r#""text""#),
            (r#"{"type":"t","payload":-12.5e3}"#, "-12.5e3"),
            (r#"{"type":"t","payload":true}"#, "true"),
            (r#"{"type":"t","payload":null}"#, "null"),
            (r#"{"type":"t"}"#, "null"),
            (
                r#"{"type":"t","payload":{"a":{"b":[{"c":null}]}}}"#,
                r#"{"a":{"b":[{"c":null}]}}"#,
            ),
            (
                r#"{"payload":"héllo ✓ 😀","type":"t","extra":{"x":[1]}}"#,
                r#""héllo ✓ 😀""#,
            ),
        ];
        for (input, payload) in cases {
            let json = encode(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(
                json,
                format!(
                    r#"{{"type":"t","payload":{payload},"timestamp":"2026-11-28T03:30:23.123Z"}}"#
                ),
                "{input}"
            );
            let back: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(back["type"], "t");
        }
    }

    #[test]
    fn payload_bytes_preserved_exactly() {
        let json =
            encode("  {\"type\" : \"t\" ,\n \"payload\" :  {\"a\" : 1.50, \"b\":\"\\u00e9\"} }  ")
                .unwrap();
        assert_eq!(
            json,
            r#"{"type":"t","payload":{"a" : 1.50, "b":"\u00e9"},"timestamp":"2026-11-28T03:30:23.123Z"}"#
        );
        // A big number that f64 would round survives too.
        let json = encode(r#"{"type":"t","payload":12345678901234567890123}"#).unwrap();
        assert!(json.contains(r#""payload":12345678901234567890123,"#));
    }

    #[test]
    fn type_with_escapes_and_unicode() {
        let cases = [
            (r#"{"type":"a\"b\\c\n"}"#, "a\"b\\c\n"),
            (r#"{"type":"\u00e9\ud83d\ude00"}"#, "é😀"),
            (r#"{"type":"ünï ✓"}"#, "ünï ✓"),
            (r#"{"type":""}"#, ""),
            (r#"{"\u0074ype":"escaped key"}"#, "escaped key"),
        ];
        for (input, kind) in cases {
            let json = encode(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            let back: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(back["type"], kind, "{input}");
            assert_eq!(back["payload"], serde_json::Value::Null);
            assert_eq!(back["timestamp"], "2026-11-28T03:30:23.123Z");
        }
    }

    #[test]
    fn invalid_messages() {
        use InvalidMessage::*;
        let cases: [(&[u8], InvalidMessage); 22] = [
            (b"", NotJson),
            (b"   ", NotJson),
            (b"not json", NotJson),
            (b"{", NotJson),
            (b"{\"type\":\"t\"", NotJson),
            (b"{\"type\":\"t\"} x", NotJson),
            (b"{\"type\":\"t\"}{}", NotJson),
            (b"{\"type\":\"t\",\"payload\":}", NotJson),
            (b"{\"type\":\"t\",\"payload\":[1,}", NotJson),
            (b"{\"type\":\"t\",\"payload\":\"\xff\"}", NotJson),
            (b"{\"type\":\"t\",\"type\":\"u\"}", NotJson),
            (b"{\"type\":\"t\",\"payload\":1,\"payload\":2}", NotJson),
            (b"{\"type\":\"t\",\"x\":[1,}", NotJson),
            (b"[1,2,", NotJson),
            (b"[{\"type\":\"t\"}]", NotAnObject),
            (b"\"type\"", NotAnObject),
            (b"42", NotAnObject),
            (b"null", NotAnObject),
            (b"{}", MissingType),
            (b"{\"payload\":{\"type\":\"t\"}}", MissingType),
            (b"{\"type\":1}", TypeNotString),
            (b"{\"type\":null,\"payload\":1}", TypeNotString),
        ];
        let mut enc = MessageEncoder::new();
        for (input, want) in cases {
            assert_eq!(
                enc.encode_published(input, &ts()).err(),
                Some(want),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        for t in [
            &b"{\"type\":[\"t\"]}"[..],
            b"{\"type\":{}}",
            b"{\"type\":true}",
        ] {
            assert_eq!(enc.encode_published(t, &ts()).err(), Some(TypeNotString));
        }
    }

    #[test]
    fn invalid_message_names() {
        let names: Vec<_> = InvalidMessage::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "not_json",
                "not_an_object",
                "missing_type",
                "type_not_string"
            ]
        );
    }

    #[test]
    fn an_id_goes_first_and_the_rest_is_unchanged() {
        let mut enc = MessageEncoder::new();
        let published = br#"{"id":"1764680000000-2","type":"t","payload":{"b":1, "a":[1.50]}}"#;
        let (frame, id) = enc.encode_published_with_id(published, &ts()).unwrap();
        assert_eq!(
            json_of(&frame),
            r#"{"id":"1764680000000-2","type":"t","payload":{"b":1, "a":[1.50]},"timestamp":"2026-11-28T03:30:23.123Z"}"#
        );
        assert_eq!(id, StreamId::parse("1764680000000-2"));
        // Wherever the id is in the object, it is sent first.
        let (frame, id) = enc
            .encode_published_with_id(br#"{"type":"t","id":"5-1"}"#, &ts())
            .unwrap();
        assert!(json_of(&frame).starts_with(r#"{"id":"5-1","type":"t","payload":null"#));
        assert_eq!(id, StreamId::parse("5-1"));
        // A string that is not a stream id is carried but does not count as one.
        let (frame, id) = enc
            .encode_published_with_id(br#"{"id":"abc","type":"t"}"#, &ts())
            .unwrap();
        assert!(json_of(&frame).starts_with(r#"{"id":"abc","type":"t""#));
        assert_eq!(id, None);
        // An id that is not a string is ignored.
        let (frame, id) = enc
            .encode_published_with_id(br#"{"id":7,"type":"t"}"#, &ts())
            .unwrap();
        assert!(json_of(&frame).starts_with(r#"{"type":"t""#));
        assert_eq!(id, None);
        // Two ids: refused like two types.
        assert_eq!(
            enc.encode_published(br#"{"id":"1-1","id":"1-2","type":"t"}"#, &ts()),
            Err(InvalidMessage::NotJson)
        );
    }

    #[test]
    fn connected_with_history() {
        let mut enc = MessageEncoder::new();
        let history = ConnectedHistory {
            position: StreamId::parse("17-3"),
            recovery: Some(Recovery {
                complete: false,
                count: 12,
            }),
        };
        let frame = enc.encode_connected_with_history("u", "7", &history, &ts());
        assert_eq!(
            json_of(&frame),
            r#"{"type":"connected","payload":{"user_id":"u","connection_id":"7","position":"17-3","recovery":{"complete":false,"count":12}},"timestamp":"2026-11-28T03:30:23.123Z"}"#
        );
        let frame =
            enc.encode_connected_with_history("u", "7", &ConnectedHistory::default(), &ts());
        assert_eq!(
            json_of(&frame),
            json_of(&enc.encode_connected("u", "7", &ts()))
        );
    }

    #[test]
    fn connected_and_pong() {
        let mut enc = MessageEncoder::new();
        let frame = enc.encode_connected("user:42", "k3f9a2-7", &ts());
        assert_eq!(
            json_of(&frame),
            r#"{"type":"connected","payload":{"user_id":"user:42","connection_id":"k3f9a2-7"},"timestamp":"2026-11-28T03:30:23.123Z"}"#
        );
        let tricky = "q\"b\\s\n\u{1}\u{1f}\té😀";
        let frame = enc.encode_connected(tricky, "0a0b0c-18446744073709551615", &ts());
        let back: serde_json::Value = serde_json::from_str(json_of(&frame)).unwrap();
        assert_eq!(back["payload"]["user_id"], tricky);
        assert_eq!(
            back["payload"]["connection_id"],
            "0a0b0c-18446744073709551615"
        );

        let frame = enc.encode_pong(&ts());
        assert_eq!(
            json_of(&frame),
            r#"{"type":"pong","payload":null,"timestamp":"2026-11-28T03:30:23.123Z"}"#
        );
    }

    #[test]
    fn frame_header_lengths() {
        for (len, header) in [
            (0usize, vec![0x81, 0]),
            (125, vec![0x81, 125]),
            (126, vec![0x81, 126, 0, 126]),
            (65_535, vec![0x81, 126, 0xff, 0xff]),
            (65_536, vec![0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ] {
            let mut out = vec![0xaa];
            write_text_frame_header(len, &mut out);
            assert_eq!(&out[1..], &header[..], "len {len}");
        }
    }

    #[test]
    fn published_frames_at_length_boundaries() {
        let mut enc = MessageEncoder::new();
        let base = {
            let frame = enc
                .encode_published(br#"{"type":"t","payload":""}"#, &ts())
                .unwrap();
            json_of(&frame).len()
        };
        for target in [125usize, 126, 65_535, 65_536, 200_000] {
            let filler = "x".repeat(target - base);
            let published = format!(r#"{{"type":"t","payload":"{filler}"}}"#);
            let frame = enc.encode_published(published.as_bytes(), &ts()).unwrap();
            let json = json_of(&frame);
            assert_eq!(json.len(), target);
            let back: serde_json::Value = serde_json::from_str(json).unwrap();
            assert_eq!(back["payload"].as_str().map(str::len), Some(filler.len()));
        }
        // The scratch buffer does not stay huge after a big message.
        assert!(enc.scratch.capacity() > SCRATCH_KEEP);
        enc.encode_pong(&ts());
        assert!(enc.scratch.capacity() <= SCRATCH_KEEP);
    }

    #[test]
    fn user_id_from_channel_cases() {
        assert_eq!(
            user_id_from_channel("user_noti:42", "user_noti:"),
            Some("42")
        );
        assert_eq!(
            user_id_from_channel("user_noti:org:7:user:9", "user_noti:"),
            Some("org:7:user:9")
        );
        assert_eq!(user_id_from_channel("user_noti::", "user_noti:"), Some(":"));
        assert_eq!(user_id_from_channel("user_noti:", "user_noti:"), None);
        assert_eq!(user_id_from_channel("other:42", "user_noti:"), None);
        assert_eq!(user_id_from_channel("user_noti", "user_noti:"), None);
        assert_eq!(user_id_from_channel("", "user_noti:"), None);
        assert_eq!(user_id_from_channel("abc", ""), Some("abc"));
        assert_eq!(user_id_from_channel("p:é", "p:"), Some("é"));
    }
}
