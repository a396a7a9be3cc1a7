//! An incremental RESP parser for a pub/sub connection: it reads what Redis
//! sends a subscriber (pushes, confirmations, pongs, the replies to `AUTH`,
//! `SELECT` and `PING`) straight out of the link's read buffer, without
//! allocating.
//!
//! [`parse`] looks at the start of a buffer and answers either a [`Frame`]
//! with the number of bytes it took, `Ok(None)` when the frame is not complete
//! yet (call again with more bytes: nothing is kept between calls, so a split
//! anywhere gives the same frames), or a [`ProtocolError`] that ends the link.
//! The parser never panics on any input (the fuzz target `pubsub_frames`
//! checks it) and bounds what it accepts: a bulk string of at most
//! [`MAX_BULK`] bytes, aggregates of at most [`MAX_ELEMENTS`] elements nested
//! at most [`MAX_DEPTH`] deep, lines (simple strings, errors, numbers) of at
//! most [`MAX_LINE`] bytes.
//!
//! RESP2 is what the link speaks (it never sends `HELLO 3`); RESP3's push
//! (`>`) and other types are accepted too, as they cost a match arm each,
//! except attributes (`|`), which are a protocol error.

use std::fmt;

/// Largest bulk string accepted: Redis' own `proto-max-bulk-len` default.
pub const MAX_BULK: usize = 512 << 20;
/// Most elements of one aggregate (array, push, set; a map counts its keys
/// and values). Pub/sub frames have 2 to 4.
pub const MAX_ELEMENTS: usize = 1 << 20;
/// Deepest nesting of aggregates (the top level is depth 1).
pub const MAX_DEPTH: usize = 8;
/// Longest line (type byte to CRLF) of a simple string, error or number.
pub const MAX_LINE: usize = 64 << 10;

/// Which subscription a confirmation is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionKind {
    Subscribe,
    Unsubscribe,
    Psubscribe,
    Punsubscribe,
    Ssubscribe,
    Sunsubscribe,
}

impl SubscriptionKind {
    fn from_name(name: &[u8]) -> Option<SubscriptionKind> {
        Some(match name {
            b"subscribe" => SubscriptionKind::Subscribe,
            b"unsubscribe" => SubscriptionKind::Unsubscribe,
            b"psubscribe" => SubscriptionKind::Psubscribe,
            b"punsubscribe" => SubscriptionKind::Punsubscribe,
            b"ssubscribe" => SubscriptionKind::Ssubscribe,
            b"sunsubscribe" => SubscriptionKind::Sunsubscribe,
            _ => return None,
        })
    }

    /// The command's name, for log lines and errors.
    pub fn command(self) -> &'static str {
        match self {
            SubscriptionKind::Subscribe => "SUBSCRIBE",
            SubscriptionKind::Unsubscribe => "UNSUBSCRIBE",
            SubscriptionKind::Psubscribe => "PSUBSCRIBE",
            SubscriptionKind::Punsubscribe => "PUNSUBSCRIBE",
            SubscriptionKind::Ssubscribe => "SSUBSCRIBE",
            SubscriptionKind::Sunsubscribe => "SUNSUBSCRIBE",
        }
    }

    /// True for the confirmations that add a subscription.
    pub fn is_subscribe(self) -> bool {
        matches!(
            self,
            SubscriptionKind::Subscribe
                | SubscriptionKind::Psubscribe
                | SubscriptionKind::Ssubscribe
        )
    }
}

/// One complete frame, borrowing from the buffer it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A published message: `message` (pattern `None`, not sharded),
    /// `pmessage` (with the pattern that matched) or `smessage` (sharded).
    Message {
        pattern: Option<&'a [u8]>,
        channel: &'a [u8],
        payload: &'a [u8],
        sharded: bool,
    },
    /// A (un)subscribe confirmation: the channel (`None` for an unsubscribe
    /// from nothing) and how many subscriptions the connection holds now.
    Subscription {
        kind: SubscriptionKind,
        channel: Option<&'a [u8]>,
        count: i64,
    },
    /// `PING`'s answer in subscribed mode (`["pong", data]`). Outside it
    /// Redis answers `+PONG`, a [`Frame::Simple`].
    Pong,
    /// An error reply (`-ERR ...`, or RESP3's blob error), without the type byte.
    Error(&'a [u8]),
    /// A simple string (`+OK`), without the type byte.
    Simple(&'a [u8]),
    /// An integer reply.
    Integer(i64),
    /// Any other well-formed value (a bulk string, an array that is not a
    /// pub/sub frame, a RESP3 map or null, ...): the link treats it as a
    /// reply to the command waiting for one.
    Other,
}

/// Bytes that are not RESP, or exceed a bound: the link cannot go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(&'static str);

impl ProtocolError {
    /// A frame larger than the read buffer may grow.
    pub(crate) fn too_large() -> ProtocolError {
        ProtocolError("frame too large")
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redis protocol error: {}", self.0)
    }
}

impl std::error::Error for ProtocolError {}

/// Parses the frame at the start of `buf`: `Ok(Some((frame, bytes taken)))`,
/// `Ok(None)` when more bytes are needed, or an error.
pub fn parse(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, ProtocolError> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    match kind {
        b'*' | b'>' => {
            let Some((len, mut pos)) = line(buf, 0)? else {
                return Ok(None);
            };
            let Some(count) = aggregate_len(len, 1)? else {
                // A null array (`*-1`).
                return Ok(Some((Frame::Other, pos)));
            };
            // The first four elements are kept (pub/sub frames have 2-4);
            // the rest are only walked over.
            let mut items = [Item::Nested; 4];
            for i in 0..count {
                let Some((item, next)) = value(buf, pos, 2)? else {
                    return Ok(None);
                };
                if let Some(slot) = items.get_mut(i) {
                    *slot = item;
                }
                pos = next;
            }
            Ok(Some((pubsub_frame(count, &items), pos)))
        }
        _ => {
            let Some((item, end)) = value(buf, 0, 1)? else {
                return Ok(None);
            };
            let frame = match item {
                Item::Simple(text) => Frame::Simple(text),
                Item::Error(text) => Frame::Error(text),
                Item::Integer(n) => Frame::Integer(n),
                Item::Bulk(_) | Item::Null | Item::Nested => Frame::Other,
            };
            Ok(Some((frame, end)))
        }
    }
}

/// What a pub/sub frame is made of: one element of the top-level array.
#[derive(Debug, Clone, Copy)]
enum Item<'a> {
    Bulk(&'a [u8]),
    Simple(&'a [u8]),
    Error(&'a [u8]),
    Integer(i64),
    Null,
    /// An aggregate, a double, a boolean, a big number: not part of any
    /// pub/sub frame.
    Nested,
}

impl<'a> Item<'a> {
    /// A bulk or simple string.
    fn text(self) -> Option<&'a [u8]> {
        match self {
            Item::Bulk(text) | Item::Simple(text) => Some(text),
            _ => None,
        }
    }
}

/// Reads a top-level array or push of `count` elements (`items` holds the
/// first four) as a pub/sub frame, or [`Frame::Other`].
fn pubsub_frame<'a>(count: usize, items: &[Item<'a>; 4]) -> Frame<'a> {
    let Some(name) = items[0].text().filter(|_| count >= 2) else {
        return Frame::Other;
    };
    match (name, count) {
        (b"message" | b"smessage", 3) => match (items[1].text(), items[2].text()) {
            (Some(channel), Some(payload)) => Frame::Message {
                pattern: None,
                channel,
                payload,
                sharded: name == b"smessage",
            },
            _ => Frame::Other,
        },
        (b"pmessage", 4) => match (items[1].text(), items[2].text(), items[3].text()) {
            (Some(pattern), Some(channel), Some(payload)) => Frame::Message {
                pattern: Some(pattern),
                channel,
                payload,
                sharded: false,
            },
            _ => Frame::Other,
        },
        (b"pong", 2) => Frame::Pong,
        (_, 3) => {
            let Some(kind) = SubscriptionKind::from_name(name) else {
                return Frame::Other;
            };
            let channel = match items[1] {
                Item::Null => None,
                item => match item.text() {
                    Some(channel) => Some(channel),
                    None => return Frame::Other,
                },
            };
            match items[2] {
                Item::Integer(count) => Frame::Subscription {
                    kind,
                    channel,
                    count,
                },
                _ => Frame::Other,
            }
        }
        _ => Frame::Other,
    }
}

/// The value at `buf[pos..]` at nesting `depth`: the item and where it ends.
fn value(buf: &[u8], pos: usize, depth: usize) -> Result<Option<(Item<'_>, usize)>, ProtocolError> {
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    if !b"+-:_#,($!=*>~%".contains(&kind) {
        return Err(ProtocolError("unknown type byte"));
    }
    let Some((text, after)) = line(buf, pos)? else {
        return Ok(None);
    };
    let item = match kind {
        b'+' => Item::Simple(text),
        b'-' => Item::Error(text),
        b':' => Item::Integer(integer(text)?),
        b'_' => {
            if !text.is_empty() {
                return Err(ProtocolError("RESP3 null with content"));
            }
            Item::Null
        }
        // Boolean, double, big number: walked over.
        b'#' | b',' | b'(' => Item::Nested,
        b'$' | b'!' | b'=' => {
            let len = integer(text)?;
            if len == -1 && kind == b'$' {
                return Ok(Some((Item::Null, after)));
            }
            let len = usize::try_from(len).map_err(|_| ProtocolError("negative bulk length"))?;
            if len > MAX_BULK {
                return Err(ProtocolError("bulk string too large"));
            }
            let end = after + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError("bulk string not followed by CRLF"));
            }
            let bytes = &buf[after..end];
            let item = match kind {
                b'$' => Item::Bulk(bytes),
                b'!' => Item::Error(bytes),
                _ => Item::Nested,
            };
            return Ok(Some((item, end + 2)));
        }
        b'*' | b'>' | b'~' | b'%' => {
            let factor = if kind == b'%' { 2 } else { 1 };
            if depth >= MAX_DEPTH {
                return Err(ProtocolError("aggregates nested too deep"));
            }
            let Some(count) = aggregate_len(text, factor)? else {
                return Ok(Some((Item::Null, after)));
            };
            let mut pos = after;
            for _ in 0..count {
                let Some((_, next)) = value(buf, pos, depth + 1)? else {
                    return Ok(None);
                };
                pos = next;
            }
            return Ok(Some((Item::Nested, pos)));
        }
        _ => return Err(ProtocolError("unknown type byte")),
    };
    Ok(Some((item, after)))
}

/// The elements of an aggregate whose header says `text`; `None` for a null
/// array (`*-1`, RESP2 only).
fn aggregate_len(text: &[u8], factor: usize) -> Result<Option<usize>, ProtocolError> {
    let len = integer(text)?;
    if len == -1 && factor == 1 {
        return Ok(None);
    }
    let len = usize::try_from(len).map_err(|_| ProtocolError("negative aggregate length"))?;
    match len.checked_mul(factor) {
        Some(count) if count <= MAX_ELEMENTS => Ok(Some(count)),
        _ => Err(ProtocolError("aggregate too large")),
    }
}

/// The line that starts at `buf[pos]` (its type byte): the text between the
/// type byte and CRLF, and the position after the CRLF.
fn line(buf: &[u8], pos: usize) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let start = pos + 1;
    let limit = buf.len().min(pos.saturating_add(MAX_LINE));
    let Some(rest) = buf.get(start..limit) else {
        return Ok(None);
    };
    match rest.iter().position(|&b| b == b'\r') {
        Some(cr) => {
            let end = start + cr;
            match buf.get(end + 1) {
                None => Ok(None),
                Some(b'\n') => Ok(Some((&buf[start..end], end + 2))),
                Some(_) => Err(ProtocolError("CR without LF")),
            }
        }
        None if buf.len() - pos >= MAX_LINE => Err(ProtocolError("line too long")),
        None => Ok(None),
    }
}

/// A RESP integer: an optional sign and 1-19 digits that fit an i64.
fn integer(text: &[u8]) -> Result<i64, ProtocolError> {
    const BAD: ProtocolError = ProtocolError("bad integer");
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, text),
    };
    if digits.is_empty() {
        return Err(BAD);
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(BAD);
        }
        let d = i64::from(d - b'0');
        n = n.checked_mul(10).ok_or(BAD)?;
        n = if negative {
            n.checked_sub(d)
        } else {
            n.checked_add(d)
        }
        .ok_or(BAD)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses every frame of `bytes`; panics on an error or leftover bytes.
    fn frames(bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            match parse(&bytes[pos..]) {
                Ok(Some((frame, used))) => {
                    assert!(used > 0);
                    out.push(format!("{frame:?}"));
                    pos += used;
                }
                Ok(None) => panic!("incomplete at {pos}"),
                Err(e) => panic!("{e} at {pos}"),
            }
        }
        out
    }

    /// Every split of `bytes` into two reads: each prefix is incomplete or
    /// yields the same frames as the whole.
    fn check_every_split(bytes: &[u8], want: Frame<'_>) {
        let (frame, used) = parse(bytes).expect("valid").expect("complete");
        assert_eq!(frame, want);
        assert_eq!(used, bytes.len());
        for cut in 0..bytes.len() {
            assert_eq!(parse(&bytes[..cut]), Ok(None), "prefix of {cut} bytes");
        }
        // With trailing bytes of a next frame, the frame is the same.
        let mut longer = bytes.to_vec();
        longer.extend_from_slice(b"*3\r\n$7\r\nmess");
        assert_eq!(parse(&longer), Ok(Some((want, bytes.len()))));
    }

    #[test]
    fn every_frame_kind_at_every_split() {
        check_every_split(
            b"*3\r\n$7\r\nmessage\r\n$12\r\nuser_noti:42\r\n$5\r\nhello\r\n",
            Frame::Message {
                pattern: None,
                channel: b"user_noti:42",
                payload: b"hello",
                sharded: false,
            },
        );
        check_every_split(
            b"*4\r\n$8\r\npmessage\r\n$11\r\nuser_noti:*\r\n$12\r\nuser_noti:42\r\n$0\r\n\r\n",
            Frame::Message {
                pattern: Some(b"user_noti:*"),
                channel: b"user_noti:42",
                payload: b"",
                sharded: false,
            },
        );
        check_every_split(
            b">3\r\n$8\r\nsmessage\r\n$1\r\nc\r\n$4\r\n\r\n\xff\x00\r\n",
            Frame::Message {
                pattern: None,
                channel: b"c",
                payload: b"\r\n\xff\x00",
                sharded: true,
            },
        );
        for (name, kind) in [
            ("subscribe", SubscriptionKind::Subscribe),
            ("unsubscribe", SubscriptionKind::Unsubscribe),
            ("psubscribe", SubscriptionKind::Psubscribe),
            ("punsubscribe", SubscriptionKind::Punsubscribe),
            ("ssubscribe", SubscriptionKind::Ssubscribe),
            ("sunsubscribe", SubscriptionKind::Sunsubscribe),
        ] {
            let bytes = format!("*3\r\n${}\r\n{name}\r\n$2\r\nch\r\n:12\r\n", name.len());
            check_every_split(
                bytes.as_bytes(),
                Frame::Subscription {
                    kind,
                    channel: Some(b"ch"),
                    count: 12,
                },
            );
        }
        check_every_split(
            b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n",
            Frame::Subscription {
                kind: SubscriptionKind::Unsubscribe,
                channel: None,
                count: 0,
            },
        );
        check_every_split(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n", Frame::Pong);
        check_every_split(b"+PONG\r\n", Frame::Simple(b"PONG"));
        check_every_split(b"+OK\r\n", Frame::Simple(b"OK"));
        check_every_split(
            b"-WRONGPASS invalid username-password pair\r\n",
            Frame::Error(b"WRONGPASS invalid username-password pair"),
        );
        check_every_split(b"!5\r\nERR x\r\n", Frame::Error(b"ERR x"));
        check_every_split(b":-9223372036854775808\r\n", Frame::Integer(i64::MIN));
        check_every_split(b":9223372036854775807\r\n", Frame::Integer(i64::MAX));
        check_every_split(b"$3\r\nabc\r\n", Frame::Other);
        check_every_split(b"$-1\r\n", Frame::Other);
        check_every_split(b"*-1\r\n", Frame::Other);
        check_every_split(b"*0\r\n", Frame::Other);
        check_every_split(b"_\r\n", Frame::Other);
        // A HELLO-like RESP3 map with nested values.
        check_every_split(
            b"%2\r\n+server\r\n$5\r\nredis\r\n+modules\r\n*1\r\n%1\r\n#t\r\n,1.5\r\n",
            Frame::Other,
        );
        // Arrays that look almost like pub/sub frames.
        check_every_split(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n:1\r\n", Frame::Other);
        check_every_split(b"*3\r\n$5\r\nother\r\n$1\r\nc\r\n:1\r\n", Frame::Other);
        check_every_split(
            b"*5\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\np\r\n:1\r\n*1\r\n:2\r\n",
            Frame::Other,
        );
        check_every_split(b"*1\r\n$4\r\npong\r\n", Frame::Other);
    }

    #[test]
    fn frames_follow_each_other() {
        let bytes = b"+OK\r\n*3\r\n$10\r\npsubscribe\r\n$11\r\nuser_noti:*\r\n:1\r\n\
            *4\r\n$8\r\npmessage\r\n$11\r\nuser_noti:*\r\n$11\r\nuser_noti:1\r\n$2\r\n{}\r\n\
            *2\r\n$4\r\npong\r\n$0\r\n\r\n";
        assert_eq!(frames(bytes).len(), 4);
    }

    #[test]
    fn protocol_errors() {
        let bad: &[&[u8]] = &[
            b"?x\r\n",
            b"\r\n",
            b":12a\r\n",
            b":\r\n",
            b":-\r\n",
            b":99999999999999999999\r\n",
            b"$-2\r\n",
            b"$536870913\r\n",
            b"$3\r\nabcd\r\n",
            b"*-2\r\n",
            b"*1048577\r\n",
            b"%524289\r\n",
            b"%-1\r\n",
            b"+OK\rX",
            b"_x\r\n",
            b"|1\r\n+a\r\n+b\r\n+OK\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ];
        for bytes in bad {
            assert!(
                parse(bytes).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bytes)
            );
        }
        // Seven levels are fine.
        assert_eq!(
            parse(b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n")
                .map(|f| f.map(|(frame, _)| frame)),
            Ok(Some(Frame::Other))
        );
        // A line without CRLF is incomplete until it passes MAX_LINE.
        let mut long = vec![b'+'; MAX_LINE - 1];
        assert_eq!(parse(&long), Ok(None));
        long.push(b'x');
        assert!(parse(&long).is_err());
        // The largest bulk string is only waited for.
        assert_eq!(parse(b"$536870912\r\nabc"), Ok(None));
    }
}
